"""Shared fixtures: which backends this machine can run, and their replay tolerances."""
from __future__ import annotations

import pytest
import torch

from zspa_kernels.dispatch import triton_interpreter

# Largest fp64 score gap a backend may leave at one pick (a near-tie), per input dtype.
# The reference computes in fp32 from the exactly upcast inputs, whatever their dtype.
TOLERANCE = {
    "reference": {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5},
    # cuda: fp32-accumulated GEMMs of the raw inputs (16-bit products are exact in fp32;
    # TF32 is refused), normalised afterwards: fp32 rounding only, like the reference.
    "cuda": {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5},
}


def available_backends() -> list[str]:
    names = ["reference"]
    if "triton" in TOLERANCE and (torch.cuda.is_available() or triton_interpreter()):
        names.append("triton")
    if "cuda" in TOLERANCE and torch.cuda.is_available():
        names.append("cuda")
    return names


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and backend != "reference" else "cpu")


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param
