"""bench/report.py and bench/profile.py's arithmetic, on synthetic raw results (no GPU, no timing):
the GPU targets are judged from the right records, and a missing measurement says so; and
bench/tune.py's variants on a tiny shape (no timing asserted)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bench import profile, report
from zspa_kernels import benchmark
from zspa_kernels.dispatch import available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}


def _bench(impl, shape, B, N, D, k, us, event=True, device=ENV["device"], host=None):
    info = {**ENV, "device": device, "name": "select_tokens", "impl": impl, "shape": shape, "B": B, "N": N, "D": D, "k": k,
            "keep": str(k), "k_core": k // 2, "dtype": "bfloat16", "floor_us": 1.0, "bandwidth_gbps": 4000.0}
    if event:
        info["cuda_event_median_us"] = us
    return {"extra_info": info, "stats": {"median": (host or 2 * us) * 1e-6, "rounds": 10}}


def _split(backend, graph, eager):
    record = {"impl": backend, "shape": "llava-1.5", "B": 1, "N": 576, "D": 4096, "k": 64, "k_core": 32,
              "gpu_us": graph + 5, "graph_us": graph, "eager_us": eager, "host_us": eager - 3,
              "host_backend_us": eager - 9, "fixed_us": 10.0,
              "step_us": 0.5}
    if backend == "triton":
        record["host_scratch_us"] = 12.0
    return record


def _e2e(impl, kept, prefill, share=None, busy=None, hook=None, ops=None):
    record = {"name": "e2e", "model": "llava-1.5-7b", "impl": impl, "B": 8, "N": 576, "D": 4096, "k": kept,
              "kept": kept, "dtype": "bfloat16", "tokens": 609, "median_us": 1e3 * prefill, "prefill_ms": prefill,
              "ttft_ms": prefill, "decode_tokens_per_s": 100.0, "peak_memory_gib": 14.0, "kv_cache_bytes": 2**20,
              "selection_share": share, "prefill_gpu_busy_ms": busy}
    if hook is not None:  # runs before the pruning hook's timing have none
        record.update(hook_ms=hook, hook_share=hook / prefill)
    if ops is not None:  # nor have runs before its ops were counted
        record.update(hook_kernels=ops[0], hook_host_ops=ops[1])
    return record


def _write(tmp_path, benchmarks, split=None, e2e=None, stem="2026-01-01-nvidia-h200"):
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": benchmarks}))
    argv = ["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path), "--date", "2026-01-01"]
    if split is not None:
        (tmp_path / "split.json").write_text(json.dumps({**ENV, "records": split}))
        argv += ["--profile", str(tmp_path / "split.json")]
    if e2e is not None:
        (tmp_path / "e2e.json").write_text(json.dumps({**ENV, "records": e2e}))
        argv += ["--e2e", str(tmp_path / "e2e.json")]
    assert report.main(argv) == 0
    return (tmp_path / f"{stem}.md").read_text()


def _target(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {start}"))


def test_a_second_run_on_one_day_gets_its_own_stem(tmp_path):
    """run_gpu.sh names a run's files by --print-stem: a run on a day whose results are already
    committed must not overwrite them."""
    assert report.run_stem("2026-01-01", "NVIDIA H200", tmp_path) == "2026-01-01-nvidia-h200"
    (tmp_path / "2026-01-01-nvidia-h200.tests.log").write_text("")
    (tmp_path / "2026-01-01-nvidia-h100.json").write_text("")  # another device: no clash
    assert report.run_stem("2026-01-01", "NVIDIA H200", tmp_path) == "2026-01-01-nvidia-h200-run2"
    (tmp_path / "2026-01-01-nvidia-h200-run2.md").write_text("")
    assert report.run_stem("2026-01-01", "NVIDIA H200", tmp_path) == "2026-01-01-nvidia-h200-run3"
    assert report.run_stem("2026-01-01", "NVIDIA H200", tmp_path / "missing") == "2026-01-01-nvidia-h200"
    # the report writes under the stem it is given
    micro = [_bench("cuda", "llava-1.5", 1, 576, 4096, 64, 50.0)]
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": micro}))
    assert report.main(["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path), "--date", "2026-01-01",
                        "--stem", "2026-01-01-nvidia-h200-run3"]) == 0
    assert {p.suffix for p in tmp_path.glob("2026-01-01-nvidia-h200-run3.*")} == {".json", ".md", ".png"}
    assert "2026-01-01-nvidia-h200-run3.png" in (tmp_path / "2026-01-01-nvidia-h200-run3.md").read_text()


def test_targets_are_judged_from_the_best_fused_backend(tmp_path):
    micro = [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0), _bench("cuda", "llava-1.5", 1, 576, 4096, 64, 50.0),
             _bench("torch_loop", "llava-1.5", 1, 576, 4096, 64, 450.0),
             _bench("divprune_loop", "llava-1.5", 1, 576, 4096, 64, 3000.0),
             _bench("cuda", "llava-1.5-b32", 32, 576, 4096, 64, 400.0),
             _bench("triton", "video", 1, 16384, 3584, 1638, 9000.0)]
    split = [_split("triton", 25.0, 70.0), _split("cuda", 18.0, 90.0)]
    e2e = [_e2e("unpruned", 576, 800.0, busy=700.0), _e2e("triton", 64, 160.0, share=0.004, busy=100.0, hook=2.4),
           _e2e("triton", 58, 150.0, 0.004), _e2e("triton", 58, 150.0, 0.004, hook=1.5, ops=(31, 150))]
    md = _write(tmp_path, micro, split, e2e)
    # graph replay, best backend, the flushed event median beside it
    assert ("18.0 µs (cuda, CUDA-graph replay, L2 warm; CUDA events, L2 flushed: 30.0 µs (triton)) | met"
            in _target(md, "LLaVA-1.5 B=1, k=64: GPU time"))
    assert "70.0 µs (triton) | missed, 1.2x off" in _target(md, "LLaVA-1.5 B=1, k=64: wall clock")
    assert ("15.0x (triton, per call with its sync; by CUDA events 15.0x) | missed, 1.3x off"
            in _target(md, "LLaVA-1.5 B=1, k=64: ≥ 20x torch_loop"))
    assert "100.0x (triton, per call with its sync; by CUDA events 100.0x) | met" in _target(
        md, "LLaVA-1.5 B=1, k=64: ≥ 50x divprune_loop")
    assert "400.0 µs (cuda) | missed, 2.0x off" in _target(md, "LLaVA-1.5 B=32")
    assert "9000.0 µs (triton) | met" in _target(md, "video")
    assert "5.0x (triton) | met" in _target(md, "LLaVA-1.5-7B B=8")
    assert "7.0x (triton) | met" in _target(md, "the same, GPU kernel time")  # 700 / 100 ms of kernels
    assert "0.40% (triton) | met" in _target(md, "the same: selection")
    # the time split table: events, graph replay, eager wall, host alone, the backend's share, its scratch's
    # (Triton's only: cuda allocates in C++), fixed, per step
    assert "| cuda | llava-1.5 | 1 | 64 (32) | 23.0 µs | 18.0 µs | 90.0 µs | 87.0 µs | 81.0 µs | — | 10.0 µs | 0.50 µs |" in md
    assert "| triton | llava-1.5 | 1 | 64 (32) | 30.0 µs | 25.0 µs | 70.0 µs | 67.0 µs | 61.0 µs | 12.0 µs | 10.0 µs |" in md
    # the e2e table: the selection's share, then the whole pruning hook and its share ("—" where not timed)
    assert "| 0.40% | 2.40 ms (1.5%) |" in md and "| 0.40% | — |" in md
    assert "| 0.40% | 1.50 ms (1.0%), 31 kernels + 150 host ops |" in md  # and its ops where counted
    saved = json.loads((tmp_path / "2026-01-01-nvidia-h200.json").read_text())
    assert len(saved["records"]) == len(micro) + len(e2e) and saved["profile"] == split


def test_unmeasured_targets_say_so_and_host_clock_runs_have_none(tmp_path):
    md = _write(tmp_path, [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0)])
    assert "30.0 µs (triton, CUDA events, L2 flushed) | met" in _target(md, "LLaVA-1.5 B=1, k=64: GPU time")  # no profile
    assert "not measured" in _target(md, "LLaVA-1.5 B=1, k=64: wall clock")
    assert "not measured" in _target(md, "LLaVA-1.5-7B B=8")
    assert "not measured" in _target(md, "the same, GPU kernel time")
    micro = [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0)]
    unseen = _write(tmp_path, micro, e2e=[_e2e("unpruned", 576, 800.0, busy=700.0), _e2e("triton", 64, 160.0, 0.004, busy=0.0)])
    assert "not measured" in _target(unseen, "the same, GPU kernel time")  # no kernel seen: no ratio, no crash
    cpu = _write(tmp_path, [_bench("cpu", "llava-1.5", 1, 576, 4096, 64, 2000.0, event=False,
                                   device="cpu test x2 threads")], stem="2026-01-01-cpu-test-x2-threads")
    assert "## Targets" not in cpu and "Cut short" not in cpu


def test_eager_and_host_timings_read_the_clock_after_or_before_the_sync(monkeypatch):
    """eager_us waits for the device before reading the clock, host_us does not: a stand-in
    device whose synchronise takes 20 ms shows up in one and not the other."""
    import time

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: time.sleep(0.02))
    monkeypatch.setattr(profile, "EAGER_CALLS", 10)
    monkeypatch.setattr(profile, "HOST_CALLS", 10)
    calls = []
    assert profile.host_us(lambda: calls.append(1)) < 1000  # µs a call: nothing but the issuing
    assert profile.eager_us(lambda: calls.append(1)) >= 2000  # the 20 ms sync over 10 calls
    assert len(calls) == 2 * (1 + 5 * 10)  # a warm-up, then 5 runs of 10 calls each


def test_time_split_is_a_least_squares_line():
    intercept, slope = profile.fit_line(profile.STEPS, [12.0 + 0.75 * s for s in profile.STEPS])
    assert intercept == pytest.approx(12.0) and slope == pytest.approx(0.75)


def test_auto_table_picks_cuda_only_beyond_the_margin(tmp_path):
    micro = [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0), _bench("cuda", "llava-1.5", 1, 576, 4096, 64, 20.0),
             _bench("triton", "llava-1.5-b32", 32, 576, 4096, 64, 100.0),
             _bench("cuda", "llava-1.5-b32", 32, 576, 4096, 64, 95.0),
             _bench("triton", "video", 1, 16384, 3584, 1638, 9000.0)]  # cuda not timed there
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": micro}))
    table_path = tmp_path / "auto_cuda.json"
    assert report.main(["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path), "--date", "2026-01-01",
                        "--auto-table", str(table_path)]) == 0
    table = json.loads(table_path.read_text())
    assert table["source"] == "bench/results/2026-01-01-nvidia-h200.json" and table["device"] == "NVIDIA H200"
    assert [(c["B"], c["backend"]) for c in table["cases"]] == [(1, "cuda"), (32, "triton")]  # 5% is noise


def test_cases_a_time_limit_interrupted_are_left_out_and_said(tmp_path):
    done = _bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0)
    cut = _bench("cuda", "llava-1.5", 1, 576, 4096, 64, 20.0, event=False)  # no CUDA-event median yet
    bare = {"extra_info": {}, "stats": {"median": 1e-3, "rounds": 1}}  # interrupted while timing
    md = _write(tmp_path, [done, cut, bare])
    assert "interrupted 2 case(s)" in md and "30.0 µs (triton," in _target(md, "LLaVA-1.5 B=1, k=64: GPU time")
    saved = json.loads((tmp_path / "2026-01-01-nvidia-h200.json").read_text())
    assert [r["impl"] for r in saved["records"]] == ["triton"]


def test_the_loops_speed_ups_are_judged_per_call_as_a_caller_waits(tmp_path):
    """A Python loop's CUDA-event time is its wall time, the fused op's its GPU time alone (do_bench queues calls
    behind its L2 flush): the ratio the target is judged by is of the synchronised host-clock medians, and the
    events' one stands beside it."""
    micro = [_bench("cuda", "llava-1.5", 1, 576, 4096, 64, 40.0, host=100.0),
             _bench("torch_loop", "llava-1.5", 1, 576, 4096, 64, 1000.0, host=1000.0)]
    md = _write(tmp_path, micro)
    assert ("10.0x (cuda, per call with its sync; by CUDA events 25.0x) | missed, 2.0x off"
            in _target(md, "LLaVA-1.5 B=1, k=64: ≥ 20x torch_loop"))


