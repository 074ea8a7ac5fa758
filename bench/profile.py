"""Where the time of one fused selection goes, at the LLaVA-1.5 shapes (issue: GPU targets).

    python -m bench.profile --out split.json          # the time split, on a GPU
    ncu --profile-from-start off ... python -m bench.profile --ncu   # one profiled call per backend

Per fused backend and shape (bf16, keep 64, core ratio 0.5):

* ``gpu_us``: CUDA-event median of one call (``triton.testing.do_bench``), launch gaps included;
* ``graph_us``: one call replayed from a CUDA graph (20 calls captured back to back, events over
  the replay): the GPU time without the host, the figure the GPU-time target is about;
* ``eager_us``: wall clock per call of 200 eager calls issued back to back from Python, one
  synchronisation at the end: what a model's forward pays per call when the GPU keeps up;
* ``host_us``: host time per call alone: the wall clock of issuing ``HOST_CALLS`` eager calls,
  read before the synchronisation that ends them (few enough that the launch queue never fills
  and blocks the host): what Python, the dispatcher and the launcher cost a call, whether or not
  the GPU keeps up. Above ``graph_us`` it, not the GPU, sets ``eager_us``;
* ``host_backend_us``: the same for the backend's entry point called directly (what the op's
  kernel calls after its checks and the backend's choice): ``host_us`` less this is the op's own
  layer (the dispatcher, the argument checks, ``auto``), the rest the backend's scratch, launch
  arguments and launches;
* ``host_scratch_us`` (``triton`` only; cuda allocates among its launches, in C++): the same for
  the backend's scratch allocation alone (:func:`zspa_kernels.triton.select.allocate_scratch`,
  about ten ``torch.empty``): if it is a large share of ``host_backend_us``, one allocation
  carved into the buffers is the next step (``bench/GPU-NOTES.md``);
* ``fixed_us`` and ``step_us``: graph-replay time against the number of greedy steps at a fixed
  core (32 tokens; 0, 32, 96 and 224 steps), fitted by least squares: the intercept is the work
  every call does once (token statistics, Gram, core), the slope one dependent greedy step;
* ``gram_us`` (``cuda`` only): the cuBLAS Gram of the row(s) alone, the bulk of ``fixed_us``;
  ``gram_split_us``: its top rows and bottom-right block (csrc/gram_view.cuh), the two GEMMs the
  launcher runs instead on the cluster kernel from 2^33 multiply-adds on (B=32 here, not B=1).

``--ncu`` skips the timing: it warms every backend up, then brackets exactly one call per
backend and shape with ``torch.cuda.profiler.start``/``stop``, so ``ncu --profile-from-start off``
sees only those; its shapes add the video row (N = 16384), whose 10 ms target the first run
missed and whose kernels the timing above does not split.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import zspa_kernels  # noqa: F401  (registers the op)
from zspa_kernels import benchmark as hb
from zspa_kernels.dispatch import backend_impl
from zspa_kernels.spec import core_count

SHAPES = ("llava-1.5", "llava-1.5-b32")
NCU_SHAPES = SHAPES + ("video",)
KEEP, CORE = 64, 32
STEPS = (0, 32, 96, 224)
GRAPH_CALLS, EAGER_CALLS = 20, 200
HOST_CALLS = 50  # up to ~5 launches a call: ~250 queued, well under the driver's launch queue


def fused_backends(device: torch.device) -> list[str]:
    return [b for b in ("triton", "cuda") if b in hb.backends_here(device)]


def selection(backend: str, visual, prompt, k: int, core_ratio: float):
    op = torch.ops.zspa.select_tokens
    return lambda: op(visual, prompt, k, core_ratio, None, None, "mean", backend, True)


def backend_entry(backend: str, visual, prompt, k: int, core_ratio: float):
    """The same call, made to the backend's entry point as the op's kernel makes it."""
    impl = backend_impl(backend)
    return lambda: impl(visual, prompt, k, float(core_ratio), None, None, "mean", True)


def scratch_entry(backend: str, visual, k: int, core_ratio: float):
    """The scratch allocation of the same call, alone (None where the backend has no Python one)."""
    if backend != "triton":
        return None
    from zspa_kernels.triton.plan import async_copies_on, launch_plan
    from zspa_kernels.triton.select import allocate_scratch

    B, N, D = visual.shape
    plan = launch_plan(B, N, D, visual.dtype, k, float(core_ratio), False, "mean", async_copies_on(visual.device))
    return lambda: allocate_scratch(plan, B, N, k, True, visual.device)


def graph_us(fn) -> float:
    """Per-call GPU time of ``fn`` replayed from a CUDA graph of ``GRAPH_CALLS`` calls (median of 10 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / GRAPH_CALLS)
    return statistics.median(times)


