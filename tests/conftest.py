"""Fixtures; shared helpers live in helpers.py (tests import them from there, never from here)."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter; it must be chosen before
# triton is first imported (the kernels read it when they are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import backends_here  # noqa: E402


@pytest.fixture(params=backends_here())
def backend(request) -> str:
    return request.param
