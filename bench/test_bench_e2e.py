"""Smoke test of the end-to-end benchmark on the tiny twins of its architectures (CPU in CI).

No timing assertions; what must hold on any machine is checked: every configuration
ran, and pruning shrinks the KV cache to exactly the kept sequence length.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import e2e
from zspa_kernels import benchmark as hb
from zspa_kernels import models
from zspa_kernels.integrations.transformers import kv_cache


@pytest.mark.parametrize("name, cache", [("llava-1.5-tiny", "dynamic"), ("qwen2.5-vl-tiny", "dynamic"),
                                         ("gemma3-tiny", "dynamic"), ("gemma3-tiny", "static")])
def test_e2e_tiny_runs_unpruned_and_pruned(name, cache):
    records = e2e.run([name], [2], torch.device("cpu"), "reference", new_tokens=2, repeats=1,
                      progress=lambda _: None, cache=cache)
    n = models.visual_tokens(name)
    assert [(r["B"], r["kept"], r["N"]) for r in records] == [(2, n, n), (2, 64, n), (2, hb.keep_budget(0.1, n), n)]
    assert {r["cache"] for r in records} == {cache}
    for r in records:
        assert all(math.isfinite(r[key]) and r[key] > 0
                   for key in ("prefill_ms", "ttft_ms", "median_us", "decode_tokens_per_s"))
        full = next(u for u in records if u["B"] == r["B"] and u["impl"] == "unpruned")
        # The cache holds every text token and only the kept visual tokens.
        assert r["kv_cache_bytes"] * full["tokens"] == full["kv_cache_bytes"] * (full["tokens"] - n + r["kept"])
        if r["impl"] != "unpruned":
            assert 0 < r["selection_share"] and r["selection_us"] > 0
            assert 0 < r["hook_share"] == r["hook_ms"] / r["prefill_ms"]
            assert r["hook_kernels"] == 0 < r["hook_host_ops"]  # on CPUs every op is a host op
        else:
            assert "hook_ms" not in r


@pytest.mark.parametrize("kept", [False, True], ids=["fresh-build", "the-timed-model"])
def test_the_prefills_gpu_time_is_measured_last(monkeypatch, kept):
    """``gpu_busy_pass`` (the profiler faked here: off GPUs it measures nothing) fills every record's kernel
    time after the wall-clock timings, each on its own configuration: unpruned, or pruned to its ``k``; on a
    fresh build, or on the model run() timed where it was kept (one model a process: no second build)."""
    models_kept = {} if kept else None
    records = e2e.run(["llava-1.5-tiny"], [1], torch.device("cpu"), "reference", new_tokens=2, repeats=1,
                      progress=lambda _: None, keep_models=models_kept)
    assert all(r["prefill_gpu_busy_ms"] is None for r in records)  # run() leaves it to the pass
    seen = []

    def busy(fn, device):  # the measured prefill's cache: it holds the kept visual tokens alone
        seen.append(models.cache_bytes(kv_cache(fn())))
        return float(len(seen))

    monkeypatch.setattr(e2e, "gpu_busy_ms", busy)
    model = None
    if kept:
        model = models_kept.pop("llava-1.5-tiny")
        monkeypatch.setattr(models, "build", lambda *a, **k: pytest.fail("built again"))
    e2e.gpu_busy_pass("llava-1.5-tiny", records, torch.device("cpu"), progress=lambda _: None, model=model)
    assert [r["prefill_gpu_busy_ms"] for r in records] == [1.0, 2.0, 3.0]
    assert seen == [r["kv_cache_bytes"] for r in records]  # each prefill as timed: no hook of run()'s left on


def test_append_adds_a_models_rows_to_the_same_devices_file_and_refuses_anothers(tmp_path):
    """bench/run_gpu.sh runs each model in a process of its own (its kernel time saved before the next model's
    timings): the second process adds its rows to the first's file, and never to a file another machine wrote."""
    out = tmp_path / "e2e.json"
    common = ["--batch", "1", "--repeats", "1", "--new-tokens", "2", "--backend", "reference", "--out", str(out)]
    assert e2e.main(["--models", "llava-1.5-tiny", *common]) == 0
    assert e2e.main(["--models", "qwen2.5-vl-tiny", "--append", *common]) == 0
    raw = json.loads(out.read_text())
    assert [(r["model"], r["impl"]) for r in raw["records"]] == [
        (name, impl) for name in ("llava-1.5-tiny", "qwen2.5-vl-tiny") for impl in ("unpruned", "reference", "reference")]
    assert e2e.main(["--models", "qwen2.5-vl-tiny", *common]) == 0  # without --append: this run's rows alone
    assert {r["model"] for r in json.loads(out.read_text())["records"]} == {"qwen2.5-vl-tiny"}
    raw["device"] = "NVIDIA H100 80GB HBM3"
    out.write_text(json.dumps(raw))
    with pytest.raises(SystemExit, match="--append: .* holds results of 'NVIDIA H100 80GB HBM3', not of 'cpu "):
        e2e.main(["--models", "llava-1.5-tiny", "--append", *common])
