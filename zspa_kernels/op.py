"""The ``zspa::select_tokens`` custom op: schema, fake kernel and device kernel.

One op, registered with ``torch.library`` so that it works under
``torch.compile(fullgraph=True)`` and inside CUDA-graph capture. Its kernel
validates the arguments (shapes, dtypes, devices, scalars: no host sync), then
hands over to the backend chosen in :mod:`zspa_kernels.dispatch`. The Python API
has checked the Python types; the schema checks them for direct callers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import check_args, check_lengths_range
from .dispatch import backend_impl, resolve_backend
from .spec import DEFAULT_CORE_RATIO


@torch.library.custom_op("zspa::select_tokens", mutates_args=())
def select_tokens_op(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float = DEFAULT_CORE_RATIO,
    lengths: Optional[torch.Tensor] = None,
    prompt_mask: Optional[torch.Tensor] = None,
    relevance: str = "mean",
    backend: str = "auto",
    pick_order: bool = False,
) -> torch.Tensor:
    check_args(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend)
    if visual.device.type == "cpu":
        check_lengths_range(visual, lengths)  # free on the CPU
    impl = backend_impl(resolve_backend(backend, visual.device, (visual.shape[0], visual.shape[1], k)))
    return impl(visual, prompt, k, float(core_ratio), lengths, prompt_mask, relevance, pick_order)


@select_tokens_op.register_fake
def _select_tokens_fake(visual, prompt, k, core_ratio=DEFAULT_CORE_RATIO, lengths=None, prompt_mask=None,
                        relevance="mean", backend="auto", pick_order=False):
    check_args(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend)
    return visual.new_empty((visual.shape[0], k), dtype=torch.int64)
