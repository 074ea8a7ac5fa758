"""Backend choice for ``zspa::select_tokens``.

Precedence: an explicit ``backend=`` keyword, else the ``ZSPA_BACKEND``
environment variable, else the ``auto`` rule below. Every backend returns the
pick order (or the ascending kept indices when ``pick_order`` is false) as a
``(B, k)`` int64 tensor padded with ``-1``.

``auto`` rule: CPU tensors use ``reference``; CUDA tensors use ``triton``.

The ``cuda`` backend is never chosen by ``auto`` until measured: it compiles on
first use (minutes) and nobody has timed it on a GPU yet. Rule to apply once
``bench/`` has both backends on one GPU: per shape class ``(N bucket, k bucket,
B bucket)`` take the backend with the lower median CUDA-event time, and keep
``triton`` unless ``cuda`` wins by more than the run-to-run spread; prefer ``cuda``
only where its extension is already built (``zspa_kernels.cuda_build.status()``),
so that ``auto`` never triggers a compile in the hot path.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .checks import BACKENDS

ENV_VAR = "ZSPA_BACKEND"


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for ``backend`` on tensors living on ``device``."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter():
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' needs CUDA tensors, got {device.type}")
    return backend


def backend_impl(name: str) -> Callable[..., torch.Tensor]:
    """Import a backend on first use, so that importing the package stays light."""
    if name == "reference":
        from .reference import select_tokens_reference_op

        return select_tokens_reference_op
    if name == "triton":
        from .triton import select_tokens_triton

        return select_tokens_triton
    from .cuda_ext import select_tokens_cuda

    return select_tokens_cuda
