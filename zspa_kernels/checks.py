"""Argument validation for ``zspa::select_tokens``.

Every check here reads only shapes, dtypes, devices and Python scalars, so it
costs no host synchronisation and runs on fake tensors under ``torch.compile``.
Checks that must read tensor *values* (``lengths`` range on an accelerator,
non-finite prompts) live in :func:`check_values`, which the strict mode of the
Python API calls (and the CPU path always calls: there it is free).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .spec import BACKEND_CHOICES, RELEVANCE_MODES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_types(visual: torch.Tensor, prompt: torch.Tensor, k: int) -> None:
    """Python-type checks that the op schema would otherwise answer with a generic RuntimeError."""
    if not isinstance(visual, torch.Tensor):
        raise TypeError(f"visual: expected a torch.Tensor of shape (B, N, D), got {type(visual).__name__}")
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt: expected a torch.Tensor of shape (B, D) or (B, T, D), got {type(prompt).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k: expected an int >= 1, got {type(k).__name__}")


def check_args(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float,
    lengths: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    relevance: str,
    backend: str,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument."""
    check_types(visual, prompt, k)
    if visual.dim() != 3:
        raise ValueError(f"visual: expected 3 dims (B, N, D), got shape {tuple(visual.shape)}")
    B, N, D = visual.shape
    if B < 1 or N < 1 or D < 1:
        raise ValueError(f"visual: expected non-empty (B, N, D), got shape {tuple(visual.shape)}")
    if visual.dtype not in FLOAT_DTYPES:
        raise TypeError(f"visual: expected float32, float16 or bfloat16, got {_dtype_name(visual.dtype)}")
    if prompt.dim() not in (2, 3):
        raise ValueError(f"prompt: expected 2 dims (B, D) or 3 dims (B, T, D), got shape {tuple(prompt.shape)}")
    if prompt.dtype != visual.dtype:
        raise TypeError(
            f"prompt: expected the dtype of visual ({_dtype_name(visual.dtype)}), got {_dtype_name(prompt.dtype)}"
        )
    if prompt.device != visual.device:
        raise ValueError(f"prompt: expected a tensor on {visual.device} (the device of visual), got {prompt.device}")
    if prompt.shape[0] != B:
        raise ValueError(f"prompt: expected batch size {B} (from visual), got shape {tuple(prompt.shape)}")
    if prompt.shape[-1] != D:
        raise ValueError(f"prompt: expected feature size D={D} (from visual), got shape {tuple(prompt.shape)}")
    if prompt.dim() == 3 and prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected at least one text token, got shape {tuple(prompt.shape)}")

    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    if isinstance(core_ratio, bool) or not isinstance(core_ratio, (int, float)):
        raise TypeError(f"core_ratio: expected a float in [0, 1], got {type(core_ratio).__name__}")
    if math.isnan(core_ratio) or not 0.0 <= core_ratio <= 1.0:
        raise ValueError(f"core_ratio: expected a float in [0, 1], got {core_ratio}")

    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths: expected an int32/int64 tensor of shape ({B},), got {type(lengths).__name__}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths: expected dtype int32 or int64, got {_dtype_name(lengths.dtype)}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
        if lengths.device != visual.device:
            raise ValueError(f"lengths: expected a tensor on {visual.device} (the device of visual), got {lengths.device}")

    if prompt_mask is not None:
        if not isinstance(prompt_mask, torch.Tensor):
            raise TypeError(f"prompt_mask: expected a bool tensor of shape (B, T), got {type(prompt_mask).__name__}")
        if prompt.dim() != 3:
            raise ValueError("prompt_mask: only valid with a per-token prompt (B, T, D); prompt is pooled (B, D)")
        if prompt_mask.dtype != torch.bool:
            raise TypeError(f"prompt_mask: expected dtype bool, got {_dtype_name(prompt_mask.dtype)}")
        if tuple(prompt_mask.shape) != tuple(prompt.shape[:2]):
            raise ValueError(f"prompt_mask: expected shape {tuple(prompt.shape[:2])}, got {tuple(prompt_mask.shape)}")
        if prompt_mask.device != visual.device:
            raise ValueError(
                f"prompt_mask: expected a tensor on {visual.device} (the device of visual), got {prompt_mask.device}"
            )

    if relevance not in RELEVANCE_MODES:
        raise ValueError(f"relevance: expected one of {RELEVANCE_MODES}, got {relevance!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")


def check_values(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    lengths: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    strict: bool,
) -> None:
    """Checks that read tensor values (a host sync on accelerators).

    ``lengths`` must lie in ``[1, N]``. In strict mode, additionally every
    batch row must have a finite prompt and at least one valid prompt token.
    """
    N = visual.shape[1]
    if lengths is not None:
        bad = (lengths < 1) | (lengths > N)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"lengths: expected values in [1, {N}], got {int(lengths[row])} at row {row}")
    if not strict:
        return
    valid = prompt_mask if prompt_mask is not None else None
    finite = torch.isfinite(prompt)
    if prompt.dim() == 3:
        token_ok = finite.all(-1)
        if valid is not None:
            token_ok = token_ok | ~valid
            empty = ~valid.any(-1)
            if bool(empty.any()):
                row = int(empty.nonzero()[0, 0])
                raise ValueError(f"prompt_mask: row {row} has no valid prompt token (strict mode)")
        row_ok = token_ok.all(-1)
    else:
        row_ok = finite.all(-1)
    if not bool(row_ok.all()):
        row = int((~row_ok).nonzero()[0, 0])
        raise ValueError(f"prompt: row {row} holds a non-finite value (strict mode)")
