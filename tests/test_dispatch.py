"""dispatch.py: which backend runs (keyword > ZSPA_BACKEND > auto) and which can run here."""
from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

from zspa_kernels import cuda_ext, dispatch
from zspa_kernels.spec import BACKENDS

CPU = torch.device("cpu")


@pytest.mark.parametrize("env, keyword, expected", [
    (None, "auto", "cpu"),                # auto on CPU
    ("", "auto", "cpu"),                  # empty ZSPA_BACKEND means unset
    ("reference", "auto", "reference"),
    ("triton", "reference", "reference"),  # the keyword wins over the environment
])
def test_precedence_on_cpu(monkeypatch, env, keyword, expected):
    if env is None:
        monkeypatch.delenv("ZSPA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ZSPA_BACKEND", env)
    assert dispatch.resolve_backend(keyword, CPU) == expected


@pytest.mark.parametrize("env, problem", [
    (None, None),
    ("reference", None),
    ("bogus", "ZSPA_BACKEND: expected one of"),
    ("cuda", "ZSPA_BACKEND=cuda (backend='auto'): 'cuda' needs CUDA tensors, got cpu"),
])
def test_env_backend_problem_names_what_auto_would_refuse(monkeypatch, env, problem):
    """The one question the commands ask before running the op: would ``ZSPA_BACKEND`` make ``auto`` refuse
    this device? None where it runs, else the refusal's own message."""
    if env is None:
        monkeypatch.delenv("ZSPA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ZSPA_BACKEND", env)
    found = dispatch.env_backend_problem(CPU)
    assert found == problem if problem is None else found.startswith(problem), found


