"""Shared fixtures: which backends this machine can run, and their replay tolerances."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter; it must be chosen before
# triton is first imported (the kernels read it when they are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from zspa_kernels.cpu import GREEDY_TOLERANCE  # noqa: E402
from zspa_kernels.spec import triton_interpreter  # noqa: E402

# Largest fp64 score gap a backend may leave at one pick (a near-tie), per input dtype.
# The reference computes in fp32 from the exactly upcast inputs, whatever their dtype.
TOLERANCE = {
    "reference": {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5},
    # Same fp32 math as the reference (raw Gram products are exact, sums in fp32), only in
    # another order: cosine errors stay ~sqrt(D)·2^-24, far below 2e-5 at test sizes.
    "triton": {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5},
    # cuda: fp32-accumulated GEMMs of the raw inputs (16-bit products are exact in fp32;
    # TF32 is refused), normalised afterwards: fp32 rounding only, like the reference.
    "cuda": {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5},
    # cpu: greedy similarities from fp16-rounded unit vectors (zspa_kernels/cpu.py derives the
    # bound 2^-10); relevance and core are fp32 like the reference.
    "cpu": {dtype: GREEDY_TOLERANCE for dtype in (torch.float32, torch.float16, torch.bfloat16)},
}

# Random cases per dtype; the interpreted Triton backend runs a third of them to keep CI short.
RANDOM_CASES = 120
INTERPRETED_RANDOM_CASES = 40


def random_case_count(backend: str) -> int:
    return INTERPRETED_RANDOM_CASES if backend == "triton" and triton_interpreter() else RANDOM_CASES


def available_backends() -> list[str]:
    names = ["reference", "cpu"]
    has_triton = importlib.util.find_spec("triton") is not None  # absent next to CPU-only torch wheels
    if "triton" in TOLERANCE and has_triton and (torch.cuda.is_available() or triton_interpreter()):
        names.append("triton")
    if "cuda" in TOLERANCE and torch.cuda.is_available():
        names.append("cuda")
    return names


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and backend not in ("reference", "cpu") else "cpu")


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param
