"""Reference backend: the executable form of the ZSPAPrune selection (SPEC §1).

Readable PyTorch that runs on any device (``auto`` falls back to it on CPUs where the
``cpu`` backend's kernels cannot be built). It is batched over rows; the greedy loop is
``k`` vectorised steps, each the dot products of every token with the token picked at that
step, so the ``N x N`` Gram matrix is never materialised (except in row chunks for the
alpha = 0 seed).

Cost, with ``B`` rows of ``N`` tokens of width ``D`` and budget ``k``: one fp32 copy of
the tokens (``4·B·N·D`` bytes); ``2·B·N·D`` FLOPs of relevance, ``2·B·k·N·D`` for the greedy
loop, plus ``2·B·N²·D`` for the most-isolated seed when some ``k_core`` may be 0. Each
dot product's terms are written out and summed in halves (:func:`dots`), so every pick
moves the tokens, their products and the partial sums: ~4x the bytes of a mat-vec, which
is what makes it slow (the kernels do the same arithmetic in one pass).

Norms are overflow-safe and cosines are formed as in the kernels (see ``spec``): tokens
scaled by a power of two, ``cos(i, j) = (y_i·y_j) / (n_i·n_j)`` with clamped norms ``n``.
Dividing the dot product (not each element) keeps an exact tie exact, also for tokens
whose norm is below ``NORM_EPS``. Every dot product is summed in one fixed order
(:func:`dots`), not by a matrix product: a BLAS sums an output in an order that depends on
its position (a CPU GEMM's or GEMV's edge rows run another micro-kernel), so two identical
tokens could get different bits and an exact tie between them go to the higher index.

Conventions for special values (no host synchronisation anywhere):
  * a token with any non-finite feature gets relevance ``NONFINITE_RELEVANCE``
    (below every finite cosine) and redundancy ``NONFINITE_SIMILARITY`` (above
    every finite cosine): it is picked only when no finite token is left;
  * a zero vector normalises to zero and has cosine 0 to everything;
  * a prompt vector with a non-finite value, or a row without any valid prompt
    token, acts as a zero vector (relevance 0 everywhere; strict mode rejects it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .spec import (NONFINITE_RELEVANCE, NONFINITE_SIMILARITY, NORM_EPS, SCALE_EXP_MAX, SCALE_EXP_MIN,
                   core_count, may_need_isolation, pool_shift)
from .spec import row_budgets as spec_row_budgets

SEED_CHUNK_ROWS = 1024
DOT_CHUNK_ELEMENTS = 1 << 24  # products held at once by dots(): 64 MiB of fp32


@dataclasses.dataclass
class Scaled:
    """Rows ``y = x·2**-e`` (exact) and their clamped norms ``max(‖y‖, NORM_EPS·2**-e)``, ``(..., 1)``:
    ``cos(i, j) = (y_i·y_j) / (norm_i·norm_j)`` without overflow. Non-finite rows become zero."""
    rows: torch.Tensor
    norm: torch.Tensor
    finite: torch.Tensor


def scaled_rows(x: torch.Tensor) -> Scaled:
    x = x.float()
    finite = torch.isfinite(x).all(-1)
    x = torch.where(finite.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    exponent = torch.frexp(x.abs().amax(-1, keepdim=True)).exponent.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX)
    scale = torch.exp2(-exponent.float())  # a normal power of two: the products below are exact
    y = x * scale
    # A fixed-order pairwise sum of the squares: its error grows with log2(D), where a library's norm may
    # accumulate long runs (4.8e-5 off on an adversarial token at D = 16384, past spec.CORE_TOLERANCE).
    norm = torch.maximum(pairwise_sum(y * y).sqrt().unsqueeze(-1), NORM_EPS * scale)
    return Scaled(y, norm, finite)


def row_budgets(k: int, core_ratio: float, n: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_b, k_core)`` per row of ``n <= N`` tokens, looked up in a table of
    :func:`spec.core_count` over the ``min(k, N) + 1`` possible ``k_b`` (no restated rule)."""
    k_b = n.clamp(max=k)
    table = [core_count(core_ratio, kb) for kb in range(min(k, N) + 1)]
    return k_b, torch.tensor(table, dtype=torch.long, device=n.device)[k_b]


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in an order fixed by its length alone: halves added
    elementwise until one value is left (an odd length carries its last element to the next
    round). Each addition is one IEEE rounding of the same operands on any device, library or
    position, and the error grows with log2 of the length."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        pairs = x[..., :half] + x[..., half:2 * half]
        x = torch.cat([pairs, x[..., 2 * half:]], -1) if x.shape[-1] % 2 else pairs
    return x[..., 0]


def dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, I, D) x (B, J, D) -> (B, I, J)``: every dot product of a row of ``a`` with a row
    of ``b`` as :func:`pairwise_sum` of its products, so it depends on the two rows alone (and
    is symmetric: products commute). Rows of ``a`` in chunks of at most DOT_CHUNK_ELEMENTS products."""
    B, I, D = a.shape
    J = b.shape[1]
    step = max(1, DOT_CHUNK_ELEMENTS // max(1, B * J * D))
    return torch.cat([pairwise_sum(a[:, i:i + step, None, :] * b[:, None, :, :]) for i in range(0, I, step)], 1)


def cosines(a: Scaled, b: Scaled, products=dots) -> torch.Tensor:
    """Cosine of every row of ``a`` ``(B, I, D)`` with every row of ``b`` ``(B, J, D)``: their dot
    products (``products(a, b)``, :func:`dots` unless given) over the product of their norms, ``(B, I, J)``."""
    return products(a.rows, b.rows) / (a.norm * b.norm.transpose(1, 2))


def mean_pool(prompt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 mean of the valid rows of ``prompt`` ``(B, T, D)`` (the paper's pooling), ``(B, D)``;
    zero for a row without any; a feature whose fp32 sum of finite values overflows pooled from
    rows scaled by ``2**-k`` (:func:`spec.pool_shift`). ``where``, not a product: a masked-out row
    must not leak NaN."""
    count = valid.sum(-1, keepdim=True).clamp_min(1).float()
    rows = torch.where(valid.unsqueeze(-1), prompt.float(), torch.zeros((), device=prompt.device))
    mean = rows.sum(1) / count
    k = pool_shift(prompt.shape[1])
    scaled = (rows * 2.0**-k).sum(1) / count
    largest = torch.finfo(torch.float32).max
    rescaled = torch.where(scaled.isfinite(), (scaled * 2.0**k).clamp(-largest, largest), scaled)
    return torch.where(mean.isfinite(), mean, rescaled)


def relevance_scores(tokens: Scaled, prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor],
                     mode: str) -> torch.Tensor:
    """Cosine relevance ``r`` of every token to the prompt, ``(B, N)`` fp32."""
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(1)
    p = prompt.float()
    B, T, _ = p.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=p.device) if prompt_mask is None else prompt_mask
    if mode == "mean":  # mean-pool the valid rows, then normalise (the paper's rule)
        return cosines(tokens, scaled_rows(mean_pool(p, valid).unsqueeze(1)))[..., 0]
    sims = cosines(tokens, scaled_rows(p))
    sims = sims.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(-1)
    return torch.where(valid.any(-1, keepdim=True), sims, torch.zeros_like(sims))


def isolation_scores(tokens: Scaled, usable: torch.Tensor, products=dots, against: Optional[Scaled] = None) -> torch.Tensor:
    """``max_{j != i, j usable} cos(i, j)`` per token (``-inf`` when no such j), in row chunks;
    ``products`` as for :func:`cosines`; ``against``: the tokens ``j`` as another rounding of ``tokens``
    (the cpu backend's fp32 units against its fp16 ones), ``tokens`` themselves unless given."""
    against = tokens if against is None else against
    B, N, _ = tokens.rows.shape
    out = torch.empty(B, N, dtype=torch.float32, device=tokens.rows.device)
    cols = torch.arange(N, device=tokens.rows.device)
    for start in range(0, N, SEED_CHUNK_ROWS):
        stop = min(start + SEED_CHUNK_ROWS, N)
        chunk = Scaled(tokens.rows[:, start:stop], tokens.norm[:, start:stop], tokens.finite[:, start:stop])
        exclude = ~usable.unsqueeze(1) | (cols[start:stop, None] == cols[None, :]).unsqueeze(0)
        out[:, start:stop] = cosines(chunk, against, products).masked_fill(exclude, float("-inf")).amax(-1)
    return out


