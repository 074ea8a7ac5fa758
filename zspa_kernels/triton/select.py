"""``select_tokens_triton``: the backend entry point (scratch allocation and the launches).

Callable directly, for benchmarks: same arguments as every backend of the op,
``(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, pick_order)``,
no argument checks (the op does them). Scratch is ``torch.empty`` from the caching
allocator, sized from shapes only; nothing reads a value back to the host, so a call
can be captured in a CUDA graph.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from ..spec import gram_budget, triton_interpreter
from .gram_select import launch_gram_select
from .plan import LaunchPlan, async_copies_on, memoised_plan
from .token_stats import launch_token_stats, pool_prompt

# Triton decides between compiling and interpreting a kernel when it is decorated, i.e. when
# this package is imported; a later change of TRITON_INTERPRET would crash deep inside Triton.
KERNELS_INTERPRETED = triton_interpreter()


def int32_offsets(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``, or a contiguous copy where the kernels' int32 offsets within one batch row could
    pass 2^31 - 1. They index a row's features and prompt rows as ``index * stride`` in int32
    (the batch and token offsets are int64): an odd view, e.g. a (B, N, D) permute of a
    (D, B, N) buffer, has a feature stride of B·N, and D of them would wrap. Contiguous inputs
    keep every such offset below one row's element count, which for the prompt
    :func:`select_tokens_triton` requires to be under 2^31. The usual contiguous input is
    returned at once: this runs on every call, three times."""
    if t is None or t.is_contiguous():
        return t
    if sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:])) < 2**31:
        return t
    return t.contiguous()


class Scratch(NamedTuple):
    """The buffers of one call (:func:`allocate_scratch`)."""
    stats: tuple   # norm, scale (fp32), finite (int8), key (int64) of (rows, N); arrival counters (rows,) int32
    work: tuple    # Gram (rows, N, N), isolation partials (rows, tiles, N), rank partials (int32), state (rows, N)
    out: torch.Tensor    # (B, k) int64: returned
    order: torch.Tensor  # (B, min(k, N)) int64 pick order (``out`` itself when the call returns the pick order)


def allocate_scratch(plan: LaunchPlan, B: int, N: int, k: int, pick_order: bool, device: torch.device) -> Scratch:
    """Every buffer a call of :func:`select_tokens_triton` allocates (a per-token prompt's pooled
    vector aside: :func:`.token_stats.pool_prompt`), each a ``torch.empty`` of the caching
    allocator sized from shapes only, for ``plan.rows_per_launch`` rows (batch groups reuse
    them). Nothing is read before a launch writes it (``tests/test_triton.py`` poisons them).
    ``bench/profile.py`` times this alone (``host_scratch_us``): its share of a call's host time."""
    rows = plan.rows_per_launch

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    stats = (empty(rows, N), empty(rows, N), empty(rows, N, dtype=torch.int8),
             empty(rows, N, dtype=torch.int64), empty(rows, dtype=torch.int32))
    unused = stats[0]  # pointer argument of a disabled path: never dereferenced
    gram = empty(rows, N, N) if plan.path == "gram" else unused
    iso = empty(rows, plan.tiles, N) if plan.need_isolation else unused
    work = (gram, iso, empty(rows, plan.tiles, N, dtype=torch.int32), empty(rows, N))
    out = empty(B, k, dtype=torch.int64)  # every element written by the selection launch (-1 padded)
    order = out if pick_order else empty(B, min(k, N), dtype=torch.int64)
    return Scratch(stats, work, out, order)


def select_tokens_triton(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float,
    lengths: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    relevance: str,
    pick_order: bool,
    plan: Optional[LaunchPlan] = None,
) -> torch.Tensor:
    """``(B, k)`` int64: the pick order, or the ascending kept indices; ``-1`` padded.

    ``plan`` overrides :func:`.plan.launch_plan` (tests and benchmarks force paths and
    block sizes with ``dataclasses.replace(launch_plan(...), ...)``).
    """
    interpreted = triton_interpreter()
    if interpreted != KERNELS_INTERPRETED:
        state = "on" if KERNELS_INTERPRETED else "off"
        raise RuntimeError(f"TRITON_INTERPRET: the Triton kernels were loaded with the interpreter {state}; "
                           "set TRITON_INTERPRET before the first Triton call (or import of zspa_kernels.triton)")
    B, N, D = visual.shape
    if prompt.dim() == 3 and prompt.shape[1] * D > 2**31:  # even contiguous, t·D + d would wrap
        raise ValueError(f"prompt: {prompt.shape[1]} rows of {D} features a batch row; the triton backend "
                         "addresses a row's prompt with 32-bit offsets (at most 2^31 elements): use "
                         "backend='cuda', or with relevance='mean' pass the pooled (B, D) prompt")
    visual, prompt, prompt_mask = int32_offsets(visual), int32_offsets(prompt), int32_offsets(prompt_mask)
    if plan is None:
        plan = memoised_plan(B, N, D, visual.dtype, k, core_ratio, lengths is not None, relevance, gram_budget(),
                             interpreted, async_copies_on(visual.device))

    rows = plan.rows_per_launch
    stats, work, out, order = allocate_scratch(plan, B, N, k, pick_order, visual.device)

    def part(t, group):  # one group (the usual case): the tensor itself, no view to build
        return t if t is None or rows >= B else t[group]

    # Triton launches on the current device: make it the tensors' one (cuda:1 inputs, say).
    with torch.cuda.device(visual.device) if visual.is_cuda else contextlib.nullcontext():
        if relevance == "mean" and prompt.dim() == 3 and (prompt.shape[1] > 1 or prompt_mask is not None):
            prompt, prompt_mask = pool_prompt(prompt, prompt_mask, plan), None  # once, not in every CTA
        # Batch groups reuse the scratch: launches on one stream run in order.
        for b0 in range(0, B, rows):
            group = slice(b0, min(B, b0 + rows))
            launch_token_stats(part(visual, group), part(prompt, group), part(prompt_mask, group),
                               part(lengths, group), *stats, relevance, plan)
            launch_gram_select(part(visual, group), part(lengths, group), stats, work, part(order, group),
                               part(out, group), k, core_ratio, pick_order, plan)
    return out
