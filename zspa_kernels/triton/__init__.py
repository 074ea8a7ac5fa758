"""Triton backend of ``zspa::select_tokens``: two launches per call, see :mod:`.gram_select`."""
from .plan import GRAM_BUDGET_ENV, LaunchPlan, launch_plan
from .select import select_tokens_triton

__all__ = ["select_tokens_triton", "launch_plan", "LaunchPlan", "GRAM_BUDGET_ENV"]
