"""cli.py: ``zspa info`` reports what dispatch reports; bad options of ``zspa bench`` and ``zspa demo``
are refused, naming the option, before anything is built or loaded."""
from __future__ import annotations

import pytest
import torch

from zspa_kernels.cli import main
from zspa_kernels.dispatch import available_backends


def test_info_lists_the_backends_dispatch_says_are_available(capsys, monkeypatch):
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backends = out.split("backends:\n", 1)[1]
        triton_state = next(line for line in backends.splitlines() if line.startswith("  triton ")).split()[1]
        assert (triton_state == "available") == ("triton" in available_backends(device)), out
        assert f"auto        -> {'triton' if device.type == 'cuda' else 'cpu'}" in out


def test_bench_rejects_an_unknown_shape(capsys):
    assert main(["bench", "--shape", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("zspa bench: --shape: expected one of llava-1.5, ")


@pytest.mark.parametrize("env, message", [
    ("bogus", "ZSPA_BACKEND: expected one of"),
    ("cuda", "ZSPA_BACKEND=cuda (backend='auto'): 'cuda' needs CUDA tensors"),
])
def test_the_commands_that_run_the_op_refuse_a_zspa_backend_auto_cannot_run(env, message, tmp_path, capsys,
                                                                             monkeypatch):
    """``ZSPA_BACKEND`` chooses under ``auto``: a name it does not know, or a backend this device cannot run, is
    refused up front (exit 2, naming it), not in a traceback; ``zspa fidelity`` refuses before its unpruned pass
    and writes no journal."""
    if env == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend runs here")
    monkeypatch.setenv("ZSPA_BACKEND", env)
    for args in (["bench"], ["demo", "--size", "tiny", "--out", str(tmp_path / "demo")],
                 ["fidelity", "--out", str(tmp_path / "fidelity")]):
        assert main(args) == 2
        assert capsys.readouterr().err.startswith(f"zspa {args[0]}: {message}"), args
    assert not (tmp_path / "demo").exists() and not (tmp_path / "fidelity").exists()


def test_info_reports_a_bad_zspa_backend_instead_of_crashing(capsys, monkeypatch):
    monkeypatch.setenv("ZSPA_BACKEND", "bogus")
    assert main(["info"]) == 0
    assert "auto        -> refused: ZSPA_BACKEND: expected one of" in capsys.readouterr().out


@pytest.mark.parametrize("keep", ["abc", "0", "-5", "2.5", "0.0", "1e400"])
def test_bench_refuses_a_keep_prune_would_refuse(keep, capsys):
    assert main(["bench", "--keep", keep]) == 2
    assert capsys.readouterr().err.startswith("zspa bench: --keep: expected")


@pytest.mark.parametrize("text, keep", [("64", 64), ("1", 1), ("1.0", 1.0), ("0.1", 0.1), ("1e-1", 0.1)])
def test_keep_is_read_as_prune_reads_it(text, keep):
    from zspa_kernels.arguments import parse_keep

    parsed = parse_keep(text)
    assert parsed == keep and type(parsed) is type(keep)  # "1" one token, "1.0" every token


def test_demo_refuses_bad_options_before_loading_anything(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    cases = [(["--model", str(tmp_path / "missing")], "--model: expected a local checkpoint folder"),
             (["--model", "some-org/some-model"], "--model: expected a local checkpoint folder"),  # no Hub lookup
             (["--model", str(tmp_path / "empty")], "--model: expected a local checkpoint folder with a config.json"),
             (["--keep", "0"], "--keep: expected an int count >= 1"),
             (["--out", str(tmp_path / "file" / "out")], "--out: expected an output folder")]
    for args, message in cases:
        assert main(["demo", "--size", "tiny", "--out", str(tmp_path / "out"), *args]) == 2
        assert capsys.readouterr().err.startswith(f"zspa demo: {message}"), args
    assert not (tmp_path / "out").exists()
