"""Turn raw benchmark output into the committed results: JSON records, a markdown summary, a plot.

    python -m bench.report --micro micro.json [--e2e e2e.json] --out bench/results

``--micro`` is pytest-benchmark's ``--benchmark-json`` of ``bench/test_bench_select_tokens.py``;
``--e2e`` is the output of ``python -m bench.e2e``. Writes ``<date>-<device>.json`` (or ``<stem>.json``)
(``{"device", "date", "torch", "triton", "cuda", "records": [...]}``), ``.md`` and ``.png``.
A record's ``median_us`` is the CUDA-event median where one was taken, else the
median of pytest-benchmark's synchronised host-clock rounds (``timer`` says which).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re

IMPL_ORDER = ("cuda", "triton", "cpu", "reference", "torch_loop_graph", "torch_loop", "divprune_loop")
ENV_KEYS = ("device", "torch", "triton", "cuda")
BASELINES = ("torch_loop_graph", "torch_loop", "divprune_loop")
# The micro JSON's list of the cases a time limit cut before their first timed round (bench/conftest.py).
UNTIMED_CASES = "untimed_cases"
# The micro JSON's list of the cases that failed or were skipped: impl, shape, keep, outcome, reason (bench/conftest.py).
CASE_OUTCOMES = "case_outcomes"


def _complete(info: dict) -> bool:
    """False for a case that a time limit interrupted (run_gpu.sh stops pytest with SIGINT, and
    pytest-benchmark still saves it): it lacks what the test records after timing."""
    if not {*ENV_KEYS, "impl"} <= set(info):
        return False
    return info["device"].startswith("cpu ") or "cuda_event_median_us" in info


def micro_records(raw: dict) -> tuple[dict, list[dict]]:
    """The environment (``interrupted_cases``, ``overrides`` and ``case_outcomes`` where there are any) and one
    record per timed case of a micro JSON."""
    env, records, loads, overrides = {}, [], [], {}
    outcomes = raw.get(CASE_OUTCOMES, [])
    failed = {o["nodeid"] for o in outcomes if o["outcome"] == "failed"}
    interrupted = len(raw.get(UNTIMED_CASES, ()))  # cut before a timed round: not in the JSON's benchmarks
    for bench in raw["benchmarks"]:
        info = dict(bench["extra_info"])
        if not _complete(info):
            interrupted += bench.get("fullname") not in failed  # a case that failed after its rounds is no cut
            continue
        env = {key: info.pop(key) for key in ENV_KEYS}
        if "load_average_1min" in info:
            loads.append(info.pop("load_average_1min"))
        overrides.update(info.pop("overrides", {}))
        event = info.pop("cuda_event_median_us", None)
        info.update(
            median_us=event if event is not None else bench["stats"]["median"] * 1e6,
            timer="cuda_events" if event is not None else "host_clock",
            host_median_us=bench["stats"]["median"] * 1e6,
            rounds=bench["stats"]["rounds"],
        )
        records.append(info)
    if loads:
        env["load_average_1min"] = [min(loads), max(loads)]
    if interrupted:
        env["interrupted_cases"] = interrupted
    if overrides:
        env["overrides"] = overrides
    if outcomes:
        env["case_outcomes"] = outcomes
    return env, records


def _fmt(us) -> str:
    if us is None:
        return "—"
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def _overrides(env: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(env["overrides"].items()))


def micro_table(records: list[dict], outcomes: list[dict] = ()) -> list[str]:
    """One row per case timed; a cell without a time says why: ``skipped`` (by rule: the bytes it would move),
    ``failed`` (the micro log has the error), ``not run`` (the run's time limit came first). ``outcomes``:
    :data:`CASE_OUTCOMES`."""
    why = {(o["impl"], o["shape"], o["keep"]): o["outcome"] for o in outcomes}
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in records)
             or any((o["impl"], o["outcome"]) == (i, "failed") for o in outcomes)]
    cases = sorted({(r["N"], r["B"], r["k"], r["shape"], r["keep"], r["D"]) for r in records})
    loops = [i for i in impls if i in BASELINES]
    ratio = "cpu" in impls and bool(loops)  # the CPU backend against the best loop it replaces
    lines = ["| shape | B | N | D | keep (k) | greedy steps | floor | " + " | ".join(impls)
             + (" | best loop / cpu |" if ratio else " |"),
             "|---|---|---|---|---|---|---|" + "---|" * (len(impls) + ratio)]
    for N, B, k, shape, keep, D in cases:
        here = {r["impl"]: r for r in records if (r["shape"], r["k"]) == (shape, k)}
        first = next(iter(here.values()))
        cells = [_fmt(here[i]["median_us"]) if i in here else why.get((i, shape, keep), "not run") for i in impls]
        if ratio:
            best = min((here[i]["median_us"] for i in loops if i in here), default=None)
            cells.append("—" if best is None or "cpu" not in here else f"{best / here['cpu']['median_us']:.1f}x")
        lines.append(f"| {shape} | {B} | {N} | {D} | {keep} ({k}) | {k - first['k_core']} | "
                     f"{_fmt(first['floor_us'])} | " + " | ".join(cells) + " |")
    return lines


def e2e_table(records: list[dict]) -> list[str]:
    lines = ["| model | dtype | B | visual tokens kept | prefill | of it GPU kernels | TTFT | decode tok/s | "
             "peak memory | KV cache | selection share | pruning hook (share) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        share = "—" if r.get("selection_share") is None else f"{100 * r['selection_share']:.2f}%"
        hook = "—" if r.get("hook_ms") is None else f"{r['hook_ms']:.2f} ms ({100 * r['hook_share']:.1f}%)"
        if r.get("hook_kernels") is not None:  # runs before the ops were counted have none
            hook += f", {r['hook_kernels']} kernels + {r['hook_host_ops']} host ops"
        peak = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f} GiB"
        busy = "—" if r.get("prefill_gpu_busy_ms") is None else f"{r['prefill_gpu_busy_ms']:.1f} ms"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['B']} | {r['kept']} of {r['N']} | {r['prefill_ms']:.1f} ms | "
                     f"{busy} | {r['ttft_ms']:.1f} ms | {r['decode_tokens_per_s']:.0f} | {peak} | "
                     f"{r['kv_cache_bytes'] / 2**20:.1f} MiB | {share} | {hook} |")
    return lines


FUSED = ("cuda", "triton")
# auto picks cuda for a shape only where its CUDA-event median beats triton's by more than this
# (run-to-run medians of one kernel on one GPU move by a few percent).
AUTO_MARGIN = 0.10


def auto_table(records: list[dict], source: str, device: str) -> dict:
    """The table ``zspa_kernels/auto_cuda.json`` that ``dispatch`` reads: every case timed on
    both fused backends with CUDA events, and the one ``auto`` should run there."""
    cases = []
    for key in sorted({(r["B"], r["N"], r["k"]) for r in records if r["impl"] in FUSED}):
        times = {r["impl"]: r["median_us"] for r in records
                 if (r["B"], r["N"], r["k"]) == key and r["impl"] in FUSED and r["timer"] == "cuda_events"}
        if len(times) == 2:
            backend = "cuda" if times["cuda"] < (1 - AUTO_MARGIN) * times["triton"] else "triton"
            cases.append(dict(zip(("B", "N", "k"), key), triton_us=times["triton"], cuda_us=times["cuda"],
                              backend=backend))
    return {"source": source, "device": device, "margin": AUTO_MARGIN,
            "rule": f"cuda where its CUDA-event median is more than {AUTO_MARGIN:.0%} below triton's", "cases": cases}


def _best_fused(records: list[dict], shape: str, k: int, key: str = "median_us"):
    """(value, backend) of the fastest fused backend on ``shape`` at budget ``k``, or None."""
    found = [(r[key], r["impl"]) for r in records
             if r["impl"] in FUSED and r["shape"] == shape and r["k"] == k and key in r]
    return min(found) if found else None


def _loop(records: list[dict], impl: str, shape: str, k: int) -> "dict | None":
    return next((r for r in records if (r["impl"], r["shape"], r["k"]) == (impl, shape, k)), None)


def targets_table(micro: list[dict], profile: list[dict], e2e: list[dict]) -> list[str]:
    """The GPU targets (SPEC §7 shapes; the numbers of the GPU issue): each one measured or not, met
    or missed by how much. GPU time is the CUDA-graph replay where bench.profile ran, else the
    CUDA-event median; ``found`` values are ``(value, what measured it)``."""
    rows = []

    def row(target: str, found, limit: float, lower_is_better: bool, fmt=_fmt):
        if found is None or found[0] is None:
            rows.append(f"| {target} | not measured | — |")
            return
        value, source = found
        met = value <= limit if lower_is_better else value >= limit
        off = value / limit if lower_is_better else limit / value
        rows.append(f"| {target} | {fmt(value)}{f' ({source})' if source else ''} | "
                    f"{'met' if met else f'missed, {off:.1f}x off'} |")

    def times(v):
        return f"{v:.1f}x"

    # GPU time: the graph replay (back to back on one input: the tokens stay in L2, as a projector that has just
    # written them leaves them), the CUDA-event median (do_bench, L2 flushed) beside it; either alone without it.
    graph, event = _best_fused(profile, "llava-1.5", 64, "graph_us"), _best_fused(micro, "llava-1.5", 64)
    flushed = None if event is None else f"CUDA events, L2 flushed: {_fmt(event[0])} ({event[1]})"
    gpu_time = event and (event[0], f"{event[1]}, CUDA events, L2 flushed")
    if graph is not None:
        gpu_time = (graph[0], f"{graph[1]}, CUDA-graph replay, L2 warm" + (f"; {flushed}" if flushed else ""))
    row("LLaVA-1.5 B=1, k=64: GPU time ≤ 40 µs (stretch: 20 µs)", gpu_time, 40, True)
    row("LLaVA-1.5 B=1, k=64: wall clock per eager call ≤ 60 µs", _best_fused(profile, "llava-1.5", 64, "eager_us"),
        60, True)
    # Against the loops, per call as a caller waits for it (host clock, synchronised): a loop's CUDA-event time
    # is its wall time (the GPU waits on its Python), the fused op's is its GPU time alone (do_bench queues
    # calls behind its L2 flush), so their ratio would leave the op's host time out. It is shown beside.
    fused = _best_fused(micro, "llava-1.5", 64, "host_median_us")
    for loop, factor in (("torch_loop", 20), ("divprune_loop", 50)):
        base = _loop(micro, loop, "llava-1.5", 64)
        speedup = None
        if fused is not None and base is not None:
            # The event ratio of the backend the verdict is about, not of whichever fused one had the best events.
            same = _loop(micro, fused[1], "llava-1.5", 64)
            by_events = base["median_us"] / same["median_us"] if same["timer"] == "cuda_events" else None
            speedup = (base["host_median_us"] / fused[0], f"{fused[1]}, per call with its sync"
                       + (f"; by CUDA events {by_events:.1f}x" if by_events else ""))
        row(f"LLaVA-1.5 B=1, k=64: ≥ {factor}x {loop}", speedup, factor, False, times)
    row("LLaVA-1.5 B=32, k=64 ≤ 200 µs", _best_fused(micro, "llava-1.5-b32", 64), 200, True)
    row("video N=16384, D=3584, k=1638 ≤ 10 ms", _best_fused(micro, "video", 1638), 1e4, True)
    llava8 = [r for r in e2e if r["model"] == "llava-1.5-7b" and r["B"] == 8]
    full = next((r for r in llava8 if r["impl"] == "unpruned"), None)
    pruned = next((r for r in llava8 if r["impl"] != "unpruned" and r["kept"] == 64), None)
    both = full is not None and pruned is not None
    row("LLaVA-1.5-7B B=8, 64 of 576 kept: prefill ≥ 4x faster",
        (full["prefill_ms"] / pruned["prefill_ms"], pruned["impl"]) if both else None, 4, False, times)
    # The eager model's host time is the same at any token count; its GPU kernels' time is what
    # pruning removes. Beside the target, not instead of it: it says which of the two a miss is.
    busy = both and full.get("prefill_gpu_busy_ms") is not None and (pruned.get("prefill_gpu_busy_ms") or 0) > 0
    row("the same, GPU kernel time of the prefill only (the host's launches left out)",
        (full["prefill_gpu_busy_ms"] / pruned["prefill_gpu_busy_ms"], pruned["impl"]) if busy else None, 4, False,
        times)
    row("the same: selection ≤ 1 % of the pruned prefill",
        None if pruned is None else (100 * pruned["selection_share"], pruned["impl"]), 1, True, lambda v: f"{v:.2f}%")
    return ["| target | measured | verdict |", "|---|---|---|"] + rows


def profile_table(records: list[dict]) -> list[str]:
    lines = ["| backend | shape | B | k (core) | GPU time (events) | graph replay | eager wall / call | "
             "host / call | of it the backend's | of that its scratch | fixed | per greedy step | cuBLAS Gram | "
             "split Gram |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['impl']} | {r['shape']} | {r['B']} | {r['k']} ({r['k_core']}) | {_fmt(r['gpu_us'])} | "
                     f"{_fmt(r['graph_us'])} | {_fmt(r['eager_us'])} | {_fmt(r.get('host_us'))} | "
                     f"{_fmt(r.get('host_backend_us'))} | {_fmt(r.get('host_scratch_us'))} | "
                     f"{_fmt(r['fixed_us'])} | "
                     f"{r['step_us']:.2f} µs | {_fmt(r.get('gram_us'))} | {_fmt(r.get('gram_split_us'))} |")
    return lines


def plot(records: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = sorted({r["keep"] for r in records}, key=lambda s: (s.endswith("%"), s))
    fig, axes = plt.subplots(1, len(keeps), figsize=(5 * len(keeps), 4), squeeze=False)
    for ax, keep in zip(axes[0], keeps):
        for impl in IMPL_ORDER:
            points = sorted((r["N"], r["median_us"]) for r in records
                            if r["impl"] == impl and r["keep"] == keep and r["B"] == 1)
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        floor = sorted({(r["N"], r["floor_us"]) for r in records if r["keep"] == keep and r["B"] == 1})
        if floor:
            ax.plot(*zip(*floor), linestyle=":", color="grey", label="floor (one read)")
        ax.set(xscale="log", yscale="log", xlabel="visual tokens N (B=1)", ylabel="median latency (µs)",
               title=f"keep {keep}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def this_device() -> str:
    import torch

    from zspa_kernels.benchmark import environment

    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))["device"]


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def run_stem(date: str, device: str, results: pathlib.Path) -> str:
    """``<date>-<device>``, or ``<date>-<device>-runN`` (N = 2, 3, ...) when files of that stem are
    already in ``results``: a second run on one day must not overwrite the first's committed files."""
    base = f"{date}-{slug(device)}"
    taken = {p.name for p in results.iterdir()} if results.is_dir() else set()
    stem, n = base, 1
    while any(name.startswith(f"{stem}.") for name in taken):
        n += 1
        stem = f"{base}-run{n}"
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=pathlib.Path, help="pytest-benchmark JSON")
    parser.add_argument("--e2e", type=pathlib.Path, help="end-to-end JSON from bench.e2e")
    parser.add_argument("--demo", type=pathlib.Path, help="saved output of `zspa demo` (a .demo.png beside it)")
    parser.add_argument("--profile", type=pathlib.Path, help="time split JSON from bench.profile")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--auto-table", type=pathlib.Path,
                        help="also write auto's table here (zspa_kernels/auto_cuda.json) from a GPU run")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--stem",
                        help="the files' common name (default <date>-<device>; run_gpu.sh passes --print-stem's)")
    parser.add_argument("--print-stem", action="store_true",
                        help="print this run's stem and exit: <date>-<device> of this machine, with -runN appended "
                             "when --out already holds files of that name")
    args = parser.parse_args(argv)
    if args.print_stem:
        print(run_stem(args.date, this_device(), args.out))
        return 0
    if args.micro is None:
        parser.error("--micro is required")

    env, records = micro_records(json.loads(args.micro.read_text()))
    e2e_raw = json.loads(args.e2e.read_text()) if args.e2e else {}
    profile_raw = json.loads(args.profile.read_text()) if args.profile else {}
    e2e, split = e2e_raw.get("records", []), profile_raw.get("records", [])
    if "device" not in env:  # no microbenchmark case finished: the other raw files name the device
        env.update({key: raw[key] for raw in (profile_raw, e2e_raw) for key in ENV_KEYS if key in raw})
    if "device" not in env:
        parser.error(f"{args.micro}: no microbenchmark case finished, and no --e2e or --profile file names the device")
    result = {**env, "date": args.date, "records": records + e2e, "profile": split}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.stem or f"{args.date}-{slug(env['device'])}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if args.auto_table:
        table = auto_table(records, f"bench/results/{stem.name}.json", env["device"])
        if env.get("overrides"):  # e.g. the smoke stage's ZSPA_CUDA_GREEDY=block: not the path auto runs
            print(f"--auto-table: the run forced {_overrides(env)}: its times are not of the paths auto runs, "
                  "no table written")
        elif table["cases"]:
            args.auto_table.write_text(json.dumps(table, indent=1) + "\n")
        else:
            print("--auto-table: no case was timed on both fused backends with CUDA events: no table written")

    title = f"{env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · {args.date}"
    lines = [f"# select_tokens benchmarks: {env['device']}", "",
             f"{title}. bf16 inputs, core ratio 0.5, median latency of one call (pick order out); "
             "floor = reading the tokens once at the measured copy bandwidth. "
             f"Timer: {', '.join(sorted({r['timer'] for r in records}))}."]
    if "interrupted_cases" in env:
        lines += ["", f"**Cut short**: the run's time limit interrupted {env['interrupted_cases']} case(s); "
                  "they are left out, and cases after them were not run."]
    if env.get("overrides"):
        lines += ["", f"**Forced paths**: this run set {_overrides(env)}; its times are of those paths, not of "
                  "what `auto` runs."]
    if "load_average_1min" in env:
        low, high = env["load_average_1min"]
        threads = env["device"].split(" x")[-1]  # "2 threads"
        lines += ["", f"**CPU load**: the 1-minute load average was {low:.1f} to {high:.1f} during the run "
                  f"({threads}; the benchmark's own threads count, so up to that many means an otherwise idle "
                  "machine; above it, other jobs' work inflates and scatters these timings)."]
    if any(r["timer"] == "cuda_events" for r in records):
        lines += ["", "## Targets", ""] + targets_table(records, split, e2e)
    lines += ["", "## Microbenchmarks", ""]
    lines += micro_table(records, env.get("case_outcomes", ()))
    timed = [i for i in IMPL_ORDER if any(r["impl"] == i for r in records)]
    lines += ["", f"Implementations timed on this device: {', '.join(timed)}. `skipped`: the case would move "
              "too many bytes per call to finish in seconds here (see `traffic_bytes` in "
              "`zspa_kernels/benchmark.py`); `failed`: it raised (below); `not run`: the run's time limit came "
              "first. A shape missing from the table had no case timed."]
    failures = [o for o in env.get("case_outcomes", ()) if o["outcome"] == "failed"]
    if failures:
        lines += ["", "**Failed cases**:", ""] + [f"- {o['impl']}, {o['shape']}, keep {o['keep']}: {o['reason']}"
                                                  for o in failures]
    if split:
        lines += ["", "## Where the time goes (bench/profile.py: bf16, core ratio 0.5)", ""] + profile_table(split)
        lines += ["", "Fixed and per-step costs: a least-squares line through the graph-replay times at 0, 32, 96 "
                  "and 224 greedy steps after a 32-token core."]
    if e2e:
        lines += ["", "## End to end (random weights; peak memory is tracked on GPUs only)", ""] + e2e_table(e2e)
    if args.demo:
        lines += ["", "## `zspa demo`", "", "```text", args.demo.read_text().rstrip(), "```"]
        picture = args.demo.with_suffix(".png")
        if picture.is_file():
            lines += ["", f"![kept patches]({picture.name})"]
    if records:  # nothing to plot when no microbenchmark case finished
        lines += ["", f"![latency against N]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    if records:
        plot(records, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.json, .md{', .png' if records else ''} ({len(records)} microbenchmark and {len(e2e)} "
          "end-to-end records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
