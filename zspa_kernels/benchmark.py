"""Shared harness of the microbenchmarks (``bench/``) and of ``zspa bench``.

One place defines the shapes (SPEC §7), the inputs, the implementations that are
timed side by side, the timer and the floor, so that the pytest-benchmark suite
and the console command measure the same things.

The floor of one selection is the time to read the tokens once at the device's
measured copy bandwidth; the greedy chain adds ``k - k_core`` dependent steps on
top of it (each needs the previous pick), so the summary lists that step count
beside the floor: at LLaVA sizes the steps' latency, not bandwidth, is the limit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
from typing import Callable, Optional, Union

import torch

from . import baselines, spec
from .dispatch import available_backends, resolve_backend
from .spec import BACKENDS, DEFAULT_CORE_RATIO, core_count, keep_budget, keep_label

CORE_RATIO = DEFAULT_CORE_RATIO
KEEPS: tuple[Union[int, float], ...] = (64, 0.10, 0.25)
# In the order they are timed: the two loops the targets compare with first; the graph-captured
# loop (CUDA only) after them, its captures of up to 2048 steps being slow to set up.
BASELINES = ("torch_loop", "divprune_loop", "torch_loop_graph")
# A case is skipped (and reported as skipped) when its estimated memory traffic would
# keep one call running for many seconds: ~10 s at a 2-core CPU's few GB/s, ~1 s on a GPU.
MAX_BYTES_PER_CALL = {"cpu": 1e10, "cuda": 2e12}


@dataclasses.dataclass(frozen=True)
class Shape:
    label: str
    B: int
    N: int
    D: int


SPEC_SHAPES = (
    Shape("llava-1.5", 1, 576, 4096),
    Shape("llava-1.5-b32", 32, 576, 4096),
    Shape("llava-next", 1, 2880, 4096),
    Shape("qwen2.5-vl-hr", 1, 4096, 3584),
    Shape("video", 1, 16384, 3584),
)
SMOKE_SHAPES = (Shape("smoke", 1, 96, 64), Shape("smoke-b4", 4, 160, 96))


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random tokens with a spread of norms (like real projector outputs) and a pooled prompt."""
    g = torch.Generator(device=device).manual_seed(seed)
    visual = torch.randn(shape.B, shape.N, shape.D, device=device, generator=g)
    visual *= torch.rand(shape.B, shape.N, 1, device=device, generator=g) + 0.5
    prompt = torch.randn(shape.B, shape.D, device=device, generator=g)
    return visual.to(dtype), prompt.to(dtype)


# Backends the benchmarks leave out, comma-separated: bench/run_gpu.sh sets it to "cuda" when
# bench/smoke.py finds the cuda backend failing, so that a kernel that kills its process's CUDA
# context cannot take the other backends' measurements with it.
SKIP_ENV = "ZSPA_BENCH_SKIP"


def backends_here(device: torch.device) -> list[str]:
    """Backends worth timing on ``device``: available (:func:`dispatch.available_backends`), and
    compiled (Triton under the CPU interpreter is correct but thousands of times slower), less
    those ``ZSPA_BENCH_SKIP`` names; the one ``auto`` runs there comes first."""
    skip = {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",")}
    names = [b for b in available_backends(device) if (b != "triton" or device.type == "cuda") and b not in skip]
    auto = resolve_backend("auto", device)
    return sorted(names, key=lambda name: name != auto)


def implementations(device: torch.device) -> list[str]:
    """Names of what is timed on ``device``, in the order they run: the op's fast backends, the
    baselines, then ``reference`` (the slowest and least needed where a run is cut short)."""
    fast = [b for b in backends_here(device) if b != "reference"]
    loops = [b for b in BASELINES if b != "torch_loop_graph" or device.type == "cuda"]
    return fast + loops + ["reference"]


def runner(impl: str, visual: torch.Tensor, prompt: torch.Tensor, k: int,
           core_ratio: float = CORE_RATIO) -> Callable[[], torch.Tensor]:
    """A zero-argument callable that runs one selection (pick order out), set up outside the timing."""
    if impl in BACKENDS:
        op = torch.ops.zspa.select_tokens
        return lambda: op(visual, prompt, k, core_ratio, None, None, "mean", impl, True)
    if impl == "torch_loop_graph":
        graph = baselines.TorchLoopGraph(visual, prompt, k, core_ratio)
        return lambda: graph(visual, prompt)
    fn = getattr(baselines, impl)
    return lambda: fn(visual, prompt, k, core_ratio)