def test_the_event_ratio_beside_a_loop_verdict_is_the_same_backends(tmp_path):
    """cuda is fastest per call, triton by CUDA events: the side ratio is cuda's (1000 / 50), not triton's
    (1000 / 30), so the line never pairs one backend's verdict with another's number."""
    micro = [_bench("cuda", "llava-1.5", 1, 576, 4096, 64, 50.0, host=80.0),
             _bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0, host=120.0),
             _bench("torch_loop", "llava-1.5", 1, 576, 4096, 64, 1000.0, host=1000.0)]
    md = _write(tmp_path, micro)
    assert ("12.5x (cuda, per call with its sync; by CUDA events 20.0x) | missed, 1.6x off"
            in _target(md, "LLaVA-1.5 B=1, k=64: ≥ 20x torch_loop"))


def test_a_case_without_a_time_says_whether_it_failed_was_skipped_or_not_reached(tmp_path):
    """The micro JSON holds the timed cases only; bench/conftest.py lists the failed and skipped ones, and the
    table tells them from the cases the time limit never reached (run 1 printed its failed cuda cases as
    "skipped")."""
    micro = [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 30.0), _bench("triton", "video", 1, 16384, 3584, 64, 900.0),
             _bench("divprune_loop", "llava-1.5", 1, 576, 4096, 64, 3000.0)]
    outcomes = [{"nodeid": "a", "impl": "cuda", "shape": "llava-1.5", "keep": "64", "outcome": "failed",
                 "reason": "RuntimeError: too much shared memory"},
                {"nodeid": "b", "impl": "divprune_loop", "shape": "video", "keep": "64", "outcome": "skipped",
                 "reason": "divprune_loop would move ~9 GB per call"}]
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": micro, report.CASE_OUTCOMES: outcomes}))
    assert report.main(["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path), "--date", "2026-01-01"]) == 0
    md = (tmp_path / "2026-01-01-nvidia-h200.md").read_text()
    assert "| llava-1.5 | 1 | 576 | 4096 | 64 (64) | 32 | 1.0 µs | failed | 30.0 µs | 3000.0 µs |" in md  # cuda failed
    assert "| video | 1 | 16384 | 3584 | 64 (64) | 32 | 1.0 µs | not run | 900.0 µs | skipped |" in md
    assert "- cuda, llava-1.5, keep 64: RuntimeError: too much shared memory" in md


def test_a_run_that_forced_a_path_says_so_and_writes_no_table_for_auto(tmp_path):
    """The smoke stage forces ZSPA_CUDA_GREEDY=block where the cluster kernel fails: the cuda times are then
    the block kernel's, which auto would not run; the report says so and writes no auto table from them."""
    micro = [_bench("triton", "llava-1.5", 1, 576, 4096, 64, 100.0), _bench("cuda", "llava-1.5", 1, 576, 4096, 64, 50.0)]
    for b in micro:
        b["extra_info"]["overrides"] = {"ZSPA_CUDA_GREEDY": "block"}
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": micro}))
    table = tmp_path / "auto_cuda.json"
    assert report.main(["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path), "--date", "2026-01-01",
                        "--auto-table", str(table)]) == 0
    assert not table.exists()
    md = (tmp_path / "2026-01-01-nvidia-h200.md").read_text()
    assert "**Forced paths**: this run set ZSPA_CUDA_GREEDY=block" in md
    saved = json.loads((tmp_path / "2026-01-01-nvidia-h200.json").read_text())
    assert saved["overrides"] == {"ZSPA_CUDA_GREEDY": "block"} and "overrides" not in saved["records"][0]


def test_the_benchmarks_environment_names_the_paths_forced(monkeypatch):
    for name in benchmark.PATH_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    assert "overrides" not in benchmark.environment(torch.device("cpu"))
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", "block")
    monkeypatch.setenv("ZSPA_GRAM_BUDGET", " ")  # empty: not set
    assert benchmark.environment(torch.device("cpu"))["overrides"] == {"ZSPA_CUDA_GREEDY": "block"}


def _micro_run(folder, test_file: str):
    """``test_file`` of ``folder`` run by pytest as the micro stage runs it: ``(its JSON's path, the process)``."""
    out = folder / "micro-raw.json"
    # Not an xdist worker's variables: pytest-benchmark reads them as xdist at work and times nothing.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")},
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--rootdir", str(folder), f"--benchmark-json={out}", test_file],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    return out, run


def test_the_micro_json_names_the_cases_that_failed_or_were_skipped(tmp_path):
    """bench/conftest.py records each case of the microbenchmark's parameters that fails or is skipped, with the
    first line of why, in the JSON pytest-benchmark writes."""
    (tmp_path / "conftest.py").write_text(
        "from bench.conftest import pytest_benchmark_generate_json, pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text("""
import pytest
from zspa_kernels.benchmark import SMOKE_SHAPES

@pytest.mark.parametrize("keep", [64, 0.1])
@pytest.mark.parametrize("shape", SMOKE_SHAPES[:1], ids=lambda s: s.label)
@pytest.mark.parametrize("impl", ["cuda", "torch_loop"])
def test_select_tokens(benchmark, impl, shape, keep):
    if impl == "torch_loop":
        pytest.skip("torch_loop would move too much")
    if keep == 64:
        raise RuntimeError("launch failed\\nits second line")
    benchmark.pedantic(lambda: None, rounds=2)
""")
    out, run = _micro_run(tmp_path, "test_cases.py")
    assert run.returncode == 1, run.stdout + run.stderr  # one failure
    label = benchmark.SMOKE_SHAPES[0].label
    outcomes = [(o["impl"], o["shape"], o["keep"], o["outcome"], o["reason"])
                for o in json.loads(out.read_text())[report.CASE_OUTCOMES]]
    assert outcomes == [("cuda", label, "64", "failed", "launch failed"),
                        ("torch_loop", label, "64", "skipped", "torch_loop would move too much"),
                        ("torch_loop", label, "10%", "skipped", "torch_loop would move too much")]


def test_a_case_cut_before_its_first_round_costs_no_other_case_its_results(tmp_path):
    """The micro stage's time limit (SIGINT) landing in a case's warm-up round: pytest-benchmark
    registers the case with no timings and, left alone, fails on it and writes no JSON at all.
    bench/conftest.py leaves it out and names it; the report counts it as interrupted."""
    info = {**ENV, "name": "select_tokens", "impl": "triton", "shape": "llava-1.5", "B": 1, "N": 576, "D": 4096,
            "k": 64, "keep": "64", "k_core": 32, "dtype": "bfloat16", "floor_us": 1.0, "bandwidth_gbps": 4000.0,
            "cuda_event_median_us": 30.0}
    (tmp_path / "conftest.py").write_text("from bench.conftest import pytest_benchmark_generate_json  # noqa: F401\n")
    (tmp_path / "test_cut.py").write_text(f"""
def test_finished(benchmark):
    benchmark.pedantic(lambda: None, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({info!r})

def test_cut(benchmark):
    def cut():
        raise KeyboardInterrupt  # what SIGINT raises where it lands: here, the warm-up round
    benchmark.pedantic(cut, rounds=3, warmup_rounds=1)
""")
    out, run = _micro_run(tmp_path, "test_cut.py")
    assert run.returncode == 2 and "KeyboardInterrupt" in run.stdout, run.stdout + run.stderr  # pytest: interrupted
    assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    raw = json.loads(out.read_text())
    assert [b["name"] for b in raw["benchmarks"]] == ["test_finished"]
    assert raw[report.UNTIMED_CASES] == ["test_cut.py::test_cut"]
    env_info, records = report.micro_records(raw)
    assert env_info["interrupted_cases"] == 1 and [r["impl"] for r in records] == ["triton"]


def test_a_report_without_a_finished_microbenchmark_names_the_device_from_the_other_files(tmp_path):
    """The micro stage cut before its first case finished: the profile and e2e files still make a
    report (their own records name the device); with neither, a clear error."""
    bare = {"extra_info": {}, "stats": {"median": 1e-3, "rounds": 1}}
    md = _write(tmp_path, [bare], split=[_split("cuda", 18.0, 90.0)],
                e2e=[_e2e("unpruned", 576, 800.0), _e2e("cuda", 64, 160.0, share=0.004)])
    assert md.startswith("# select_tokens benchmarks: NVIDIA H200") and "interrupted 1 case(s)" in md
    assert "| cuda | llava-1.5 | 1 | 64 (32) |" in md
    (tmp_path / "micro.json").write_text(json.dumps({"benchmarks": [bare]}))
    with pytest.raises(SystemExit):
        report.main(["--micro", str(tmp_path / "micro.json"), "--out", str(tmp_path)])


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs triton (a GPU, or its interpreter)")
def test_tune_times_every_variant_and_compares_its_picks_with_the_default():
    from bench import tune

    records = tune.run(DEVICE, [benchmark.Shape("tiny", 2, 80, 48)], progress=lambda _: None)
    assert [r["variant"] for r in records] == ["default", *tune.VARIANTS[1:]]
    assert all(r["median_us"] > 0 and r["rows_with_default_picks"] == 2 for r in records)


def test_a_triton_variant_that_fails_is_recorded_and_the_others_still_timed(monkeypatch):
    """A plan Triton cannot compile on the GPU raises a TritonError (OutOfResources), not a RuntimeError: tune
    records it as that variant's error and times the rest, instead of losing the section."""
    pytest.importorskip("triton")
    import zspa_kernels.triton as zt
    from bench import tune

    class OutOfResources(Exception):  # triton.runtime.errors.OutOfResources derives from Exception alone
        pass

    failing = tune.VARIANTS[1]
    default_fails = False

    def fake(visual, prompt, k, *args, plan):
        if default_fails and plan == zt.launch_plan(2, 80, 48, torch.bfloat16, k, tune.hb.CORE_RATIO, False):
            raise OutOfResources("out of resource: the default")
        if all(getattr(plan, name) == value for name, value in failing.items()):
            raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return torch.arange(k).expand(visual.shape[0], k)

    monkeypatch.setattr(zt, "select_tokens_triton", fake)
    monkeypatch.setattr(tune.hb, "median_us", lambda fn, device: 1.0)
    records = tune.run(torch.device("cpu"), [benchmark.Shape("tiny", 2, 80, 48)], progress=lambda _: None)
    assert [r["variant"] for r in records] == ["default", *tune.VARIANTS[1:]]
    assert records[1]["error"].startswith("out of resource: shared memory") and "median_us" not in records[1]
    assert all(r["median_us"] == 1.0 and r["rows_with_default_picks"] == 2 for i, r in enumerate(records) if i != 1)
    # Without the default's picks there is nothing to compare with: no variant stands in for it.
    default_fails = True
    records = tune.run(torch.device("cpu"), [benchmark.Shape("tiny", 2, 80, 48)], progress=lambda _: None)
    assert "error" in records[0] and "error" in records[1]
    assert all(r["median_us"] == 1.0 and "rows_with_default_picks" not in r for r in records[2:])


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs triton (a GPU, or its interpreter)")
def test_tune_times_each_prompt_form_on_each_backend():
    from bench import tune

    records = tune.run_prompt_forms(DEVICE, benchmark.Shape("tiny", 1, 40, 48), progress=lambda _: None)
    backends = [b for b in ("triton", "cuda") if b in available_backends(DEVICE)]
    assert [(r["backend"], r["prompt_rows"]) for r in records] == [
        (b, rows or "pooled") for b in backends for rows in tune.PROMPT_ROWS]
    assert all(r["median_us"] > 0 for r in records)


def test_tune_gram_forms_cover_the_upper_gram_exactly_once():
    """Each form's blocks, with their transposes, give back every Gram entry: row blocks tile
    [0, N), each against the columns from its start; shares 1, 3/4 and 10/16 where N allows."""
    from bench import tune

    for N in (7, 8, 576, 577, 16384):
        for form, steps in tune.GRAM_FORMS.items():
            blocks = benchmark.gram_blocks(N, steps)
            assert blocks[0][0] == 0 and blocks[-1][1] == N and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert all(start % 4 == 0 for start, _ in blocks)
            covered = torch.zeros(N, N, dtype=torch.int)
            for start, stop in blocks:
                covered[start:stop, start:] += 1
            ones = torch.ones(N, N, dtype=torch.int)
            assert torch.equal(covered.triu(), ones.triu())  # the upper triangle, each entry once
            assert bool(((covered + covered.T) > 0).all())  # the rest as its transpose
    assert benchmark.gram_blocks(576, 2) == [(0, 288), (288, 576)]  # the launcher's split (gram_split)
    visual = torch.randn(2, 13, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    whole = visual.float() @ visual.float().transpose(1, 2)
    for steps in tune.GRAM_FORMS.values():  # the GEMMs' blocks give the whole Gram back
        blocks = benchmark.gram_blocks(13, steps)
        rebuilt = torch.full_like(whole, float("nan"))
        for (start, stop), part in zip(blocks, benchmark.gram_gemms(visual, blocks)):
            rebuilt[:, start:stop, start:] = part
            rebuilt[:, start:, start:stop] = part.transpose(1, 2)
        torch.testing.assert_close(rebuilt, whole)
    records = tune.run_gram_forms(DEVICE, [benchmark.Shape("tiny", 2, 48, 16)], progress=lambda _: None)
    assert [(r["gram_form"], r["gemms"], r["work_share"]) for r in records] == [
        ("whole", 1, 1.0), ("split", 2, 0.75), ("staircase4", 4, 0.625)]
    assert all(r["median_us"] > 0 for r in records)
    # B = 1 adds the Gram summed over slices of D: the same Gram up to fp32 rounding
    visual = torch.randn(1, 40, 48, dtype=torch.float64).to(torch.bfloat16)
    exact = visual.double()[0] @ visual.double()[0].T
    for slices in tune.GRAM_SPLIT_K:
        gram = benchmark.sliced_gram(visual, slices)
        assert gram.shape == (1, 40, 40) and gram.dtype == torch.float32
        torch.testing.assert_close(gram[0].double(), exact, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="visual: sliced_gram takes one image"):
        benchmark.sliced_gram(visual.expand(2, -1, -1), 4)
    records = tune.run_gram_forms(DEVICE, [benchmark.Shape("tiny1", 1, 48, 16)], progress=lambda _: None)
    assert [r["gram_form"] for r in records] == ["whole", "split", "staircase4", "splitk2", "splitk4", "splitk8"]
    assert all(r["median_us"] > 0 for r in records)


def test_smoke_gate_passes_where_the_cuda_backend_is_not_available():
    """bench/smoke.py on a machine without the cuda backend: nothing to check, so run_gpu.sh goes
    on with auto (on a GPU the gate compares the block and cluster kernels' picks)."""
    from bench import smoke

    if "cuda" in available_backends(DEVICE):
        pytest.skip("the gate itself runs in bench/run_gpu.sh on a GPU")
    lines = []
    assert smoke.check(DEVICE, progress=lines.append) == smoke.OK
    assert lines == ["bench.smoke: the cuda backend is not available here; nothing to check"]


def test_host_split_calls_the_backend_as_the_op_does():
    """host_backend_us times ``backend_entry``: the same selection as the op's call, minus the op."""
    g = torch.Generator().manual_seed(7)
    visual, prompt = torch.randn(2, 37, 24, generator=g), torch.randn(2, 24, generator=g)
    for backend in ("reference", "cpu"):
        direct = profile.backend_entry(backend, visual, prompt, 9, 0.5)()
        assert torch.equal(direct, profile.selection(backend, visual, prompt, 9, 0.5)())
        assert direct.shape == (2, 9)


def test_scratch_split_allocates_what_a_call_allocates(monkeypatch):
    """host_scratch_us times ``scratch_entry``: the very buffers (shapes and dtypes, in order) that a
    Triton call of the same shape allocates, nothing more (meta tensors, launches captured)."""
    pytest.importorskip("triton")
    from zspa_kernels.triton.aot import captured_launches
    from zspa_kernels.triton.select import select_tokens_triton

    visual = torch.empty(3, 40, 32, dtype=torch.bfloat16, device="meta")
    prompt = torch.empty(3, 32, dtype=torch.bfloat16, device="meta")
    made, real_empty = [], torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        made.append((tuple(t.shape), t.dtype))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    with captured_launches() as launches:
        select_tokens_triton(visual, prompt, 9, 0.5, None, None, "mean", True)
    assert launches
    call = list(made)
    made.clear()
    profile.scratch_entry("triton", visual, 9, 0.5)()
    assert made == call and len(call) >= 8
    assert profile.scratch_entry("cuda", visual, 9, 0.5) is None


def test_tune_keeps_the_other_sections_when_one_fails(monkeypatch, tmp_path):
    """A section that raises (a trapped kernel) is reported; the records of the others are saved
    and the exit status says that something failed."""
    from bench import tune

    def ok(name):
        return lambda device, progress=print: [{"section": name}]

    def run_cuda_paths(device, progress=print):  # as a trapped cluster kernel would end it
        raise RuntimeError("CUDA error: unspecified launch failure\nmore lines")

    monkeypatch.setattr(benchmark, "require_cuda", lambda tool: torch.device("cpu"))
    for name in ("run", "run_prompt_forms", "run_outside_band", "run_gram_forms"):
        monkeypatch.setattr(tune, name, ok(name))
    monkeypatch.setattr(tune, "run_cuda_paths", run_cuda_paths)
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    out = tmp_path / "tune.json"
    assert tune.main(["--out", str(out)]) == 1
    assert [r["section"] for r in json.loads(out.read_text())["records"]] == [
        "run", "run_prompt_forms", "run_outside_band", "run_gram_forms"]
    assert "bench.tune: run_cuda_paths failed: CUDA error: unspecified launch failure" in lines
