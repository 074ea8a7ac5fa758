"""The README's Python blocks run as written: the op's ten lines on their own, the one-line prune on
a tiny random LLaVA (``model``, ``inputs`` and ``processor`` are all the block assumes), and each
says what its comments promise."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> dict[str, str]:
    """Every fenced Python block of the README, keyed by the heading above it."""
    blocks, heading = {}, None
    # Fenced blocks of any language are matched whole, so that their comment lines are no headings.
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", README.read_text(), re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
        elif match.group(2) == "python":
            assert heading not in blocks, f"two Python blocks under '{heading}': key them apart"
            blocks[heading] = match.group(3)
    return blocks


def test_the_readme_blocks_are_the_ones_run_here():
    # A block added or renamed must be run here too (or this list says why not).
    assert sorted(_python_blocks()) == ["Pruning a Hugging Face VLM in one line", "The API in ten lines"]


def test_the_api_in_ten_lines():
    scope: dict = {}
    exec(compile(_python_blocks()["The API in ten lines"], "README.md", "exec"), scope)
    kept, order, kept_op = scope["kept"], scope["order"], scope["kept_op"]
    # "kept: (2, 64) int64, ascending token indices"
    assert kept.shape == (2, 64) and kept.dtype == torch.int64
    assert bool((kept.diff(dim=1) > 0).all()) and int(kept.min()) >= 0 and int(kept.max()) < 576
    # "core, then diversity picks": the same set in pick order; the raw op is the same selection.
    assert torch.equal(order.sort(dim=1).values, kept)
    assert torch.equal(kept_op, kept)


def test_pruning_a_vlm_in_one_line():
    pytest.importorskip("transformers")
    from zspa_kernels.integrations.transformers import tiny

    built = tiny.llava(size=48)  # 144 tokens an image, so that keep=64 prunes
    model, inputs = built.model, built.make_inputs(built.single)
    scope = {"model": model, "inputs": inputs, "processor": None}
    with torch.no_grad():
        exec(compile(_python_blocks()["Pruning a Hugging Face VLM in one line"], "README.md", "exec"), scope)
    handle, out = scope["handle"], scope["out"]
    (selection,) = handle.last_selection  # one row, one image
    assert (selection.batch_row, selection.image_index, selection.n_tokens) == (0, 0, 144)
    assert len(selection.order) == 64
    # "(B, L') input position of each output position": the image's 80 other tokens are gone.
    length = inputs["input_ids"].shape[1]
    kept = handle.last_kept_positions
    assert kept.shape == (1, length - 80) and bool((kept.diff(dim=1) > 0).all()) and int(kept[0, -1]) == length - 1
    assert out.shape == (1, length + 32)  # max_new_tokens=32, and the tiny model has no eos
    # Leaving the block took the hooks off: the model runs unpruned again.
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == length
