"""``zspa demo`` and ``zspa bench``: the main job runs end to end on a CPU without downloads."""
from __future__ import annotations

import torch
from PIL import Image

from zspa_kernels import demo
from zspa_kernels.cli import main


def test_demo_prints_the_table_and_draws_the_kept_patches(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--keep", "48", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "->" in line}
    assert rows["unpruned"][1:4] == ["576", "->", "576"]
    assert rows["cpu"][1:4] == ["576", "->", "48"] and rows["reference"][1:4] == ["576", "->", "48"]
    assert "same tokens as cpu" in " ".join(rows["reference"])
    # The selection column is the hooks' own select_tokens call, timed inside the pruned prefill.
    assert all(float(rows[b][rows[b].index("ms", 9) - 1]) > 0 for b in ("cpu", "reference"))
    with Image.open(tmp_path / "kept_patches.png") as image:  # closed: no ResourceWarning
        assert image.size == (2 * 672 + 12, 672 + 40)


def test_demo_runs_a_local_checkpoint(tmp_path, capsys):
    model, processor = demo.load(None, torch.device("cpu"), torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert main(["demo", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "ckpt"), "--keep", "32"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" not in out and "ckpt" in out
    assert any(line.split()[:4] == ["reference", "576", "->", "32"] for line in out.splitlines()), out
    assert (tmp_path / "out" / "kept_patches.png").exists()


def test_bench_times_every_implementation_available_here(capsys):
    assert main(["bench", "--shape", "llava-1.5", "--keep", "0.05"]) == 0
    out = capsys.readouterr().out
    for impl in ("cpu", "reference", "torch_loop", "divprune_loop"):
        assert any(line.startswith(impl) and "µs" in line for line in out.splitlines()), out
