"""cli.py: ``zspa info`` reports what dispatch reports; ``zspa bench`` rejects unknown shapes."""
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


def test_bench_rejects_an_unknown_shape():
    with pytest.raises(SystemExit, match="--shape expected one of"):
        main(["bench", "--shape", "tiny"])
