"""Reference backend: the executable form of the ZSPAPrune selection (SPEC §1).

Readable PyTorch that runs on any device and is the CPU path users get. It is
batched over rows; the greedy loop is ``k`` vectorised steps, each one batched
mat-vec ``(B, N, D) x (B, D)`` against the token picked at that step, so the
``N x N`` Gram matrix is never materialised (except in row chunks for the
alpha = 0 seed).

Cost, with ``B`` rows of ``N`` tokens of width ``D`` and budget ``k``:
  * memory: one fp32 copy of the normalised tokens, ``4·B·N·D`` bytes, plus O(B·N);
  * work: ``2·B·N·D`` FLOPs for relevance, ``2·B·k·N·D`` for the greedy loop,
    plus ``2·B·N²·D`` for the most-isolated seed when ``k_core = 0``;
  * traffic: the loop re-reads the ``B·N·D`` fp32 tokens once per pick, which is
    what makes it slow on GPUs (the fused kernels keep state on chip instead).
On a 2-core CPU, B=1, N=576, D=4096, k=64 takes a few tens of milliseconds.

Conventions for special values (no host synchronisation anywhere):
  * a token with any non-finite feature gets relevance ``NONFINITE_RELEVANCE``
    (below every finite cosine) and redundancy ``NONFINITE_SIMILARITY`` (above
    every finite cosine): it is picked only when no finite token is left;
  * a zero vector normalises to zero and has cosine 0 to everything;
  * a prompt vector with a non-finite value, or a row without any valid prompt
    token, acts as a zero vector (relevance 0 everywhere; strict mode rejects it).
"""
from __future__ import annotations

from typing import Optional

import torch

NORM_EPS = 1e-6
NONFINITE_RELEVANCE = -2.0
NONFINITE_SIMILARITY = 2.0
SEED_CHUNK_ROWS = 1024


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 unit rows ``x / max(||x||, 1e-6)``; non-finite rows become zero.

    Returns ``(unit_rows, finite)`` where ``finite`` flags rows without NaN/Inf.
    """
    x = x.float()
    finite = torch.isfinite(x).all(-1)
    x = torch.where(finite.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS), finite


def budgets(k: int, core_ratio: float, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k_b = min(k, n)`` and ``k_core = clamp(floor(alpha·k_b + 0.5), 0, k_b)``, per row."""
    k_b = n.clamp(max=k)
    k_core = torch.floor(core_ratio * k_b.double() + 0.5).long()
    return k_b, torch.minimum(k_core.clamp_min(0), k_b)


def relevance_scores(
    v_hat: torch.Tensor, prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], mode: str
) -> torch.Tensor:
    """Cosine relevance ``r`` of every token to the prompt, ``(B, N)`` fp32."""
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(1)
    p = prompt.float()
    B, T, _ = p.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=p.device) if prompt_mask is None else prompt_mask
    if mode == "mean":
        # Mean-pool the valid rows, then normalise (the paper's rule).
        count = valid.sum(-1, keepdim=True).clamp_min(1).float()
        # where, not a product: a masked-out row must not leak NaN into the pool.
        pooled = torch.where(valid.unsqueeze(-1), p, torch.zeros((), device=p.device)).sum(1) / count
        p_hat, _ = normalize_rows(pooled)
        return torch.einsum("bnd,bd->bn", v_hat, p_hat)
    p_hat, _ = normalize_rows(p)
    sims = torch.einsum("bnd,btd->bnt", v_hat, p_hat)
    sims = sims.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(-1)
    return torch.where(valid.any(-1, keepdim=True), sims, torch.zeros_like(sims))


def isolation_scores(v_hat: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """``max_{j != i, j usable} v̂_i · v̂_j`` per token (``-inf`` when no such j), in row chunks."""
    B, N, _ = v_hat.shape
    out = torch.empty(B, N, dtype=torch.float32, device=v_hat.device)
    cols = torch.arange(N, device=v_hat.device)
    for start in range(0, N, SEED_CHUNK_ROWS):
        stop = min(start + SEED_CHUNK_ROWS, N)
        sims = torch.einsum("bid,bjd->bij", v_hat[:, start:stop], v_hat)
        exclude = ~usable.unsqueeze(1) | (cols[start:stop, None] == cols[None, :]).unsqueeze(0)
        out[:, start:stop] = sims.masked_fill(exclude, float("-inf")).amax(-1)
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
    v_hat, finite = normalize_rows(visual)
    usable = in_row & finite
    k_b, k_core = budgets(k, core_ratio, n)

    # Core: stable descending sort, so equal relevance keeps the lower index first.
    r = relevance_scores(v_hat, prompt, prompt_mask, relevance)
    r = torch.where(finite, r, torch.full_like(r, NONFINITE_RELEVANCE))
    r = r.masked_fill(~in_row, float("-inf"))
    core_order = torch.sort(r, dim=1, descending=True, stable=True).indices[:, : min(k, N)]

    # s: similarity to the selected set. Before the first pick it holds the isolation
    # score, so that for k_core = 0 the first argmin is the most isolated token. Whether
    # some row can have k_core = 0 is decided on the host from a lower bound on n.
    if core_ratio * min(k, N if lengths is None else 1) < 0.5:
        s = isolation_scores(v_hat, usable)
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
        sim = torch.einsum("bnd,bd->bn", v_hat, v_hat[rows, pick])
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
