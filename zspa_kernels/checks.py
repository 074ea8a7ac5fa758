"""Argument validation for ``zspa::select_tokens``, each check once per call.

* :func:`check_python_types` (the Python API only): Python types that the op's schema
  would answer with the dispatcher's generic ``RuntimeError``, or silently convert
  (``k=True`` arrives at the op as ``1``; the op itself cannot tell them apart).
* :func:`check_args` (the op's kernel): shapes, dtypes, devices and scalar ranges. It
  reads no tensor value, so it costs no host sync and runs on fake tensors too.
* :func:`check_lengths_range` (the op on CPU, where it is free; the strict mode of the
  API elsewhere) and :func:`check_prompt_values` (strict mode): they read tensor values.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .spec import BACKEND_CHOICES, MAX_K, RELEVANCE_MODES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _type_error(name: str, expected: str, value) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got {type(value).__name__}")


def _check_option_types(core_ratio, relevance, backend) -> None:
    if isinstance(core_ratio, bool) or not isinstance(core_ratio, numbers.Real):  # numpy's too
        raise _type_error("core_ratio", "a float in [0, 1]", core_ratio)
    if not isinstance(relevance, str):
        raise _type_error("relevance", f"one of {RELEVANCE_MODES}", relevance)
    if not isinstance(backend, str):
        raise _type_error("backend", f"one of {BACKEND_CHOICES}", backend)


def _as_float(value: numbers.Real) -> float:
    """``float(value)``, infinite for an int past float's range (which ``float`` refuses with an OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _check_option_values(core_ratio: float, relevance: str, backend: str) -> None:
    ratio = _as_float(core_ratio)
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"core_ratio: expected a float in [0, 1], got {core_ratio}")
    if relevance not in RELEVANCE_MODES:
        raise ValueError(f"relevance: expected one of {RELEVANCE_MODES}, got {relevance!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")


def check_options(core_ratio, relevance, backend) -> None:
    """Types and values of the selection's options, for callers that take them long before
    the op runs (``prune()``), so that a bad option fails at once with the op's message."""
    _check_option_types(core_ratio, relevance, backend)
    _check_option_values(core_ratio, relevance, backend)


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: expected an int in [1, 2**31 - 1], got {k}")


def _check_dense(name: str, tensor: Optional[torch.Tensor]) -> None:
    if tensor is not None and tensor.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {tensor.layout}")


def check_python_types(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend,
                       pick_order, strict) -> None:
    """``TypeError`` naming the first argument of a Python type the op cannot take as meant."""
    if not isinstance(visual, torch.Tensor):
        raise _type_error("visual", "a torch.Tensor of shape (B, N, D)", visual)
    if not isinstance(prompt, torch.Tensor):
        raise _type_error("prompt", "a torch.Tensor of shape (B, D) or (B, T, D)", prompt)
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)):  # numpy's too
        raise _type_error("k", "an int >= 1", k)
    # Values the schema (int64 k) or the API (float(core_ratio)) would fail on with a generic error: an int out of range.
    if not isinstance(k, torch.SymInt) and not -2**63 <= k < 2**63:
        _check_k(k)
    _check_option_types(core_ratio, relevance, backend)
    if isinstance(core_ratio, numbers.Integral) and not 0 <= core_ratio <= 1:
        _check_option_values(core_ratio, relevance, backend)
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        raise _type_error("lengths", "None or an int32/int64 tensor of shape (B,)", lengths)
    if prompt_mask is not None and not isinstance(prompt_mask, torch.Tensor):
        raise _type_error("prompt_mask", "None or a bool tensor of shape (B, T)", prompt_mask)
    if not isinstance(pick_order, bool):
        raise _type_error("pick_order", "a bool", pick_order)
    if not isinstance(strict, bool):
        raise _type_error("strict", "a bool", strict)


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
    """Raise ``TypeError``/``ValueError`` naming the first bad argument (the schema has
    already checked the Python types)."""
    for name, tensor in (("visual", visual), ("prompt", prompt), ("lengths", lengths), ("prompt_mask", prompt_mask)):
        _check_dense(name, tensor)
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

    _check_k(k)
    _check_option_values(core_ratio, relevance, backend)

    if lengths is not None:
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths: expected dtype int32 or int64, got {_dtype_name(lengths.dtype)}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
        if lengths.device != visual.device:
            raise ValueError(f"lengths: expected a tensor on {visual.device} (the device of visual), got {lengths.device}")

    if prompt_mask is not None:
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


def check_lengths_range(visual: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
    """``lengths`` must lie in ``[1, N]`` (reads values: a host sync on accelerators)."""
    N = visual.shape[1]
    if lengths is not None:
        bad = (lengths < 1) | (lengths > N)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"lengths: expected values in [1, {N}], got {int(lengths[row])} at row {row}")


def check_prompt_values(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> None:
    """Strict mode: every batch row has a finite prompt and at least one valid prompt token. (Finite rows
    always pool to a finite mean, however close to float32's limit: ``spec.pool_shift``.)"""
    valid = prompt_mask
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