def test_env_backend_problem_reports_a_triton_interpreter_that_cannot_run(monkeypatch):
    """``ZSPA_BACKEND=triton`` on CPU under an interpreter this Triton cannot run is a RuntimeError in
    ``resolve_backend``; the commands still get it as a message, not a traceback."""
    monkeypatch.setenv("ZSPA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "interpreter_problem", lambda: "this Triton's interpreter is too old")
    assert dispatch.env_backend_problem(CPU) == ("ZSPA_BACKEND=triton (backend='auto'): 'triton' on cpu tensors: "
                                                 "this Triton's interpreter is too old")


def test_auto_on_cuda_tensors_is_triton(monkeypatch):
    monkeypatch.delenv("ZSPA_BACKEND", raising=False)
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu"])
def test_auto_on_another_device_is_the_device_generic_reference(monkeypatch, device):
    monkeypatch.delenv("ZSPA_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # under it Triton counts on any device (tested below)
    assert dispatch.resolve_backend("auto", torch.device(device)) == "reference"
    assert dispatch.available_backends(torch.device(device)) == ["reference"]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_problem", lambda: None)  # versions: tested below
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        dispatch.resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on for every Triton (the other spellings: tests/test_spec.py)
    assert dispatch.resolve_backend("triton", CPU) == "triton"


def test_available_backends_follow_the_device_and_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_problem", lambda: None)  # versions: tested below
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.available_backends(CPU) == ["reference", "cpu"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.available_backends(CPU) == ["reference", "cpu", "triton"]
    assert dispatch.available_backends(torch.device("cuda")) == [b for b in BACKENDS if b != "cpu"]


def test_every_backend_has_its_own_entry_point(monkeypatch):
    """Each name in ``spec.BACKENDS`` runs its own module's entry point (``cuda`` its extension's where one can be
    built: the fallback is the next test's)."""
    from zspa_kernels import cpu, reference, spec
    from zspa_kernels import triton as zt

    monkeypatch.setattr(cuda_ext, "extension_available", lambda: True)  # no build here: only which function
    expected = {"reference": reference.select_tokens_reference_op, "cpu": cpu.select_tokens_cpu,
                "triton": zt.select_tokens_triton, "cuda": cuda_ext.select_tokens_cuda}
    assert {name: dispatch.backend_impl(name) for name in spec.BACKENDS} == expected


def test_cuda_without_a_toolkit_runs_triton(monkeypatch):
    monkeypatch.setattr(cuda_ext, "extension_available", lambda: False)
    assert dispatch.backend_impl("cuda") is dispatch.backend_impl("triton")
    monkeypatch.setattr(cuda_ext, "extension_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.backend_impl("cuda") is cuda_ext.select_tokens_cuda


@pytest.mark.parametrize("triton, numpy, runs", [
    ((3, 6), (2, 4), False),  # the interpreter's int() of a one-element array: an error since NumPy 2.4
    ((3, 6), (2, 3), True),
    ((3, 7), (2, 5), True),   # Triton 3.7 squeezes the array first
    ((3, 3), (2, 3), False),  # no boolean inversion before 3.4
    ((3, 4), (2, 3), True),
])
def test_triton_interpreter_counts_only_where_it_can_run(monkeypatch, triton, numpy, runs):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "release", lambda package: {"triton": triton, "numpy": numpy}[package])
    monkeypatch.setattr(dispatch, "interpreter_problem", functools.lru_cache(dispatch.interpreter_problem.__wrapped__))
    assert ("triton" in dispatch.available_backends(CPU)) == runs
    if runs:
        assert dispatch.interpreter_problem() is None
        assert dispatch.resolve_backend("triton", CPU) == "triton"
    else:
        with pytest.raises(RuntimeError, match=rf"backend: 'triton' on cpu tensors: .*triton {triton[0]}\.{triton[1]} "):
            dispatch.resolve_backend("triton", CPU)
    # GPUs never use the interpreter
    assert "triton" in dispatch.available_backends(torch.device("cuda"))




def _table(monkeypatch, tmp_path, cases, ready=True):
    path = tmp_path / "auto_cuda.json"
    if cases is not None:
        path.write_text(json.dumps({"source": "bench/results/x.json", "device": "GPU", "cases": cases}))
    monkeypatch.setattr(dispatch, "AUTO_TABLE", path)
    monkeypatch.setattr(dispatch, "auto_table", functools.lru_cache(dispatch.auto_table.__wrapped__))
    monkeypatch.setattr(dispatch, "auto_cuda_backend", functools.lru_cache(dispatch.auto_cuda_backend.__wrapped__))
    monkeypatch.setattr(dispatch, "_cuda_extension_ready", lambda: ready)
    monkeypatch.setattr(dispatch, "shared_memory_optin", lambda device: H100_SHARED_MEMORY_OPTIN)
    monkeypatch.delenv("ZSPA_BACKEND", raising=False)


H100_SHARED_MEMORY_OPTIN = 232448  # 227 KiB, sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin


def test_auto_on_cuda_follows_the_nearest_measured_case(monkeypatch, tmp_path):
    _table(monkeypatch, tmp_path, [{"B": 1, "N": 576, "k": 64, "backend": "cuda"},
                                   {"B": 32, "N": 576, "k": 64, "backend": "triton"},
                                   {"B": 1, "N": 16384, "k": 1638, "backend": "triton"}])
    cuda = torch.device("cuda")
    assert dispatch.resolve_backend("auto", cuda, (1, 576, 64)) == "cuda"
    assert dispatch.resolve_backend("auto", cuda, (2, 600, 58)) == "cuda"       # nearest: LLaVA B=1
    assert dispatch.resolve_backend("auto", cuda, (16, 576, 64)) == "triton"    # nearest: B=32
    assert dispatch.resolve_backend("auto", cuda, (1, 8192, 1000)) == "triton"  # nearest: video
    assert dispatch.resolve_backend("auto", cuda) == "triton"                   # no shape given
    assert dispatch.resolve_backend("triton", cuda, (1, 576, 64)) == "triton"   # the keyword wins
    assert dispatch.resolve_backend("auto", CPU, (1, 576, 64)) == "cpu"


def test_auto_never_sends_the_cuda_backend_a_shape_it_refuses(monkeypatch, tmp_path):
    """The nearest measured case of a long video row with a small budget is a cuda one, but the
    cuda backend refuses rows whose greedy state passes the shared memory (19317 tokens on an
    H100: 12 bytes a token and 640 of static arrays in 227 KiB) and more than 65535 rows."""
    _table(monkeypatch, tmp_path, [{"B": 1, "N": 16384, "k": 64, "backend": "cuda"}])
    cuda = torch.device("cuda", 0)
    assert dispatch.resolve_backend("auto", cuda, (1, 19317, 64)) == "cuda"
    assert dispatch.resolve_backend("auto", cuda, (1, 19318, 64)) == "triton"
    assert dispatch.resolve_backend("auto", cuda, (1, 100_000, 64)) == "triton"
    assert dispatch.resolve_backend("auto", cuda, (65536, 64, 64)) == "triton"
    assert dispatch.resolve_backend("cuda", cuda, (1, 100_000, 64)) == "cuda"  # asked for by name: its own error


def test_auto_never_picks_an_unbuilt_cuda_extension_or_guesses_without_a_table(monkeypatch, tmp_path):
    _table(monkeypatch, tmp_path, [{"B": 1, "N": 576, "k": 64, "backend": "cuda"}], ready=False)
    assert dispatch.resolve_backend("auto", torch.device("cuda"), (1, 576, 64)) == "triton"
    _table(monkeypatch, tmp_path / "none", None)
    assert dispatch.auto_table() is None
    assert dispatch.resolve_backend("auto", torch.device("cuda"), (1, 576, 64)) == "triton"


def test_a_malformed_table_is_a_clear_error(monkeypatch, tmp_path):
    _table(monkeypatch, tmp_path, [{"B": 1, "N": 576, "backend": "cuda"}])
    with pytest.raises(ValueError, match="auto_cuda.json: expected 'source' and 'cases' of B, N, k and backend"):
        dispatch.resolve_backend("auto", torch.device("cuda"), (1, 576, 64))


def test_no_table_is_committed_before_a_gpu_run_measured_one():
    table = dispatch.auto_table()
    assert table is None or table["source"].startswith("bench/results/")
