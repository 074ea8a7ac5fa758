"""The ``cuda`` backend: ``csrc/`` kernels, built on first use (see :mod:`.builder`).

When no CUDA toolkit is installed :func:`extension_available` warns once and says
so; :mod:`.dispatch` then runs the Triton backend instead, so ``backend="cuda"``
never fails for want of nvcc. A toolkit that is present but fails to compile
``csrc/`` is a bug and raises.
"""
from __future__ import annotations

import warnings

import torch

from . import builder
from .spec import cuda_greedy, cuda_gram, gram_budget

_fallback_reason: list[str] = []


def extension_available() -> bool:
    """Load (building if needed) the extension; False, with one warning, when no toolkit exists."""
    if builder.is_loaded(builder.CUDA_EXTENSION):
        return True
    if _fallback_reason:
        return False
    try:
        builder.load(builder.CUDA_EXTENSION)
        return True
    except builder.CudaToolkitMissing as exc:
        _fallback_reason.append(str(exc))
        warnings.warn(f"zspa: backend 'cuda' unavailable ({exc}); using backend 'triton' instead",
                      RuntimeWarning, stacklevel=3)
        return False


def select_tokens_cuda(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, pick_order):
    """Backend entry point: ``torch.ops.zspa.select_tokens_cuda`` (the extension is loaded)."""
    return torch.ops.zspa.select_tokens_cuda(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance,
                                             pick_order, gram_budget(), cuda_greedy(), cuda_gram())
