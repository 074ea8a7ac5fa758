"""End-to-end speed and memory of real-size VLMs, unpruned against pruned (SPEC §7).

    python -m bench.e2e --models llava-1.5-7b qwen2.5-vl-7b --batch 1 8 --out e2e.json
    python -m bench.e2e --models llava-1.5-7b --out e2e.json && python -m bench.e2e --models qwen2.5-vl-7b --append --out e2e.json

Per model, batch size and budget (all visual tokens, 64 of them, 10%): prefill latency
(one forward over the prompt, vision tower included) and, on GPUs, the summed time of its
kernels (how much of the prefill the GPU worked; the rest is the host; measured last, by
:func:`gpu_busy_pass`), time to first token and
decode throughput (from per-token timestamps inside ``generate``), peak device
memory and KV-cache bytes, and the selection's share of the pruned prefill (``select_tokens`` alone on the same shapes, over the prefill).
``hook_ms`` is the whole prefill hook of :func:`zspa_kernels.prune` (finding the images, the
prompt, the selection, the gathers), synchronised before and after, so its host work and its
kernels are counted one after the other: what pruning adds to a prefill besides the shorter
language model, an upper bound. ``hook_kernels`` and ``hook_host_ops`` count its ops (:func:`hook_ops`),
which do not grow with the images of a batch.
Models come from :mod:`zspa_kernels.models` with random weights, in bf16 on GPUs
(fp32 on CPUs, which mostly emulate bf16 and would time the emulation). Times are
medians of a synchronised host clock: each call is milliseconds long, far above
the clock's resolution.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import zspa_kernels
from zspa_kernels import benchmark as hb
from zspa_kernels import models
from zspa_kernels.dispatch import resolve_backend
from zspa_kernels.integrations.transformers import kv_cache

KEEPS = (None, 64, 0.10)  # None: the unpruned model
TEXT_TOKENS = 32


def selection_us(B: int, N: int, D: int, k: int, backend: str, device, dtype) -> float:
    """``select_tokens`` alone on the shapes the hook sees: B rows of N tokens, a per-token prompt."""
    shape = hb.Shape("e2e", B, N, D)
    visual, _ = hb.make_inputs(shape, dtype, device)
    prompt = torch.randn(B, TEXT_TOKENS, D, device=device, dtype=dtype)
    mask = torch.ones(B, TEXT_TOKENS, dtype=torch.bool, device=device)
    return hb.median_us(lambda: zspa_kernels.select_tokens(visual, prompt, k, prompt_mask=mask, backend=backend),
                        device)


def gpu_busy_ms(fn, device) -> "float | None":
    """The summed duration of the CUDA kernels of one ``fn()`` (torch.profiler), None off GPUs or
    where the profiler records no kernel; ``fn`` already warm. Beside the prefill's wall time it
    says how much of it the GPU worked: an eager model whose prefill takes far longer than its kernels is bound by the host
    launching them, which no token count removes (the first H200 run's LLaVA-1.5-7B at batch 8:
    68.7 ms pruned)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    hb.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        hb.synchronize(device)
    # Kernels, copies and fills; not the GPU-side spans of record_function ranges, which cover them
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if not kernels:  # the profiler saw no kernel (no CUPTI here): unknown, not zero
        return None
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # a kernel event's range: its run on the GPU


def hook_ms(handle, model, inputs: dict, device, repeats: int) -> float:
    """Median wall time of ``handle``'s prefill hook over ``repeats`` prefills (warm), the
    device synchronised before and after it."""
    times, hook = [], handle._prefill

    def timed(*args, **kwargs):
        hb.synchronize(device)
        t0 = time.perf_counter()
        hook(*args, **kwargs)
        hb.synchronize(device)
        times.append(time.perf_counter() - t0)

    handle._prefill = timed  # the language model's pre-hook looks it up at every call
    try:
        with torch.no_grad():
            for _ in range(repeats):
                models.prefill(model, inputs)
    finally:
        del handle._prefill
    if len(times) != repeats:
        raise RuntimeError(f"bench.e2e: the prefill hook ran {len(times)} times in {repeats} prefills")
    return 1e3 * statistics.median(times)


