"""benchmark.py: the harness the microbenchmarks and ``zspa bench`` share (no timings asserted)."""
from __future__ import annotations

import os

import pytest
import torch

from fp64_oracle import Row, replay
from helpers import TOLERANCE
from zspa_kernels import benchmark as hb
from zspa_kernels import dispatch
from zspa_kernels.dispatch import available_backends
from zspa_kernels.spec import core_count

CPU = torch.device("cpu")


def test_backends_timed_are_the_available_compiled_ones(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_problem", lambda: None)  # whatever Triton and NumPy are here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_backends(CPU) and hb.backends_here(CPU) == ["cpu", "reference"]  # auto's first
    assert hb.implementations(CPU) == ["cpu", "torch_loop", "divprune_loop", "reference"]  # reference last
    monkeypatch.setenv(hb.SKIP_ENV, "cpu, triton")  # what bench/run_gpu.sh sets when a backend fails
    assert hb.backends_here(CPU) == ["reference"]
    assert hb.implementations(CPU) == ["torch_loop", "divprune_loop", "reference"]
    # On CUDA the graph-captured loop comes after the two loops the targets compare with: a run
    # cut short in its slow captures still has both speed-ups.
    monkeypatch.setattr(hb, "backends_here", lambda device: ["cuda", "triton", "reference"])
    assert hb.implementations(torch.device("cuda")) == [
        "cuda", "triton", "torch_loop", "divprune_loop", "torch_loop_graph", "reference"]


def test_traffic_counts_the_greedy_steps_after_the_core():
    shape = hb.Shape("t", 2, 100, 8)
    steps = 10 - core_count(hb.CORE_RATIO, 10)
    assert hb.traffic_bytes("torch_loop", shape, 10) == 2 * 4 * 100 * 8 * (steps + 2)
    assert hb.skip_reason("triton", hb.SPEC_SHAPES[-1], 1638, CPU) is None
    assert "divprune_loop would move" in hb.skip_reason("divprune_loop", hb.SPEC_SHAPES[-1], 1638, CPU)


@pytest.mark.parametrize("impl", ["reference", "torch_loop", "divprune_loop"])
def test_every_runner_selects_what_the_oracle_accepts(impl):
    shape = hb.SMOKE_SHAPES[1]
    visual, prompt = hb.make_inputs(shape, torch.float32, CPU, seed=2)
    order = hb.runner(impl, visual, prompt, 12)()
    for b in range(shape.B):
        row = Row(visual[b].numpy(), prompt[b].numpy(), None, shape.N, 12, hb.CORE_RATIO, "mean")
        replay(row, order[b].tolist(), TOLERANCE["reference"][torch.float32])


def test_inputs_are_reproducible_and_the_floor_counts_the_bytes():
    shape = hb.SMOKE_SHAPES[0]
    a, b = hb.make_inputs(shape, torch.bfloat16, CPU), hb.make_inputs(shape, torch.bfloat16, CPU)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    moved = shape.B * (shape.N * shape.D * 2 + shape.D * 2 + 64 * 8)
    assert hb.floor_us(shape, 64, torch.bfloat16, 1e9) == pytest.approx(1e6 * moved / 1e9)
    assert {"device", "torch", "triton", "cuda"} <= set(hb.environment(CPU))


def test_env_vars_sets_and_restores(monkeypatch):
    monkeypatch.setenv("ZSPA_TEST_SET", "before")
    monkeypatch.delenv("ZSPA_TEST_UNSET", raising=False)
    with hb.env_vars({"ZSPA_TEST_SET": "", "ZSPA_TEST_UNSET": "inside"}):
        assert os.environ["ZSPA_TEST_SET"] == "" and os.environ["ZSPA_TEST_UNSET"] == "inside"
    assert os.environ["ZSPA_TEST_SET"] == "before" and "ZSPA_TEST_UNSET" not in os.environ


def test_raw_records_say_where_with_what_and_when_they_were_measured(tmp_path):
    import datetime
    import json

    transformers = pytest.importorskip("transformers")
    hb.save_records(tmp_path / "raw.json", CPU, [{"name": "e2e", "median_us": 1.0}])
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["records"] == [{"name": "e2e", "median_us": 1.0}]
    # A save that fails half-way (here a record JSON cannot write; in a run, a time limit) leaves the last one whole.
    with pytest.raises(TypeError):
        hb.save_records(tmp_path / "raw.json", CPU, [{"name": "e2e", "median_us": 2.0}, {"name": object()}])
    assert json.loads((tmp_path / "raw.json").read_text())["records"] == raw["records"]
    assert [p.name for p in tmp_path.iterdir()] == ["raw.json"]
    assert raw["device"] == hb.environment(CPU)["device"] and raw["torch"] == torch.__version__
    assert raw["transformers"] == transformers.__version__
    written = datetime.datetime.fromisoformat(raw["written_utc"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - written) < datetime.timedelta(minutes=5)


@pytest.mark.parametrize("calls_ms, expected_us", [
    ([900.0, 1.0], "do_bench"),  # a first call that compiles: warm, the call is timed by do_bench
    ([900.0, 200.0, 300.0, 100.0], 200e3),  # slow when warm too: the median of three warm calls
    ([2.0], "do_bench"),
])
def test_a_first_slow_call_is_timed_again_before_it_decides_how_to_time(monkeypatch, calls_ms, expected_us):
    """``median_us`` on a GPU (its events and do_bench faked here): the first call may compile or load, so it
    decides nothing alone, nor is it one of the three calls that time a slow one."""
    triton_testing = pytest.importorskip("triton.testing")
    times = iter(calls_ms)

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(times)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, return_mode: 0.005)
    result = hb.median_us(lambda: None, torch.device("cuda"))
    assert result == (5.0 if expected_us == "do_bench" else expected_us)
    assert next(times, None) is None  # every call was used, none more
