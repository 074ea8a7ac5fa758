"""Fixtures; shared helpers live in helpers.py (tests import them from there, never from here)."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter; it must be chosen before
# triton is first imported (the kernels read it when they are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import backends_here, intra_op_threads  # noqa: E402


@pytest.fixture(params=backends_here())
def backend(request) -> str:
    return request.param


@pytest.fixture
def one_intra_op_thread():
    """Run the test on one intra-op thread, and put the thread count back after it.

    For tests that run tiny models: their matmuls are a few hundred flops, and on CPU waking a
    second thread for each costs more than it saves; under pytest-xdist every worker wakes its
    own, so the cores are oversubscribed and the threads spin against each other (on a 2-core
    machine with two workers, a tiny LLaVA's fidelity grid ran 44 s on the default threads and
    2.3 s on one). The CPU backend's threading is its own tests' to check: they set their count."""
    with intra_op_threads(1):
        yield