def hook_ops(handle, model, inputs: dict) -> dict:
    """The ops of one prefill hook of ``handle`` as torch's dispatcher sees them (``select_tokens`` one of them,
    its own ops uncounted): ``hook_kernels``, those on a GPU that run a kernel (views apart: they launch none),
    and ``hook_host_ops``, those on host tensors (its bookkeeping of where the images and the prompt are). After
    the hook's one host sync the GPU has nothing queued, so each of them is time it waits. On CPUs every op is
    a host op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        kernels = host = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.device.type != "cpu" for t in tensors):
                self.kernels += not func.is_view
            else:
                self.host += 1
            return out

    counts, hook = [], handle._prefill

    def counted(*args, **kwargs):
        with Count() as mode:
            hook(*args, **kwargs)
        counts.append({"hook_kernels": mode.kernels, "hook_host_ops": mode.host})

    handle._prefill = counted  # the language model's pre-hook looks it up at every call
    try:
        with torch.no_grad():
            models.prefill(model, inputs)
    finally:
        del handle._prefill
    if len(counts) != 1:
        raise RuntimeError(f"bench.e2e: the prefill hook ran {len(counts)} times in one prefill")
    return counts[0]


class _StepClock:
    """A stopping criterion that never stops: it timestamps every generated token, so one
    ``generate()`` call yields both the time to the first token and the decode rate."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        hb.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate_timed(model, inputs, device, n: int, cache: str = "dynamic") -> tuple[float, float]:
    """(TTFT in ms, decode seconds per step) of one ``generate()`` of ``n`` tokens on a ``cache``
    ("dynamic", or "static": transformers' ``cache_implementation``, eager here: ``disable_compile``)."""
    from transformers import StoppingCriteriaList

    clock = _StepClock(device)
    static = dict(cache_implementation="static", disable_compile=True) if cache == "static" else {}
    hb.synchronize(device)
    t0 = time.perf_counter()
    # min_new_tokens: random weights must not stop early at an EOS.
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                   stopping_criteria=StoppingCriteriaList([clock]), **static)
    return 1e3 * (clock.times[0] - t0), (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)


