"""Independent fp64 truth for ZSPAPrune selection, written in NumPy from SPEC §1.

Deliberately brute force and unlike the package's code: one batch row at a time,
explicit loops over picks, each score recomputed from scratch. Two tools:

* :func:`oracle_order` - the exact pick order in fp64;
* :func:`replay` - walks a backend's pick order step by step against fp64 scores
  and fails unless every pick is the best candidate or within ``tol`` of it (a
  genuine near-tie). Among candidates whose fp64 score equals the pick's exactly
  (duplicated tokens), the pick must be the lowest index.
"""
from __future__ import annotations

import math

import numpy as np


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
        self.k_b = min(k, n)
        self.k_core = min(max(int(math.floor(core_ratio * self.k_b + 0.5)), 0), self.k_b)

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


def replay(row: Row, order, tol: float, exact_ties: str = "tokens") -> int:
    """Check a backend's pick order; return how many picks were near-ties (not the exact best).

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
    near_ties = 0
    for t, j in enumerate(picks):
        selected = picks[:t]
        free, scores, best = row.step_scores(t, selected)
        target = best(scores.values())
        sign = 1.0 if best is max else -1.0
        if math.isinf(target) or math.isinf(scores[j]):
            assert scores[j] == target, f"step {t}: picked {j} ({scores[j]}) while a better class exists ({target})"
        else:
            gap = sign * (target - scores[j])  # >= 0: how much worse the pick is than the best
            assert gap <= tol, f"step {t}: picked {j} with score {scores[j]:.8f}, best {target:.8f} (gap {gap:.2e} > tol {tol:.0e})"
        exact_twins = [i for i in free if scores[i] == scores[j]
                       and (exact_ties == "scores" or i == j or math.isinf(scores[j])
                            or (exact_ties == "tokens" and np.array_equal(row.tokens[i], row.tokens[j])))]
        assert j == min(exact_twins), f"step {t}: exact tie {exact_twins} must go to the lower index, got {j}"
        near_ties += scores[j] != target
    return near_ties
