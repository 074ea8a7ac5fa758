"""Microbenchmarks of ``select_tokens``: every backend beside the baselines, in one run (SPEC §7).

``ZSPA_BENCH=spec`` times the SPEC shapes (LLaVA-1.5 at B=1 and 32, LLaVA-NeXT,
Qwen2.5-VL high-res, video) with keeps of 64, 10% and 25% in bf16; by default it
times two tiny shapes, a smoke test that CI runs on CPU (no timing assertions).
Each record carries what ``bench/report.py`` needs: the shape, ``k``, the floor
and, on GPUs, the CUDA-event median from ``triton.testing.do_bench``.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import zspa_kernels  # noqa: F401  (registers the op)
from zspa_kernels import benchmark as hb
from zspa_kernels.spec import core_count

SPEC = os.environ.get("ZSPA_BENCH", "smoke") == "spec"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = hb.SPEC_SHAPES if SPEC else hb.SMOKE_SHAPES
# Host-clock rounds per case (pytest-benchmark's own statistics); on GPUs the figure reported is
# the CUDA-event median beside them, so half a second of rounds is plenty there.
SECONDS_PER_CASE = (0.5 if DEVICE.type == "cuda" else 1.0) if SPEC else 0.05


@pytest.fixture(scope="module")
def bandwidth():
    return hb.copy_bandwidth(DEVICE)


def _rounds(timed) -> int:
    t0 = time.perf_counter()
    timed()
    return max(3, min(100, int(SECONDS_PER_CASE / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("keep", hb.KEEPS, ids=hb.keep_label)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
@pytest.mark.parametrize("impl", hb.implementations(DEVICE))
def test_select_tokens(benchmark, bandwidth, impl, shape, keep):
    k = hb.keep_budget(keep, shape.N)
    reason = hb.skip_reason(impl, shape, k, DEVICE)
    if reason:
        pytest.skip(reason)
    visual, prompt = hb.make_inputs(shape, DTYPE, DEVICE)
    run = hb.runner(impl, visual, prompt, k)

    order = run()  # also the warm-up (compilation, graph capture)
    assert order.shape == (shape.B, k) and order.dtype == torch.int64
    assert bool(((order >= 0) & (order < shape.N)).all()), "a pick outside the row"
    assert bool((order.sort(1).values.diff(dim=1) > 0).all()), "a token picked twice"

    def timed():
        run()
        hb.synchronize(DEVICE)

    benchmark.pedantic(timed, rounds=_rounds(timed), warmup_rounds=1)
    benchmark.extra_info.update(hb.environment(DEVICE))
    benchmark.extra_info.update(
        name="select_tokens", impl=impl, shape=shape.label, B=shape.B, N=shape.N, D=shape.D, k=k,
        keep=hb.keep_label(keep), k_core=core_count(hb.CORE_RATIO, k), dtype=str(DTYPE).replace("torch.", ""),
        floor_us=hb.floor_us(shape, k, DTYPE, bandwidth), bandwidth_gbps=bandwidth / 1e9)
    if DEVICE.type == "cuda":
        benchmark.extra_info["cuda_event_median_us"] = hb.median_us(run, DEVICE)