def traffic_bytes(impl: str, shape: Shape, k: int, core_ratio: float = CORE_RATIO) -> float:
    """Rough device-memory traffic of one call, to keep impossible cases out of a run."""
    k_core = core_count(core_ratio, k)
    if impl == "divprune_loop":  # the N x N matrix, then O(k^2 N) re-reads of its selected rows
        return shape.B * 4 * shape.N * (2 * shape.N + (k * k - k_core * k_core) / 2)
    if impl == "cpu":  # bf16 tokens read, fp16 unit tokens written, then read by the core pass and each step
        return shape.B * shape.N * shape.D * 2 * (3 + k - k_core)
    # The reference and the PyTorch loops read the fp32 tokens once per greedy step.
    return shape.B * 4 * shape.N * shape.D * (k - k_core + 2)


def skip_reason(impl: str, shape: Shape, k: int, device: torch.device) -> Optional[str]:
    """Why a case is not timed on ``device``, or None. The fused backends are always timed, and
    so is ``cpu`` where a baseline is (it must be compared wherever one can be)."""
    if impl in ("cuda", "triton"):
        return None
    if impl == "cpu" and any(skip_reason(b, shape, k, device) is None for b in BASELINES):
        return None
    moved = traffic_bytes(impl, shape, k)
    limit = MAX_BYTES_PER_CALL.get(device.type, MAX_BYTES_PER_CALL["cpu"])
    if moved > limit:
        return f"{impl} would move ~{moved / 1e9:.0f} GB per call (limit {limit / 1e9:.0f} GB on {device.type})"
    return None


