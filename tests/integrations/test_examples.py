"""The python/ examples run as written on their tiny default models and show the saving."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "python"


def _run(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("script", ["prune_llava.py", "prune_qwen2_5_vl.py", "prune_batch.py"])
def test_example_runs_and_shortens_the_cache(script):
    stdout = _run(script)
    full, pruned = map(int, re.search(r"(\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert pruned < full
    assert re.search(r"row 0 image 0: kept \d+ of \d+ tokens", stdout)


def test_the_llama_3_2_vision_example_shrinks_the_cross_attention_cache():
    stdout = _run("prune_llama3_2_vision.py")
    full, pruned = map(int, re.search(r"cross-attention cache: (\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert pruned < full
    assert re.search(r"row 0 image 1: kept \d+ of \d+ tokens", stdout)