def measure(model, inputs: dict, device, new_tokens: int, repeats: int, cache: str = "dynamic") -> dict:
    """Prefill, TTFT, decode throughput (generate() on a ``cache``), peak memory and KV bytes of one
    configuration."""
    B = inputs["input_ids"].shape[0]
    with torch.no_grad():
        prefill = hb.wall_median_ms(lambda: models.prefill(model, inputs), device, repeats)
        kv = models.cache_bytes(kv_cache(models.prefill(model, inputs)))
        _generate_timed(model, inputs, device, 2, cache)  # warm-up of the decode path
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [_generate_timed(model, inputs, device, new_tokens + 1, cache) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ttft = statistics.median(r[0] for r in runs)
    step = statistics.median(r[1] for r in runs)
    return {"prefill_ms": prefill, "prefill_gpu_busy_ms": None, "ttft_ms": ttft, "decode_tokens_per_s": B / step,
            "peak_memory_gib": peak, "kv_cache_bytes": kv}


def run(names, batches, device, backend: str, new_tokens: int, repeats: int, progress=print,
        cache: str = "dynamic", keep_models: "dict | None" = None) -> list[dict]:
    """One record per model, batch size and budget. ``keep_models``: where given, each model is left in it by
    name for :func:`gpu_busy_pass` (one model a process: no second build), else freed after its rows."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for name in names:
        progress(f"building {name} with random weights on {device} ...")
        model = models.build(name, dtype=dtype, device=device)
        D = model.config.text_config.hidden_size
        N = models.visual_tokens(name)
        for B in batches:
            inputs = models.dummy_inputs(name, B, TEXT_TOKENS, device=device, dtype=dtype)
            for keep in KEEPS:
                k = N if keep is None else hb.keep_budget(keep, N)
                # What `backend` runs at this call's shape (B images of N tokens, k kept): `auto`
                # on CUDA follows the measured table per shape, as a user's prune() would.
                impl = resolve_backend(backend, device, (B, N, k))
                pruning = (contextlib.nullcontext() if keep is None
                           else zspa_kernels.prune(model, keep=k, backend=impl))
                with pruning as handle:
                    stats = measure(model, inputs, device, new_tokens, repeats, cache)
                    if handle is not None:
                        stats["hook_ms"] = hook_ms(handle, model, inputs, device, repeats)
                        stats.update(hook_ops(handle, model, inputs))
                record = {"name": "e2e", "model": name, "impl": "unpruned" if keep is None else impl,
                          "B": B, "N": N, "D": D, "k": k, "kept": k, "dtype": str(dtype).replace("torch.", ""),
                          "tokens": inputs["input_ids"].shape[1], "cache": cache,
                          "median_us": 1e3 * stats["prefill_ms"], **stats, "selection_share": None}
                if keep is not None:
                    record["selection_us"] = selection_us(B, N, D, k, impl, device, dtype)
                    record["selection_share"] = record["selection_us"] * 1e-3 / stats["prefill_ms"]
                    record["hook_share"] = stats["hook_ms"] / stats["prefill_ms"]
                hook = (f", pruning hook {stats['hook_ms']:.2f} ms ({stats['hook_kernels']} kernels, "
                        f"{stats['hook_host_ops']} host ops)" if "hook_ms" in stats else "")
                progress(f"  B={B} kept {k:>3}/{N}: prefill {stats['prefill_ms']:.1f} ms, "
                         f"TTFT {stats['ttft_ms']:.1f} ms, {stats['decode_tokens_per_s']:.0f} tok/s{hook}")
                records.append(record)
        if keep_models is not None:
            keep_models[name] = model
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def gpu_busy_pass(name: str, records: list[dict], device, progress=print, model=None) -> None:
    """Fill ``prefill_gpu_busy_ms`` of ``records`` (this model's, from :func:`run`) on ``model`` (the one
    :func:`run` timed, left by ``keep_models``) or a fresh build of ``name``: after every wall-clock timing of
    the process, since a profiler session can leave CUPTI attached to it (pytorch#144455: kernel launches stay
    slower after it ends), which would slow the host-bound prefills timed after it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model is None:
        progress(f"building {name} again for the prefills' GPU kernel time ...")
        model = models.build(name, dtype=dtype, device=device)
    for record in records:
        inputs = models.dummy_inputs(name, record["B"], TEXT_TOKENS, device=device, dtype=dtype)
        pruning = (contextlib.nullcontext() if record["impl"] == "unpruned"
                   else zspa_kernels.prune(model, keep=record["k"], backend=record["impl"]))
        with pruning, torch.no_grad():
            models.prefill(model, inputs)  # warm-up: the shapes' kernels, the allocator
            record["prefill_gpu_busy_ms"] = gpu_busy_ms(lambda: models.prefill(model, inputs), device)


def earlier_records(path, device) -> list[dict]:
    """The records a previous ``--out`` file holds (none where there is no file yet); a file another device wrote
    is refused, so that one raw file never mixes two machines' timings."""
    import json
    import pathlib

    path = pathlib.Path(path)
    if not path.exists():
        return []
    raw = json.loads(path.read_text())
    here = hb.environment(device)["device"]
    if raw.get("device") != here:
        raise SystemExit(f"bench.e2e: --append: {path} holds results of {raw.get('device')!r}, not of {here!r}")
    return raw["records"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llava-1.5-7b", "qwen2.5-vl-7b"], choices=models.MODELS)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                        help="the cache generate() decodes on (TTFT and decode rate); static: eager")
    parser.add_argument("--out", required=True)
    parser.add_argument("--append", action="store_true",
                        help="keep the records already in --out (the same device's) and add these models' to them: "
                             "bench/run_gpu.sh runs each model in a process of its own")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = earlier_records(args.out, device) if args.append else []
    # One model a process (bench/run_gpu.sh): it stays built for its profiler pass; several are built again there.
    kept = {} if device.type == "cuda" and len(args.models) == 1 else None
    for name in args.models:  # written after each model: a run cut short keeps what finished
        records += run([name], args.batch, device, args.backend, args.new_tokens, args.repeats, cache=args.cache,
                       keep_models=kept)
        hb.save_records(args.out, device, records)
    # Last in this process: no wall-clock timing after a profiler session (gpu_busy_pass). One model a process
    # (bench/run_gpu.sh) has each model's kernel time saved before the next model's timings begin.
    if device.type == "cuda":
        for name in args.models:
            gpu_busy_pass(name, [r for r in records if r["model"] == name], device,
                          model=None if kept is None else kept.pop(name))  # the model freed on return
            torch.cuda.empty_cache()
            hb.save_records(args.out, device, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