def gram_blocks(N: int, steps: int) -> list[tuple[int, int]]:
    """Row blocks ``(start, stop)`` of an ``N x N`` Gram computed in ``steps`` GEMMs: block
    ``[start, stop)`` against columns ``[start, N)``, the rest its transpose. Starts are
    multiples of 4 (the cuda launcher's 16-byte rule): one step is the whole Gram, two the
    launcher's split at ``N/2`` rounded down to 4 (csrc/gram_view.cuh)."""
    starts = sorted({N * b // steps // 4 * 4 for b in range(steps)})
    return list(zip(starts, starts[1:] + [N]))


def _fp32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as the cuda launcher's GEMMs compute it: 16-bit in, fp32 accumulation and output
    (``aten::bmm.dtype`` on CUDA; the fp32 product elsewhere, for CPU tests)."""
    return torch.bmm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a.float(), b.float())


def gram_gemms(visual: torch.Tensor, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The GEMMs of a Gram in ``blocks`` (:func:`gram_blocks`) as the cuda launcher runs them."""
    return [_fp32_bmm(visual[:, a:b], visual[:, a:].transpose(1, 2)) for a, b in blocks]


def sliced_gram(visual: torch.Tensor, slices: int) -> torch.Tensor:
    """The Gram of one image (``B = 1``) as the cuda launcher's ``ZSPA_CUDA_GRAM=splitk`` makes it
    (``sliced_gram`` in csrc/select_tokens.cu): ``slices`` GEMMs over slices of ``D`` in one
    strided batched call (views: batch stride ``D/slices``, row stride ``D``), then the fp32 sum
    of the partial Grams in slice order."""
    B, N, D = visual.shape
    if B != 1 or D % slices:
        raise ValueError(f"visual: sliced_gram takes one image with D divisible by {slices}, "
                         f"got {tuple(visual.shape)}")
    parts = visual[0].unflatten(1, (slices, D // slices)).transpose(0, 1)  # (slices, N, D/slices)
    return _fp32_bmm(parts, parts.transpose(1, 2)).sum(0, keepdim=True)


@contextlib.contextmanager
def env_vars(values: dict):
    """Environment variables set to ``values`` inside the block (``""`` = empty), restored after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW_CALL_MS = 50.0  # calls slower than this are timed 3 times on GPUs, without do_bench's L2 flush


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line failure reports (its type where it has no text)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def median_us(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.2) -> float:
    """Median wall time of ``fn`` in microseconds: CUDA events on GPUs (``do_bench``, L2 flushed;
    a call over ``SLOW_CALL_MS``, whose L2 state does not matter, the median of three), a
    synchronised host clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def event_ms() -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        # The first call may compile, load or plan (Triton, the extension, cuBLAS): a slow one is
        # timed again before it decides how the call is timed, and counts as one of the three.
        if event_ms() > SLOW_CALL_MS and (again := event_ms()) > SLOW_CALL_MS:  # do_bench would make 8+ calls
            return 1e3 * statistics.median([again, event_ms(), event_ms()])
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_seconds * 1e3)),
                                             return_mode="median")
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def wall_median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median synchronised wall time of ``fn`` in milliseconds, after one warm-up call: for whole
    model calls (prefill), where CUDA-event timing of one kernel stream is not the question."""
    fn()  # warm-up: kernels, allocator, autotuning
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-memory bandwidth in bytes/s (bytes read + written by a large copy)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_us(lambda: dst.copy_(src), device) * 1e-6)


def floor_us(shape: Shape, k: int, dtype: torch.dtype, bandwidth: float) -> float:
    """Bytes that must move (tokens and prompt read once, ``k`` indices written) over the bandwidth."""
    elem = torch.empty((), dtype=dtype).element_size()
    moved = shape.B * (shape.N * shape.D * elem + shape.D * elem + k * 8)
    return 1e6 * moved / bandwidth


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


# The switches that force a path of the op (SPEC's env overrides): a result timed under one of them is not
# what ``auto`` runs, and says so (``environment``'s ``overrides``).
PATH_OVERRIDES = (spec.BACKEND_ENV, spec.GRAM_BUDGET_ENV, spec.CUDA_GREEDY_ENV, spec.CUDA_GRAM_ENV)


def overrides() -> dict:
    """The ``PATH_OVERRIDES`` set (not empty) in this process, ``{name: value}``."""
    return {name: os.environ[name] for name in PATH_OVERRIDES if os.environ.get(name, "").strip()}


def environment(device: torch.device) -> dict:
    """Device and versions, stored with every record; ``overrides`` where a path of the op was forced."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {_cpu_model()} x{torch.get_num_threads()} threads"
    env = {"device": name, "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda or "none"}
    if device.type == "cpu":  # CPU timings swing with whatever else the machine runs
        env["load_average_1min"] = os.getloadavg()[0]
    if forced := overrides():
        env["overrides"] = forced
    return env


def require_cuda(tool: str) -> torch.device:
    """The GPU for a GPU-only bench script; where there is none, exits (status 1) saying so, naming ``tool``."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{tool}: needs a CUDA GPU")
    return torch.device("cuda")


def save_records(path, device: torch.device, records: list[dict]) -> None:
    """Raw results of a bench script: the device and versions (:func:`environment`), the transformers that ran
    the models and the time the file was written (UTC), then the records: a raw file says on its own where,
    with what and when it was measured."""
    import datetime
    import json

    try:
        import transformers

        models_version = transformers.__version__
    except ImportError:
        models_version = "not installed"
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # Whole or not at all: the bench stages end at a time limit, which must not leave half a file where the
    # report expects the previous save (a temporary file beside it, renamed over it).
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as f:
            json.dump({**environment(device), "transformers": models_version, "written_utc": written,
                       "records": records}, f, indent=1)
    except BaseException:
        os.remove(partial)
        raise
    os.replace(partial, path)


def quick(shape_label: str = "llava-1.5", keep: Union[int, float] = 64, dtype: torch.dtype = torch.bfloat16) -> int:
    """``zspa bench``: one SPEC shape, every implementation available here, a table on stdout."""
    import zspa_kernels  # noqa: F401  (registers the op)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = [s.label for s in SPEC_SHAPES]
    if shape_label not in labels:
        raise SystemExit(f"zspa bench: --shape expected one of {', '.join(labels)}, got {shape_label!r}")
    shape = SPEC_SHAPES[labels.index(shape_label)]
    k = keep_budget(keep, shape.N)
    bandwidth = copy_bandwidth(device)
    floor = floor_us(shape, k, dtype, bandwidth)
    print(f"select_tokens on {environment(device)['device']}: {shape.label} B={shape.B} N={shape.N} D={shape.D}, "
          f"keep {keep_label(keep)} (k={k}), {str(dtype).replace('torch.', '')}, core ratio {CORE_RATIO}")
    print(f"floor: one read of the tokens at the measured {bandwidth / 1e9:.0f} GB/s = {floor:.1f} µs\n")
    print(f"{'implementation':<18}{'median':>12}{'x floor':>10}")
    visual, prompt = make_inputs(shape, dtype, device)
    for impl in implementations(device):
        reason = skip_reason(impl, shape, k, device)
        if reason:
            print(f"{impl:<18}{'skipped':>12}  ({reason})")
            continue
        us = median_us(runner(impl, visual, prompt, k), device)
        print(f"{impl:<18}{us:>9.0f} µs{us / floor:>10.0f}")
    return 0
