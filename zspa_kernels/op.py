"""The ``zspa::select_tokens`` op: schema, fake kernel and device kernel.

One op, registered with ``torch.library`` so that it works under
``torch.compile(fullgraph=True)`` and inside CUDA-graph capture. Its kernel
validates the arguments (shapes, dtypes, devices, scalars: no host sync), then
hands over to the backend chosen in :mod:`zspa_kernels.dispatch`. The Python API
has checked the Python types; the schema checks them for direct callers.

Registered as a schema plus one ``CompositeExplicitAutograd`` kernel and a fake kernel
(``Library.define``/``impl``/``register_fake``), not with ``@torch.library.custom_op``:
the decorator wraps each eager call in an autograd kernel and a redispatch through
Python (an autograd-free op needs neither) and disables Dynamo around it, which cost
~5 µs a call more under torch 2.11 on this project's CPU machine (8.6 against 3.4 µs for
an op that only allocates its output; 11.9 against 3.8 when an input requires grad).
At ~60 µs of host time allowed per eager call, that is worth a few lines. Without an
autograd kernel, autograd's fallback handles inputs that require grad: the output is
int64, so it never requires grad itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import check_args, check_lengths_range
from .dispatch import backend_impl, resolve_backend
from .spec import DEFAULT_CORE_RATIO

# A fragment: csrc/ registers zspa::select_tokens_cuda (and the CPU kernels' op) in the same namespace.
_LIB = torch.library.Library("zspa", "FRAGMENT")
_LIB.define(
    "select_tokens(Tensor visual, Tensor prompt, SymInt k, float core_ratio=" + repr(DEFAULT_CORE_RATIO)
    + ', Tensor? lengths=None, Tensor? prompt_mask=None, str relevance="mean", str backend="auto", '
    "bool pick_order=False) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),  # as the decorator tagged it: opcheck (tests/test_op.py) holds it to that
)


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
    """The op's kernel on every device: checks, then the backend's entry point."""
    check_args(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend)
    if visual.device.type == "cpu":
        check_lengths_range(visual, lengths)  # free on the CPU
    impl = backend_impl(resolve_backend(backend, visual.device, (visual.shape[0], visual.shape[1], k)))
    return impl(visual, prompt, k, float(core_ratio), lengths, prompt_mask, relevance, pick_order)


def _select_tokens_fake(visual, prompt, k, core_ratio=DEFAULT_CORE_RATIO, lengths=None, prompt_mask=None,
                        relevance="mean", backend="auto", pick_order=False):
    check_args(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend)
    return visual.new_empty((visual.shape[0], k), dtype=torch.int64)


_LIB.impl("select_tokens", select_tokens_op, "CompositeExplicitAutograd")
torch.library.register_fake("zspa::select_tokens", _select_tokens_fake, lib=_LIB)
