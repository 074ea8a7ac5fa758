"""Triton backend of ``zspa::select_tokens``.

Two launches per call (per batch group beyond the Gram budget): :mod:`.token_stats`, then
:mod:`.gram_select` (for "mean" with a per-token prompt, one more first:
:func:`.token_stats.pool_prompt`); :mod:`.gram_select` states the design and its floor, :mod:`.plan` picks
paths and block sizes; ``python -m zspa_kernels.triton.aot`` compiles them for a GPU
architecture without one.
"""
from .plan import LaunchPlan, launch_plan
from .select import select_tokens_triton

__all__ = ["select_tokens_triton", "launch_plan", "LaunchPlan"]
