"""Independent fp64 truth for ZSPAPrune selection, written in NumPy from SPEC §1.

Deliberately brute force and unlike the package's code: one batch row at a time,
explicit loops over picks, each score recomputed from scratch. Three tools:

* :func:`oracle_order` - the exact pick order in fp64;
* :func:`replay` - walks a backend's pick order step by step against fp64 scores
  and fails unless every pick is the best candidate or within ``tol`` of it (a
  genuine near-tie). Among candidates whose fp64 score equals the pick's exactly
  (duplicated tokens), the pick must be the lowest index;
* :func:`replay_long_row` - the same gap check, vectorised, for rows of video size.
"""
from __future__ import annotations

import math

import numpy as np


def budgets(k: int, core_ratio: float, n: int) -> tuple[int, int]:
    """``(k_b, k_core)`` of a row of ``n`` valid tokens (SPEC §1, restated: the oracle stays independent)."""
    k_b = min(k, n)
    return k_b, min(max(int(math.floor(core_ratio * k_b + 0.5)), 0), k_b)


def phase_tolerances(tol) -> tuple[float, float]:
    """``(core, rest)`` from a replay's ``tol``: one bound for every step, or a pair."""
    return tol if isinstance(tol, tuple) else (tol, tol)


class Row:
    """fp64 scores of one batch row: unit tokens, relevance, and similarities."""

    def __init__(self, visual, prompt, prompt_mask, n, k, core_ratio, relevance):
        V = np.asarray(visual, dtype=np.float64)[:n]
        self.n = n
        self.tokens = V
        self.finite = np.array([bool(np.all(np.isfinite(v))) for v in V])
        self.unit = np.zeros_like(V)
        for i, v in enumerate(V):
            if self.finite[i]:
                self.unit[i] = v / max(math.sqrt(float(np.sum(v * v))), 1e-6)
        P = np.asarray(prompt, dtype=np.float64)
        if P.ndim == 1:
            P, mask = P[None], np.array([True])
        else:
            mask = np.ones(len(P), bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        self.relevance = np.array([self._relevance(i, P, mask, relevance) for i in range(n)])
        self.k_b, self.k_core = budgets(k, core_ratio, n)

    @staticmethod
    def _unit(p):
        if not np.all(np.isfinite(p)):
            return np.zeros_like(p)  # a non-finite prompt vector acts as a zero vector
        return p / max(math.sqrt(float(np.sum(p * p))), 1e-6)

    def _relevance(self, i, P, mask, mode):
        if not self.finite[i]:
            return -math.inf
        if not mask.any():
            return 0.0
        if mode == "mean":
            pooled = P[mask].sum(0) / mask.sum()
            return float(np.sum(self.unit[i] * self._unit(pooled)))
        return max(float(np.sum(self.unit[i] * self._unit(P[t]))) for t in range(len(P)) if mask[t])

    def sim(self, i, j):
        return float(np.sum(self.unit[i] * self.unit[j]))

    def isolation(self, i):
        """``max_{j != i} cos(i, j)`` over finite j (``-inf`` if none); ``+inf`` for non-finite i."""
        if not self.finite[i]:
            return math.inf
        others = [self.sim(i, j) for j in range(self.n) if j != i and self.finite[j]]
        return max(others, default=-math.inf)

    def redundancy(self, i, selected):
        """``max_{c in S} cos(i, c)``; ``+inf`` for a non-finite token (most redundant)."""
        if not self.finite[i]:
            return math.inf
        return max(self.sim(i, c) for c in selected)

    def step_scores(self, t, selected):
        """(candidates, scores, better) at step ``t``: ``better(a, b)`` is true if a beats b."""
        free = [i for i in range(self.n) if i not in selected]
        if t < self.k_core:
            return free, {i: self.relevance[i] for i in free}, max
        if not selected:
            return free, {i: self.isolation(i) for i in free}, min
        return free, {i: self.redundancy(i, selected) for i in free}, min


def oracle_order(row: Row) -> list[int]:
    """Exact fp64 pick order of one row (ties: lower index)."""
    selected: list[int] = []
    for t in range(row.k_b):
        free, scores, best = row.step_scores(t, selected)
        target = best(scores.values())
        selected.append(min(i for i in free if scores[i] == target))
    return selected


def replay(row: Row, order, tol, exact_ties: str = "tokens") -> int:
    """Check a backend's pick order; return how many picks were near-ties (not the exact best).

    ``tol``: the largest fp64 score gap a pick may leave, or ``(core, rest)``: one bound at the core's
    steps (relevance) and another at the seed's and the greedy steps (similarities), for a backend
    whose two phases round differently (cpu: fp32 relevance, fp16 unit vectors after it).

    ``exact_ties``: which exact fp64 ties must go to the lower index. ``"tokens"`` (any input):
    ties between identical tokens, whose scores every backend computes from the same bits, and
    ties of non-finite tokens (infinite scores, exact everywhere). Distinct tokens whose fp64
    scores tie are a near-tie like any other: the gap check bounds them. On random inputs such
    ties are mostly fp64 rounding coincidences (copies of two different picked tokens: cosines
    of exactly 1 that fp64 rounds to 1 or 1 - 2^-52 by the vector), which fp32 rounds apart
    differently. ``"scores"``: every tie of fp64 scores, for inputs built so that each cosine is
    exact in every backend's arithmetic (patterns of +-1, dot products of zero).
    ``"nonfinite"``: ties of non-finite tokens only, for arithmetic whose dot products depend on
    where the rows sit (the Triton interpreter's tiles are the host BLAS's matrix products)."""
    assert exact_ties in ("tokens", "scores", "nonfinite"), exact_ties
    order = [int(x) for x in order]
    assert all(x == -1 for x in order[row.k_b:]), f"expected -1 padding after {row.k_b} picks, got {order}"
    picks = order[: row.k_b]
    assert all(0 <= x < row.n for x in picks), f"pick outside [0, {row.n}): {picks}"
    assert len(set(picks)) == len(picks), f"token picked twice: {picks}"
    core_tol, rest_tol = phase_tolerances(tol)
    near_ties = 0
    for t, j in enumerate(picks):
        selected = picks[:t]
        free, scores, best = row.step_scores(t, selected)
        target = best(scores.values())
        sign = 1.0 if best is max else -1.0
        limit = core_tol if t < row.k_core else rest_tol
        if math.isinf(target) or math.isinf(scores[j]):
            assert scores[j] == target, f"step {t}: picked {j} ({scores[j]}) while a better class exists ({target})"
        else:
            gap = sign * (target - scores[j])  # >= 0: how much worse the pick is than the best
            assert gap <= limit, (f"step {t}: picked {j} with score {scores[j]:.8f}, best {target:.8f} "
                                  f"(gap {gap:.2e} > tol {limit:.0e})")
        exact_twins = [i for i in free if scores[i] == scores[j]
                       and (exact_ties == "scores" or i == j or math.isinf(scores[j])
                            or (exact_ties == "tokens" and np.array_equal(row.tokens[i], row.tokens[j])))]
        assert j == min(exact_twins), f"step {t}: exact tie {exact_twins} must go to the lower index, got {j}"
        near_ties += scores[j] != target
    return near_ties


def replay_long_row(visual, prompt, k: int, core_ratio: float, order, tol) -> int:
    """:func:`replay`'s gap check at every step of one long row (finite tokens, one pooled prompt vector, no
    padding), vectorised: the brute-force walk is too slow at video size. Every pick is checked against
    fp64 scores given the row's own earlier picks, so a pick order that splits from another at a near-tie
    is still held to the rule after it. Returns the near-ties. Copies' exact ties are :func:`replay`'s
    business (random rows hold none)."""
    V = np.asarray(visual, dtype=np.float64)
    n = len(V)
    assert np.isfinite(V).all(), "replay_long_row: finite tokens only"
    k_b, k_core = budgets(k, core_ratio, n)
    assert k_core > 0, "replay_long_row: rows with a core only (no isolation seed)"
    order = [int(x) for x in order]
    assert all(x == -1 for x in order[k_b:]), f"expected -1 padding after {k_b} picks"
    picks = np.array(order[:k_b])
    assert ((0 <= picks) & (picks < n)).all(), "pick outside the row"
    assert len(set(picks.tolist())) == k_b, "token picked twice"
    unit = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-6)
    P = np.asarray(prompt, dtype=np.float64).reshape(-1)
    relevance = unit @ (P / max(np.linalg.norm(P), 1e-6))
    rank = np.full(n, k_b)  # step at which each token was picked (k_b: never)
    rank[picks] = np.arange(k_b)
    # Core step t: the best relevance among the tokens not picked before t.
    steps = np.arange(k_core)
    free = rank[:, None] >= steps[None, :]
    best = np.where(free, relevance[:, None], -np.inf).max(0)
    gaps = best - relevance[picks[:k_core]]
    # Greedy step t: each free token's highest similarity to picks[:t] (a running max over the picks in
    # their order); the lowest wins.
    sims = unit @ unit[picks[: k_b - 1]].T
    running = np.maximum.accumulate(sims, axis=1)[:, k_core - 1:]  # column t - k_core: picks[:t]
    steps = np.arange(k_core, k_b)
    scores = np.where(rank[:, None] >= steps[None, :], running, np.inf)
    greedy_gaps = running[picks[k_core:], np.arange(len(steps))] - scores.min(0)
    core_tol, rest_tol = phase_tolerances(tol)
    limits = np.concatenate([np.full(k_core, core_tol), np.full(k_b - k_core, rest_tol)])
    gaps = np.concatenate([gaps, greedy_gaps])
    worst = int((gaps - limits).argmax())
    assert gaps[worst] <= limits[worst], (f"step {worst}: picked {picks[worst]} {gaps[worst]:.2e} from the best "
                                          f"(> tol {limits[worst]:.0e})")
    return int((gaps > 0).sum())
