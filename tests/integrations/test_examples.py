"""The python/ examples run as written on their tiny default models and show the saving."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "python"


def _run(script: str, *args: str) -> str:
    # USE_HUB_KERNELS=0: transformers 5.25's from_pretrained kernelizes with Hub kernels by default (the
    # `kernels` package); the tests run offline. Earlier lines ignore it.
    env = dict(os.environ, USE_HUB_KERNELS="0", PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--new-tokens", "2", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("script", ["prune_llava.py", "prune_qwen2_5_vl.py", "prune_batch.py"])
def test_example_runs_and_shortens_the_cache(script):
    stdout = _run(script)
    full, pruned = map(int, re.search(r"(\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert pruned < full
    assert re.search(r"row 0 image 0: kept \d+ of \d+ tokens", stdout)


def test_the_llava_example_asks_a_follow_up_on_the_pruned_cache():
    stdout = _run("prune_llava.py")
    full, pruned = map(int, re.search(r"follow-up '.*' on the same cache: (\d+) tokens unpruned, (\d+) pruned",
                                      stdout).groups())
    assert pruned < full
    assert re.search(r"row 0 follow-up answer: ", stdout)


def test_the_llama_3_2_vision_example_shrinks_the_cross_attention_cache():
    stdout = _run("prune_llama3_2_vision.py")
    full, pruned = map(int, re.search(r"cross-attention cache: (\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert pruned < full
    assert re.search(r"row 0 image 1: kept \d+ of \d+ tokens", stdout)


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder as a download leaves it (weights, config, tokenizer, image processor and
    chat template): the demo's tiny LLaVA-1.5 (CLIP at 336 px, 576 tokens an image), saved."""
    import torch

    from zspa_kernels import demo

    model, processor = demo.load(None, torch.device("cpu"), torch.float32)
    processor.chat_template = (
        "{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    path = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _photos(folder: Path, count: int) -> list[str]:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()][:count]
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"photo{i}.png")
    return [arg for i in range(count) for arg in ("--image", str(folder / f"photo{i}.png"))]


def _kept(stdout: str) -> list[tuple[int, int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r"row (\d+) image (\d+): kept (\d+) of (\d+) tokens", stdout)]


def test_an_example_prunes_a_local_checkpoint_on_its_images(llava_checkpoint, tmp_path):
    # --model and --image: the processor's chat template, its image preprocessing and its decoding.
    stdout = _run("prune_llava.py", "--model", str(llava_checkpoint), "--keep", "16", *_photos(tmp_path, 1))
    assert _kept(stdout) == [(0, 0, 16, 576)]
    full, pruned = map(int, re.search(r"(\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert full - pruned == 576 - 16
    assert re.search(r"^row 0 answer: ", stdout, re.M)
    # The follow-up question, tokenized in LLaVA-1.5's turn format, continues on the pruned cache.
    full, pruned = map(int, re.search(r"on the same cache: (\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert full - pruned == 576 - 16
    assert re.search(r"^row 0 follow-up answer: ", stdout, re.M)


def test_the_batch_example_prunes_a_local_checkpoint(llava_checkpoint, tmp_path):
    # Rows of one and two photos, left-padded by the processor; beam search (2 beams) runs the
    # prefill on every row twice, and the copies of a row select alike where they hold its images.
    stdout = _run("prune_batch.py", "--model", str(llava_checkpoint), "--keep", "0.05", *_photos(tmp_path, 3))
    kept = _kept(stdout)
    assert [(row, image) for row, image, _, _ in kept] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert all((n, of) == (29, 576) for _, _, n, of in kept)  # ceil(5% of 576)
    firsts = re.findall(r"kept \d+ of \d+ tokens .*first: (.*)", stdout)
    assert firsts[0] == firsts[1]
    if hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"):  # 5.24+: images row by row
        assert firsts[2:4] == firsts[4:6] and firsts[2] != firsts[3]
    else:  # image by image ([coffee, cat] -> [coffee, coffee, cat, cat]): each beam sees one photo twice,
        assert firsts[2] == firsts[3] and firsts[4] == firsts[5] != firsts[2]  # unpatched too (README)
    full, pruned = map(int, re.search(r"(\d+) tokens unpruned, (\d+) pruned", stdout).groups())
    assert full - pruned == 2 * (576 - 29)  # the longer row: two photos
    assert re.search(r"^row 1 answer: ", stdout, re.M)


def _refused(script: str, *args: str) -> str:
    env = dict(os.environ, USE_HUB_KERNELS="0", PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_the_examples_refuse_bad_options_naming_them(llava_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert "--new-tokens: expected an int count >= 1, got '0'" in _refused("prune_llava.py", "--new-tokens", "0")
    assert _refused("prune_llava.py", "--image", "photo.png") == (
        "--image: only with --model (the tiny random model has an image size of its own)")
    assert _refused("prune_llava.py", "--model", str(llava_checkpoint), "--image", str(tmp_path / "nope.png")) == (
        f"--image: {tmp_path / 'nope.png'}: no such file")
    assert _refused("prune_llava.py", "--model", str(llava_checkpoint), "--image", str(tmp_path / "notes.txt")) \
        .startswith(f"--image: {tmp_path / 'notes.txt'}: not an image PIL can read")


def test_an_example_prompts_a_checkpoint_without_a_chat_template_as_the_demo_does(llava_checkpoint, tmp_path):
    """A checkpoint whose processor has no chat template: LLaVA-1.5's prompt (``demo.prompt_template``), one image
    token an image, as ``zspa demo`` and ``zspa fidelity`` prompt it."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(llava_checkpoint, bare)
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    config = bare / "processor_config.json"
    if config.is_file():  # where a release saved the template inside the processor's config
        import json

        saved = json.loads(config.read_text())
        saved.pop("chat_template", None)
        config.write_text(json.dumps(saved))
    stdout = _run("prune_batch.py", "--model", str(bare), "--keep", "16", *_photos(tmp_path, 3))
    assert [(row, image) for row, image, _, _ in _kept(stdout)] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
