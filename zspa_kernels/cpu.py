"""CPU backend (``backend="cpu"``, what ``auto`` runs on CPU tensors): ``csrc/cpu/`` kernels.

What must move, per row of ``n`` tokens of width ``D``, budget ``k_b`` of which ``k_core``
by relevance, ``g = k_b - k_core`` greedy steps:
  * one read of the input tokens, in which each token is normalised, dotted with the
    prompt's unit vector(s) (relevance) and written back as an fp16 unit vector (``2·n·D``
    bytes: 4.7 MB at N=576, D=4096, which stays in L3);
  * the core's similarities: ``n x k_core`` dots, the fp16 tokens read once more;
  * then ``g`` DEPENDENT steps (each needs the previous argmin): one sweep over the fp16
    tokens that raises each running max similarity and finds the next argmin.
Floor: ``(g + 2)`` reads of ``2·n·D`` bytes at the bandwidth of the cache level that holds
them; the steps dominate (31 at LLaVA-1.5 with k=64), so the per-step latency does. The
PyTorch loops it replaces read fp32 tokens (twice the bytes) through several kernels per step.

Precision: relevance and the core's order are fp32 like the reference (``spec.CORE_TOLERANCE``; the norm's
and the relevance's sums run in double, so that no fp32 accumulator runs D/16 terms long); the
isolation seed (a row without a core) and the greedy similarities are dots of a candidate's fp16-rounded
unit vector with a query's fp32 one (the core's tokens, then each pick, recomputed from ``visual`` by
pass 1's arithmetic: ``D`` operations a step beside the sweep's ``n·D``). Each fp16 unit component is off
by at most 2^-11 relative, so a cosine is off by at most ``2^-11·Σ|a_i b_i| <= 2^-11`` to first order.
The dots' own rounding adds at most ``66·2^-24`` (an fp32 lane sums at most 64 exact FMA products before
its sum moves to a double lane, then one rounding to fp32). The isolation seed's ``N²`` cosines are an fp32
BLAS GEMM instead, whose K loop rounds in the library's order: there the bound holds to first order, with
that GEMM's rounding (``~sqrt(D)·2^-24`` on real features) beside it.
A pick compares two such scores (each a running max of cosines, off by no more than they are), one
perhaps low and the other high, so it may differ from fp64 only between candidates whose scores are
within ``2^-10 + 2^-16``, :data:`GREEDY_TOLERANCE`. The tests replay every pick against fp64: one test's
tokens sit at fp16 rounding midpoints so that a pick lands past 2^-11 from the best; another's have long
tails of tiny products, which lanes summing D/16 terms in fp32 lost (a pick 1.1·2^-10 from the best).
With both sides rounded (this backend's queries until 2026-12-07) the first-order bound was twice that:
fp16 queries picked 1.8·2^-10 from the best in a case that a test holds right now.

Threads: rows in parallel when ``B`` is at least the thread count, else each sweep is split
over token chunks (``at::parallel_for``). The kernels compile on first use, with one line on
stderr (:mod:`.builder`, ``CPU_EXTENSION``); without a compiler the backend warns once and runs ``reference``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .reference import (Scaled, ascending_from_order, isolation_scores, mean_pool, row_budgets, scaled_rows,
                        select_tokens_reference_op)
from .spec import (NONFINITE_RELEVANCE, NONFINITE_SIMILARITY, NORM_EPS, PICK_TOLERANCE, SCALE_EXP_MAX, SCALE_EXP_MIN,
                   may_need_isolation)

GREEDY_TOLERANCE = PICK_TOLERANCE["cpu"]  # 2^-10 + 2^-16: the bound derived above
_unavailable: list[str] = []


def kernels_available() -> bool:
    """Load (building if needed) the CPU kernels; False, with one warning, when they cannot be built."""
    if _unavailable:
        return False
    from . import builder

    try:
        builder.load(builder.CPU_EXTENSION)
        return True
    except (builder.BuildFailed, OSError) as exc:
        _unavailable.append(str(exc))
        warnings.warn(f"zspa: backend 'cpu' unavailable ({exc}); using backend 'reference' instead",
                      RuntimeWarning, stacklevel=3)
        return False


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b.transpose(1, 2))


def first_copies(rows: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: for each row ``i`` of ``rows`` ``(B, N, F)``, the lowest index of a row equal to it
    in its batch row (``i`` itself when it has no copy before it)."""
    B, N, _ = rows.shape
    index = torch.arange(N)
    first = torch.empty(B, N, dtype=torch.long)
    for b in range(B):
        _, group = torch.unique(rows[b], dim=0, return_inverse=True)
        first[b] = torch.full((N,), N).scatter_reduce(0, group, index, "amin")[group]
    return first


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x / max(‖x‖, NORM_EPS)``, overflow-safe (the reference's scaling); non-finite rows are zero."""
    scaled = scaled_rows(x)
    return scaled.rows / scaled.norm


def prompt_units(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], relevance: str):
    """fp32 unit prompt vectors ``(B, T', D)`` and which count ``(B, T')``: the mean-pooled valid
    rows (``T' = 1``) for ``"mean"``, every row under its mask for ``"max"`` (as the reference)."""
    p = prompt.float() if prompt.dim() == 3 else prompt.float().unsqueeze(1)
    valid = torch.ones(p.shape[:2], dtype=torch.bool) if prompt_mask is None else prompt_mask
    if relevance == "mean":
        return unit_rows(mean_pool(p, valid)).unsqueeze(1).contiguous(), torch.ones(p.shape[0], 1, dtype=torch.bool)
    return unit_rows(p).contiguous(), valid.contiguous()