def select_tokens_reference(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float,
    lengths: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    relevance: str,
) -> torch.Tensor:
    """Pick order ``(B, k)`` int64: core by falling relevance, then diversity picks; ``-1`` padded."""
    B, N, _ = visual.shape
    device = visual.device
    idx = torch.arange(N, device=device)
    n = torch.full((B,), N, dtype=torch.long, device=device) if lengths is None else lengths.long().clamp(1, N)
    in_row = idx.unsqueeze(0) < n.unsqueeze(1)  # (B, N) valid prefix
    tokens = scaled_rows(visual)
    finite = tokens.finite
    usable = in_row & finite
    k_b, k_core = row_budgets(k, core_ratio, n, N)

    # Core: stable descending sort, so equal relevance keeps the lower index first.
    r = relevance_scores(tokens, prompt, prompt_mask, relevance)
    r = torch.where(finite, r, torch.full_like(r, NONFINITE_RELEVANCE))
    r = r.masked_fill(~in_row, float("-inf"))
    core_order = torch.sort(r, dim=1, descending=True, stable=True).indices[:, : min(k, N)]

    # s: similarity to the selected set. Before the first pick it holds the isolation
    # score, so that for k_core = 0 the first argmin is the most isolated token. Whether
    # some row can have k_core = 0 is decided on the host, from shapes only.
    if may_need_isolation(k, core_ratio, N, lengths is not None):
        s = isolation_scores(tokens, usable)
        s = torch.where(finite, s, torch.full_like(s, NONFINITE_SIMILARITY))
    else:
        s = torch.zeros(B, N, device=device)
    taken = ~in_row
    order = torch.full((B, k), -1, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    for t in range(min(k, N)):
        greedy = s.masked_fill(taken, float("inf")).argmin(1)
        pick = torch.where(t < k_core, core_order[:, t], greedy)
        active = t < k_b
        order[:, t] = torch.where(active, pick, torch.full_like(pick, -1))
        taken = taken | ((idx.unsqueeze(0) == pick.unsqueeze(1)) & active.unsqueeze(1))
        picked = Scaled(tokens.rows[rows, pick, None], tokens.norm[rows, pick, None], finite[rows, pick, None])
        sim = cosines(tokens, picked)[..., 0]
        sim = torch.where(finite, sim, torch.full_like(sim, NONFINITE_SIMILARITY))
        s = sim if t == 0 else torch.maximum(s, sim)
    return order


def ascending_from_order(order: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Kept indices in ascending (spatial) order with ``-1`` padding at the end."""
    padded = torch.where(order < 0, torch.full_like(order, n_tokens), order)
    ascending = padded.sort(dim=1).values
    return torch.where(ascending == n_tokens, torch.full_like(ascending, -1), ascending)


def select_tokens_reference_op(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, pick_order):
    """Backend entry point of the op: pick order, or ascending kept indices."""
    order = select_tokens_reference(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance)
    return order if pick_order else ascending_from_order(order, visual.shape[1])


def parting_gap(visual: torch.Tensor, prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], relevance: str,
                k: int, core_ratio: float, order_a: torch.Tensor, order_b: torch.Tensor) -> Optional[tuple[int, float]]:
    """Where two pick orders of ONE row part, and how close a call it was there, in fp64: ``(t, gap)``,
    ``t`` the first step whose picks differ and ``gap`` the difference of those two picks' scores at
    that step (relevance in the core, else the similarity to the picks before; the most isolated
    seed where there are none), given the picks they share before it; None where they agree.

    ``visual`` ``(n, D)`` holds the row's valid tokens, ``prompt`` ``(T, D)`` or ``(D,)`` with its
    ``(T,)`` mask, as the op takes them. A backend's pick may part from fp64's only where the gap is
    within its rounding (``spec.PICK_TOLERANCE``): a genuine near-tie. Non-finite tokens score
    ``-inf`` relevance and ``+inf`` similarity (a gap with one is infinite)."""
    n = visual.shape[0]
    k_b, k_core = spec_row_budgets(k, core_ratio, n)
    a, b = order_a[:k_b].tolist(), order_b[:k_b].tolist()
    t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if t is None:
        return None

    def as_unit(p):  # fp64 unit rows on the host; a non-finite row acts as a zero vector
        p = p.detach().to("cpu", torch.float64)
        p = torch.where(torch.isfinite(p).all(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype))
        return p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(NORM_EPS)

    # Only the two parting picks are scored, against what they are scored by: O(t·D), or O(N·D) for the
    # most isolated seed.
    pair = torch.tensor([a[t], b[t]])
    picks = visual[pair.to(visual.device)]
    finite, unit = torch.isfinite(picks).all(-1).cpu(), as_unit(picks)
    if t < k_core:
        p = prompt.detach().to("cpu", torch.float64).reshape(-1, visual.shape[1])
        valid = (torch.ones(p.shape[0], dtype=torch.bool) if prompt_mask is None or prompt.dim() == 1
                 else prompt_mask.detach().to("cpu", torch.bool))
        if not valid.any():
            scores = torch.zeros(2, dtype=torch.float64)
        elif relevance == "mean":
            scores = unit @ as_unit(p[valid].mean(0))
        else:
            scores = (unit @ as_unit(p[valid]).T).amax(-1)
        scores = scores.masked_fill(~finite, -math.inf)
    else:
        if t == 0:  # no core: the most isolated token seeds the picks
            others = torch.isfinite(visual).all(-1).cpu()[None, :] & (torch.arange(n)[None, :] != pair[:, None])
            scores = (unit @ as_unit(visual).T).masked_fill(~others, -math.inf).amax(-1)
        else:
            scores = (unit @ as_unit(visual[torch.tensor(a[:t]).to(visual.device)]).T).amax(-1)
        scores = scores.masked_fill(~finite, math.inf)
    x, y = float(scores[0]), float(scores[1])
    return t, (0.0 if x == y else abs(x - y))
