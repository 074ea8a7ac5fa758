"""``select_tokens_triton``: the backend entry point (scratch allocation and the launches).

Callable directly, for benchmarks: same arguments as every backend of the op,
``(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, pick_order)``,
no argument checks (the op does them). Scratch is ``torch.empty`` from the caching
allocator, sized from shapes only; nothing reads a value back to the host, so a call
can be captured in a CUDA graph.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .gram_select import launch_gram_select
from .plan import LaunchPlan, launch_plan
from .token_stats import launch_token_stats


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
    B, N, D = visual.shape
    if plan is None:
        plan = launch_plan(B, N, D, visual.dtype, k, core_ratio, lengths is not None)

    rows = plan.rows_per_launch

    def scratch(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=visual.device)

    stats = (scratch(rows, N), scratch(rows, N, dtype=torch.int8), scratch(rows, N, dtype=torch.int64),
             scratch(rows, dtype=torch.int32))
    unused = stats[0]  # pointer argument of a disabled path: never dereferenced
    gram = scratch(rows, N, N) if plan.path == "gram" else unused
    iso = scratch(rows, plan.tiles, N) if plan.need_isolation else unused
    work = (gram, iso, scratch(rows, plan.tiles, N, dtype=torch.int32), scratch(rows, N))
    out = scratch(B, k, dtype=torch.int64)
    order = out if pick_order else scratch(B, k, dtype=torch.int64)

    def part(t, group):
        return None if t is None else t[group]

    # Triton launches on the current device: make it the tensors' one (cuda:1 inputs, say).
    with torch.cuda.device(visual.device) if visual.is_cuda else contextlib.nullcontext():
        # Batch groups reuse the scratch: launches on one stream run in order.
        for b0 in range(0, B, rows):
            group = slice(b0, min(B, b0 + rows))
            launch_token_stats(visual[group], prompt[group], part(prompt_mask, group), part(lengths, group),
                               *stats, relevance, plan)
            launch_gram_select(visual[group], part(lengths, group), stats, work, order[group], out[group],
                               k, core_ratio, pick_order, plan)
    return out