def select_tokens_cpu(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float,
    lengths: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    relevance: str,
    pick_order: bool,
) -> torch.Tensor:
    """Backend entry point of the op: pick order, or ascending kept indices; ``-1`` padded."""
    if not kernels_available():
        return select_tokens_reference_op(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, pick_order)
    B, N, _ = visual.shape
    p_hat, p_valid = prompt_units(prompt, prompt_mask, relevance)
    visual = visual.contiguous()
    isolation = may_need_isolation(k, core_ratio, N, lengths is not None)  # a row may start from its most isolated token
    unit16, scores, finite, unit32 = torch.ops.zspa.cpu_unit_tokens(visual, p_hat, p_valid, NORM_EPS, NONFINITE_RELEVANCE,
                                                                    SCALE_EXP_MIN, SCALE_EXP_MAX, isolation)
    n = torch.full((B,), N, dtype=torch.long) if lengths is None else lengths.long().clamp(1, N)
    k_b, k_core = row_budgets(k, core_ratio, n, N)
    seed = None
    if isolation:
        # Cosines of the fp16 unit tokens with the fp32 ones (pass 1's, as the greedy steps' queries), by an
        # fp32 BLAS GEMM (in double it took 2.3x as long at LLaVA-1.5's shape), whose K loop rounds in the
        # library's order. BLAS rounds an output by its position (the reference's fixed-order sums cost
        # ~25x here): copies of a token take their first copy's seed, so that their exact tie stays exact.
        ones = torch.ones(B, N, 1)
        seed = isolation_scores(Scaled(unit16.float(), ones, finite), finite & (torch.arange(N) < n.unsqueeze(1)),
                                products=_matmul, against=Scaled(unit32, ones, finite))
        seed = seed.gather(1, first_copies(torch.cat([unit16, (~finite).unsqueeze(-1).to(unit16.dtype)], -1)))
        seed.masked_fill_(~finite, NONFINITE_SIMILARITY)
    order = torch.ops.zspa.cpu_greedy(visual, unit16, scores, finite, n, k_b, k_core, seed, k, NONFINITE_SIMILARITY,
                                      NORM_EPS, SCALE_EXP_MIN, SCALE_EXP_MAX)
    return order if pick_order else ascending_from_order(order, N)