def _per_call_us(fn, calls: int, wait: bool) -> float:
    """Wall clock per call of ``calls`` back-to-back eager calls (median of 5 runs), read after
    synchronising (``wait``) or right after the last call is issued."""
    fn()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait:
            torch.cuda.synchronize()
        times.append(1e6 * (time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return statistics.median(times)


def eager_us(fn) -> float:
    """Wall clock per call of ``EAGER_CALLS`` back-to-back eager calls, the GPU's work included."""
    return _per_call_us(fn, EAGER_CALLS, wait=True)


def host_us(fn) -> float:
    """Host time per call: the wall clock of issuing ``HOST_CALLS`` eager calls, read before
    synchronising. A call that synchronises inside shows up here as GPU time."""
    return _per_call_us(fn, HOST_CALLS, wait=False)


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def split(backend: str, shape: hb.Shape, device: torch.device) -> dict:
    visual, prompt = hb.make_inputs(shape, torch.bfloat16, device)
    run = selection(backend, visual, prompt, KEEP, hb.CORE_RATIO)
    record = {"impl": backend, "shape": shape.label, "B": shape.B, "N": shape.N, "D": shape.D, "k": KEEP,
              "k_core": core_count(hb.CORE_RATIO, KEEP), "gpu_us": hb.median_us(run, device),
              "graph_us": graph_us(run), "eager_us": eager_us(run), "host_us": host_us(run),
              "host_backend_us": host_us(backend_entry(backend, visual, prompt, KEEP, hb.CORE_RATIO))}
    scratch = scratch_entry(backend, visual, KEEP, hb.CORE_RATIO)
    if scratch is not None:
        record["host_scratch_us"] = host_us(scratch)
    per_steps = []
    for steps in STEPS:
        k = CORE + steps
        ratio = CORE / k
        assert core_count(ratio, k) == CORE, (ratio, k)
        per_steps.append(graph_us(selection(backend, visual, prompt, k, ratio)))
    record["fixed_us"], record["step_us"] = fit_line(STEPS, per_steps)
    record["steps_graph_us"] = dict(zip(map(str, STEPS), per_steps))
    if backend == "cuda":
        whole, halves = hb.gram_blocks(shape.N, 1), hb.gram_blocks(shape.N, 2)
        record["gram_us"] = graph_us(lambda: hb.gram_gemms(visual, whole))
        record["gram_split_us"] = graph_us(lambda: hb.gram_gemms(visual, halves))
    return record


def profiled_calls(device: torch.device, labels=NCU_SHAPES) -> None:
    """One call per backend and shape (``labels``, of NCU_SHAPES) between the profiler's start and
    stop, after a warm-up; a call that fails its warm-up is left out, saying so."""
    runs = []
    for label in labels:
        shape = next(s for s in hb.SPEC_SHAPES if s.label == label)
        visual, prompt = hb.make_inputs(shape, torch.bfloat16, device)
        for backend in fused_backends(device):
            run = selection(backend, visual, prompt, KEEP, hb.CORE_RATIO)
            try:
                run()
                torch.cuda.synchronize(device)
            except Exception as exc:  # a launch error, or a Triton compile error (TritonError)
                print(f"bench.profile --ncu: {backend} {label} left out: {hb.first_line(exc)}", flush=True)
                continue
            runs.append(run)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ncu", action="store_true", help="only the bracketed calls, for ncu")
    parser.add_argument("--shapes", nargs="+", choices=NCU_SHAPES, default=list(NCU_SHAPES),
                        help="with --ncu: the shapes to profile (one ncu run each keeps a cut short run's first)")
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    device = hb.require_cuda("bench.profile")
    if args.ncu:
        profiled_calls(device, args.shapes)
        return 0
    records = []
    print(f"{'backend':<8}{'shape':<15}{'gpu':>10}{'graph':>10}{'eager':>10}{'host':>10}{'host bk':>10}{'scratch':>10}"
          f"{'fixed':>10}{'per step':>10}{'gram':>10}{'split':>10}   (host bk: the backend's entry point alone; "
          "scratch: its allocations alone)")
    for label in SHAPES:
        shape = next(s for s in hb.SPEC_SHAPES if s.label == label)
        for backend in fused_backends(device):
            try:
                r = split(backend, shape, device)
            except Exception as exc:  # a launch error, or Triton's compile errors (TritonError): the next backend
                # and shape still run (a trap would not: the log says)
                print(f"{backend:<8}{label:<15}failed: {hb.first_line(exc)}", flush=True)
                continue
            records.append(r)
            if args.out:  # after every record: a time limit keeps what finished
                hb.save_records(args.out, device, records)
            scratch, gram, halves = (f"{r[key]:.1f}" if key in r else "—"
                                     for key in ("host_scratch_us", "gram_us", "gram_split_us"))
            print(f"{backend:<8}{label:<15}{r['gpu_us']:>10.1f}{r['graph_us']:>10.1f}{r['eager_us']:>10.1f}"
                  f"{r['host_us']:>10.1f}{r['host_backend_us']:>10.1f}{scratch:>10}{r['fixed_us']:>10.1f}"
                  f"{r['step_us']:>10.2f}{gram:>10}{halves:>10}   (µs)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
