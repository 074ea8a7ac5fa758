"""Does the cuda backend's cluster kernel run on this GPU? The gate before the timed stages.

    python -m bench.smoke     # exit 0: it does (or does not apply); 3: time the block kernel; 4: cuda fails

``csrc/greedy_cluster.cuh`` is the newest hardware code of the package (distributed shared
memory, remote stores polled without a barrier), and ``auto`` runs it for every row of up to
~950 tokens on sm_90. A kernel that traps leaves its process's CUDA context unusable, so one
failure in a benchmark process would take every later case of that process with it, Triton's
included. ``bench/run_gpu.sh`` runs this first: on exit 3 it continues with
``ZSPA_CUDA_GREEDY=block`` and says so, so that the run still measures the block kernel and
the tests and sanitizer logs say what broke. The check: the LLaVA-1.5 row (B=1, N=576,
D=4096, k=64, bf16) and a ragged batch (B=3, N=239) through the block kernel, then the
cluster kernel; they read the same Gram entries in the same expression, so their picks must be
identical.
"""
from __future__ import annotations

import os
import sys

import torch

import zspa_kernels  # noqa: F401  (registers the op)
from zspa_kernels import benchmark as hb
from zspa_kernels.dispatch import available_backends
from zspa_kernels.spec import CUDA_GREEDY_ENV

OK, USE_BLOCK, CUDA_FAILS = 0, 3, 4
CASES = ((hb.Shape("llava-1.5", 1, 576, 4096), 64), (hb.Shape("ragged", 3, 239, 96), 48))


def check(device: torch.device, progress=print) -> int:
    """``OK``, ``USE_BLOCK`` (the cluster kernel fails or disagrees) or ``CUDA_FAILS`` (the block
    kernel fails too)."""
    if "cuda" not in available_backends(device):
        progress("bench.smoke: the cuda backend is not available here; nothing to check")
        return OK
    for shape, k in CASES:
        visual, prompt = hb.make_inputs(shape, torch.bfloat16, device)
        lengths = torch.tensor([shape.N, shape.N // 2, 17][: shape.B], device=device)
        outputs = {}
        for greedy in ("block", "cluster"):
            with hb.env_vars({CUDA_GREEDY_ENV: greedy}):
                try:
                    outputs[greedy] = torch.ops.zspa.select_tokens(visual, prompt, k, hb.CORE_RATIO, lengths, None,
                                                                   "mean", "cuda", True)
                    torch.cuda.synchronize(device)
                except RuntimeError as exc:
                    progress(f"bench.smoke: {shape.label}: the {greedy} kernel failed: {hb.first_line(exc)}")
                    return CUDA_FAILS if greedy == "block" else USE_BLOCK
        if not torch.equal(outputs["block"], outputs["cluster"]):
            rows = int((outputs["block"] != outputs["cluster"]).any(1).sum())
            progress(f"bench.smoke: {shape.label}: the cluster kernel's picks differ from the block kernel's "
                     f"in {rows} of {shape.B} rows")
            return USE_BLOCK
    progress("bench.smoke: the block and cluster kernels make the same picks")
    return OK


def main() -> int:
    code = check(hb.require_cuda("bench.smoke"))
    if code != OK:
        # After a trap the process's CUDA context is gone, and tearing it down at exit may abort
        # (a destructor's CUDA error): the exit status would then be 134, not the verdict.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
