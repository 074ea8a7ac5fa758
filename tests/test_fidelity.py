"""``zspa_kernels.fidelity`` and ``zspa fidelity`` on tiny random models (CPU, no downloads).

Random weights make agreement and KL meaningless for quality, so nothing here asserts
how pruning ranks; what is asserted is exact: keep-all changes nothing (KL exactly 0),
every measurement is present and finite, an interrupted run resumes to the same report
without measuring a finished grid point again, and bad samples are skipped, not fatal.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny models throughout

from zspa_kernels.cli import main  # noqa: E402
from zspa_kernels.fidelity import GridPoint, Journal, read_samples, run_grid, summarise, write  # noqa: E402
from zspa_kernels.fidelity.grid import JOURNAL, kl_divergence, parse_core_ratios, parse_keeps  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import (ACTION_EXPERT_BUILDERS, BLOCK_DIFFUSION_BUILDERS,  # noqa: E402
                                                         BUILDERS, CROSS_ATTENTION_BUILDERS, ENCODER_DECODER_BUILDERS)

# Every model that generates token by token (an encoder-decoder's answers are its decoder's tokens).
EVERY_BUILDER = {**BUILDERS, **CROSS_ATTENTION_BUILDERS, **ENCODER_DECODER_BUILDERS}

NEW_TOKENS = 3
TIMINGS = ("prefill_ms", "prefill_speedup", "environment", "started")


@dataclass(frozen=True)
class TinySample:
    label: str
    row: tuple  # segments of a tiny model's make_inputs
    seed: int


def tiny_run(name: str, n_samples: int = 5, builders: dict = EVERY_BUILDER):
    """A tiny model of family ``name``, samples cycling through its mixed rows (different
    lengths and image counts, so batches are left-padded), and their encoder."""
    tiny = builders[name]()
    samples = [TinySample(f"row {i}", tiny.batch[i % len(tiny.batch)], i) for i in range(n_samples)]

    def encode(batch):
        return tiny.make_inputs([s.row for s in batch], seeds=[s.seed for s in batch])

    return tiny.model, samples, encode


GRID = [GridPoint(keep, ratio) for keep in (1.0, 3) for ratio in (0.0, 0.5, 1.0)]


def without_timings(obj):
    """The report with what is measured by a clock (or records the machine) left out."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


@pytest.mark.parametrize("name", sorted(EVERY_BUILDER))
def test_keep_all_agrees_exactly_and_every_field_is_finite(name, tmp_path):
    model, samples, encode = tiny_run(name)
    journal = run_grid(model, samples, encode, GRID, tmp_path, new_tokens=NEW_TOKENS, batch_size=3,
                       progress=False)
    summary = summarise(journal)
    assert len(summary["points"]) == len(GRID)
    for point in summary["points"]:
        for key in ("first_token_agreement", "answer_agreement", "kl_mean", "kl_max", "prefill_ms",
                    "prefill_speedup", "kv_cache_bytes_per_sample", "kv_cache_ratio",
                    "visual_tokens_per_sample", "visual_tokens_kept_per_sample"):
            assert math.isfinite(point[key]) and point[key] >= 0, (key, point)
        assert len(point["per_sample"]) == len(samples)
        assert all(math.isfinite(s["kl"]) and len(s["answer"]) == NEW_TOKENS for s in point["per_sample"])
        if point["keep"] == 1.0:  # every visual token kept: the hooks reproduce unpruned logits exactly
            assert point["visual_tokens_kept_per_sample"] == point["visual_tokens_per_sample"]
            assert point["first_token_agreement"] == 1.0 and point["answer_agreement"] == 1.0
            assert point["kl_max"] == 0.0 and point["kv_cache_ratio"] == 1.0
        else:
            assert point["visual_tokens_kept_per_sample"] < point["visual_tokens_per_sample"]
            assert point["kv_cache_ratio"] > 1.0
    recommended = {r["keep"]: r for r in summary["recommendations"]}
    assert set(recommended) == {1.0, 3}
    assert recommended[3]["call"].startswith("zspa_kernels.prune(model, keep=3, core_ratio=")
    paths = write(summary, tmp_path)
    assert json.loads(paths[0].read_text())["points"][0]["keep"] == summary["points"][0]["keep"]
    assert paths[1].read_text().count("\n| ") == len(GRID) + 1  # header and one row per point
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_encoder_decoder_that_forces_its_first_token_is_measured_from_its_next_one(tmp_path):
    """A BART-style decoder (Florence-2's) with forced_bos_token_id: generate() makes the first decoder token that
    id whatever the logits. First tokens and KL come from the answer's first token of its own (the one after),
    and answers leave the forced token out, and end where the model ends them, not at a forced_eos_token_id
    at the length cap; keep-all still changes nothing."""
    model, samples, encode = tiny_run("florence2", n_samples=4)
    model.generation_config.forced_bos_token_id = 1
    model.generation_config.forced_eos_token_id = 2  # BART's default: an end forced at the length cap
    model.generation_config.eos_token_id = 2
    summary = summarise(run_grid(model, samples, encode, [GridPoint(1.0, 0.5), GridPoint(3, 0.5)], tmp_path,
                                 new_tokens=NEW_TOKENS, batch_size=2, progress=False))
    unpruned = summary["unpruned"]
    assert all(len(answer) == NEW_TOKENS for answer in unpruned["answers"])
    assert unpruned["first_tokens"] == [answer[0] for answer in unpruned["answers"]]
    assert unpruned["first_tokens"] != [1] * len(samples)
    assert 2 not in [token for answer in unpruned["answers"] for token in answer]  # no end forced at the cap
    for point in summary["points"]:
        assert [s["first_token"] for s in point["per_sample"]] == [s["answer"][0] for s in point["per_sample"]]
    kept_all = next(point for point in summary["points"] if point["keep"] == 1.0)
    assert kept_all["kl_max"] == 0.0 and kept_all["answer_agreement"] == 1.0


@pytest.mark.parametrize("name", sorted(BLOCK_DIFFUSION_BUILDERS))
def test_a_block_diffusion_model_is_refused_before_any_pass(name, tmp_path):
    """DiffusionGemma denoises canvases of tokens at once: there is no next-token distribution to compare,
    and its answers are no greedy token-by-token generation. Refused, naming why, with nothing journaled."""
    model, samples, encode = tiny_run(name, builders=BLOCK_DIFFUSION_BUILDERS)
    with pytest.raises(ValueError, match="model: DiffusionGemma generates by block diffusion"):
        run_grid(model, samples, encode, GRID, tmp_path, new_tokens=NEW_TOKENS, progress=False)
    assert not (tmp_path / JOURNAL).exists()


@pytest.mark.parametrize("name", sorted(ACTION_EXPERT_BUILDERS))
def test_a_vision_language_action_model_is_refused_before_any_pass(name, tmp_path):
    """PI0 and PI0.5 denoise a chunk of actions over the prompt's cache: no next-token distribution to compare.
    Refused, naming why, with nothing journaled."""
    model, samples, encode = tiny_run(name, builders=ACTION_EXPERT_BUILDERS)
    with pytest.raises(ValueError, match="model: PI0/PI0.5 generates actions, not text"):
        run_grid(model, samples, encode, GRID, tmp_path, new_tokens=NEW_TOKENS, progress=False)
    assert not (tmp_path / JOURNAL).exists()


def test_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(3, 50), -1)
    logq = torch.log_softmax(torch.randn(3, 50), -1)
    assert torch.equal(kl_divergence(logp, logp), torch.zeros(3, dtype=torch.float64))
    logp64, logq64 = torch.log_softmax(logp.double(), -1), torch.log_softmax(logq.double(), -1)
    expected = (logp64.exp() * (logp64 - logq64)).sum(-1)
    torch.testing.assert_close(kl_divergence(logp, logq), expected, rtol=1e-12, atol=0)
    assert (expected > 0).all()


def test_kl_of_nearly_equal_float32_distributions_is_never_negative():
    """float32 log-softmaxes sum to 1 only up to rounding: read as they are, nearly equal rows give
    a KL below 0 (checked here, so the case is real); renormalised in fp64, never."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 1000, generator=gen)
    logp = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(logits + 1e-4 * torch.randn(256, 1000, generator=gen), -1)
    as_given = (logp.double().exp() * (logp.double() - logq.double())).sum(-1)
    assert (as_given < 0).any()
    assert (kl_divergence(logp, logq) >= 0).all()


class Interrupt:
    """Counts the model's forward calls; raises KeyboardInterrupt at call ``at`` (like Ctrl-C)."""

    def __init__(self, model, at=None):
        self.calls, self.at = 0, at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_resume_after_an_interruption_reproduces_the_report(tmp_path):
    model, samples, encode = tiny_run("llava", n_samples=3)
    grid = [GridPoint(3, 0.0), GridPoint(3, 1.0), GridPoint(1.0, 0.5)]
    run = dict(new_tokens=NEW_TOKENS, batch_size=2, progress=False)
    counter = Interrupt(model)
    whole = summarise(run_grid(model, samples, encode, grid, tmp_path / "whole", **run))
    counter.handle.remove()
    passes = 1 + len(grid)
    per_pass = counter.calls // passes
    assert per_pass * passes == counter.calls

    # Interrupted in the middle of the third pass (the unpruned one, then two grid points).
    stop = Interrupt(model, at=2 * per_pass + per_pass // 2)
    with pytest.raises(KeyboardInterrupt):
        run_grid(model, samples, encode, grid, tmp_path / "resumed", **run)
    stop.handle.remove()
    before = (tmp_path / "resumed" / JOURNAL).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in before] == ["run", "unpruned", "pruned"]

    counter = Interrupt(model)
    resumed = run_grid(model, samples, encode, grid, tmp_path / "resumed", **run)
    counter.handle.remove()
    assert counter.calls == (passes - 2) * per_pass  # finished passes were not measured again
    after = (tmp_path / "resumed" / JOURNAL).read_text().splitlines()
    assert after[:len(before)] == before  # and what they measured (their timings too) is kept
    assert without_timings(summarise(resumed)) == without_timings(whole)
    assert summarise(resumed) == summarise(Journal(tmp_path / "resumed", resumed.run))  # rebuilt from the file


@dataclass(frozen=True)
class PhotoSample(TinySample):
    image: str = ""  # a file: its bytes are the run's too


def test_a_journal_whose_photo_was_replaced_under_its_name_is_refused(tmp_path):
    """A resume compares the samples' digest, which holds each image file's bytes: the same labels, paths and
    questions with one photo exported anew would compare new grid points with the old photo's unpruned pass."""
    model, samples, encode = tiny_run("llava", n_samples=2)
    photos = []
    for i, sample in enumerate(samples):
        photos.append(tmp_path / f"photo{i}.png")
        photos[-1].write_bytes(b"first export %d" % i)
    samples = [PhotoSample(s.label, s.row, s.seed, str(photo)) for s, photo in zip(samples, photos)]
    run_grid(model, samples, encode, GRID[:1], tmp_path / "out", new_tokens=NEW_TOKENS, progress=False)
    run_grid(model, samples, encode, GRID[:1], tmp_path / "out", new_tokens=NEW_TOKENS, progress=False)  # resumes
    photos[1].write_bytes(b"second export")
    with pytest.raises(ValueError, match="--out: .* another run .*samples_digest"):
        run_grid(model, samples, encode, GRID[:1], tmp_path / "out", new_tokens=NEW_TOKENS, progress=False)


def test_a_journal_of_another_run_is_refused(tmp_path):
    model, samples, encode = tiny_run("llava", n_samples=2)
    run_grid(model, samples, encode, GRID[:1], tmp_path, new_tokens=NEW_TOKENS, progress=False)
    with pytest.raises(ValueError, match="--out: .* another run .*new_tokens"):
        run_grid(model, samples, encode, GRID[:1], tmp_path, new_tokens=NEW_TOKENS + 1, progress=False)


def test_a_journal_of_another_model_is_refused_and_the_same_model_resumes(tmp_path):
    """Two checkpoints of one config (a fine-tune of the other) under one label: resuming into the first's journal
    would compare the second's passes with the first's unpruned answers."""
    from zspa_kernels.fidelity.grid import model_digest
    from zspa_kernels.integrations.transformers.tiny import llava

    first, again, other = (llava(seed=seed).model for seed in (0, 0, 1))
    assert model_digest(first) == model_digest(again) != model_digest(other)
    _, samples, encode = tiny_run("llava", n_samples=2)
    run = dict(new_tokens=NEW_TOKENS, progress=False, run_info={"model": "ckpt"})
    run_grid(first, samples, encode, [], tmp_path, **run)
    with pytest.raises(ValueError, match="--out: .* another run .*differs in model_digest\\)"):
        run_grid(other, samples, encode, GRID[:1], tmp_path, **run)
    resumed = run_grid(again, samples, encode, [GridPoint(1.0, 0.5)], tmp_path, **run)
    keep_all = summarise(resumed)["points"][0]  # against the unpruned pass of the same weights: exact
    assert keep_all["answer_agreement"] == keep_all["first_token_agreement"] == 1.0 and keep_all["kl_max"] == 0.0


def test_a_journal_timed_on_another_machine_is_refused(tmp_path, monkeypatch):
    """The speed-ups divide the unpruned pass's times by the pruned passes': one machine for all (its load aside)."""
    from zspa_kernels import benchmark as hb

    model, samples, encode = tiny_run("llava", n_samples=2)
    run = dict(new_tokens=NEW_TOKENS, progress=False)
    run_grid(model, samples, encode, [], tmp_path, **run)
    here = hb.environment(torch.device("cpu"))
    monkeypatch.setattr(hb, "environment", lambda device: {**here, "load_average_1min": 99.0})
    run_grid(model, samples, encode, [], tmp_path, **run)  # another load: the same machine
    monkeypatch.setattr(hb, "environment", lambda device: {**here, "device": "another cpu"})
    with pytest.raises(ValueError, match="another run .*differs in environment.device\\)"):
        run_grid(model, samples, encode, GRID[:1], tmp_path, **run)


def test_a_journal_that_cannot_be_resumed_is_refused_naming_the_option(tmp_path, capsys):
    args = ["fidelity", "--keep", "16", "--core-ratio", "0.5", "--new-tokens", "1", "--out", str(tmp_path)]
    (tmp_path / JOURNAL).write_text('{"kind": "run"}\nGARBAGE\n{"kind": "unpruned"}\n')
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"zspa fidelity: --out: {tmp_path / JOURNAL} line 2 is not JSON; delete the file to start again")
    # A journal whose unpruned pass lost its log-probabilities.
    (tmp_path / JOURNAL).unlink()
    assert main(args) == 0
    (tmp_path / "unpruned-logprobs.pt").unlink()
    assert main(args[:2] + ["32"] + args[3:]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"zspa fidelity: --out: {tmp_path / JOURNAL} records the unpruned pass, but its log-probabilities "
        "(unpruned-logprobs.pt) are gone; delete the journal to start again")


def test_a_resumed_command_says_which_earlier_points_it_reports(tmp_path, capsys):
    args = ["fidelity", "--core-ratio", "0.5", "--new-tokens", "1", "--out", str(tmp_path)]
    assert main(args + ["--keep", "16"]) == 0
    capsys.readouterr()
    assert main(args + ["--keep", "32"]) == 0
    out = capsys.readouterr().out
    assert ("the journal also holds 1 grid point(s) measured by an earlier run into "
            f"{tmp_path}, reported too: keep 16 core ratio 0.5") in out
    assert "keep 16: `" in out and "keep 32: `" in out


def test_the_heatmap_keeps_one_token_and_every_token_apart():
    from zspa_kernels.fidelity.report import heat_cells

    points = [{"keep": 1, "core_ratio": 0.5}, {"keep": 1.0, "core_ratio": 0.5}, {"keep": 1, "core_ratio": 0.0}]
    assert heat_cells(points) == (["1", "1.0"], [0.0, 0.5], [(0, 1), (1, 1), (0, 0)])



@pytest.mark.parametrize("keeps, ratios", [([32], [0.5]), ([32, 0.1], [0.0, 1.0]), ([16, 32, 64, 128], [0, 0.25, 0.5, 0.75, 1])])
def test_the_heatmap_holds_its_title_and_labels_on_any_grid(keeps, ratios):
    """However small the grid, the figure is at least as large as its title, axis labels and colour bar."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from zspa_kernels.fidelity.report import heatmap_figure

    points = [{"keep": k, "core_ratio": c, "answer_agreement": 0.5, "prefill_speedup": 2.0} for k in keeps for c in ratios]
    fig = heatmap_figure({"points": points, "run": {"model": "llava-1.5-7b-hf", "samples": ["a"] * 12}})
    try:
        fig.canvas.draw()
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # every artist drawn, in inches
        width, height = fig.get_size_inches()
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, \
            (drawn, width, height)
    finally:
        plt.close(fig)

def test_the_recommended_call_names_a_tokenizer_only_where_the_run_pruned_with_one(tmp_path):
    from zspa_kernels.fidelity import offline

    _, processor, _ = offline.build(torch.device("cpu"), torch.float32)  # a tokenizer's special tokens
    model, samples, encode = tiny_run("llava", n_samples=2)
    calls = {}
    for name, tokenizer in (("without", None), ("with", processor)):
        journal = run_grid(model, samples, encode, [GridPoint(3, 0.5)], tmp_path / name, new_tokens=NEW_TOKENS,
                           progress=False, tokenizer=tokenizer)
        calls[name] = summarise(journal)["recommendations"][0]["call"]
    assert calls == {"without": "zspa_kernels.prune(model, keep=3, core_ratio=0.5)",
                     "with": "zspa_kernels.prune(model, keep=3, core_ratio=0.5, tokenizer=processor)"}


def test_prompts_pass_on_the_lists_the_model_takes(tmp_path):
    """UnlimitedOCR's processor keeps the crop counts and grids of a wide image as lists, which its model needs
    to split the crops: the command's encoder passes them on (it had kept tensors alone, and the unpruned pass
    failed on every sample)."""
    import transformers
    from PIL import Image

    from zspa_kernels import demo
    from zspa_kernels.fidelity.samples import Prompts, Sample
    from zspa_kernels.integrations.transformers.tiny import unlimited_ocr

    if not hasattr(transformers, "UnlimitedOcrProcessor"):
        pytest.skip("UnlimitedOCR is not in this transformers")
    image_processor = getattr(transformers, "UnlimitedOcrImageProcessorPil", None) or \
        transformers.UnlimitedOcrImageProcessor
    processor = transformers.UnlimitedOcrProcessor(image_processor=image_processor(),
                                                   tokenizer=demo.build_processor().tokenizer)
    Image.new("RGB", (1600, 900), "red").save(tmp_path / "wide.png")
    encoded = Prompts(processor, unlimited_ocr().model, template="<image>\n{question}")(
        [Sample("wide", str(tmp_path / "wide.png"), "what is it ?")])
    assert isinstance(encoded["num_local_patches"], list) and isinstance(encoded["patches_grid"], list)
    assert sum(encoded["num_local_patches"]) > 0  # the image was cut into crops


def test_prompts_pad_on_the_left_and_leave_the_processor_as_it_was():
    from zspa_kernels.fidelity import Prompts, offline

    model, processor, template = offline.build(torch.device("cpu"), torch.float32)
    processor.tokenizer.padding_side = "right"
    prompts = Prompts(processor, model, template)
    samples = offline.samples()
    short, long = sorted(samples, key=lambda s: len(s.question))[0], max(samples, key=lambda s: len(s.question))
    mask = prompts([short, long])["attention_mask"]
    assert mask[0, 0] == 0 and bool(mask[:, -1].all())  # the shorter row padded on the left
    assert processor.tokenizer.padding_side == "right"


def test_a_line_cut_short_by_an_interruption_is_dropped(tmp_path):
    model, samples, encode = tiny_run("llava", n_samples=2)
    run_grid(model, samples, encode, GRID[:1], tmp_path, new_tokens=NEW_TOKENS, progress=False)
    journal = tmp_path / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines) + lines[-1][:40])
    resumed = run_grid(model, samples, encode, GRID[:1], tmp_path, new_tokens=NEW_TOKENS, progress=False)
    assert journal.read_text() == "".join(lines) and len(resumed.records) == 3


@pytest.mark.parametrize("text, name", [("32,x", "--keep"), ("0", "--keep"), ("1.5", "--keep")])
def test_bad_keep_lists_name_the_option(text, name):
    with pytest.raises(ValueError, match=name):
        parse_keeps(text)


@pytest.mark.parametrize("text", ["0.5,2", "a", ""])
def test_bad_core_ratio_lists_name_the_option(text):
    with pytest.raises(ValueError, match="--core-ratio"):
        parse_core_ratios(text)


def test_parsed_grid_keeps_counts_and_fractions_apart():
    assert parse_keeps("32,0.25,1.0") == [32, 0.25, 1.0]
    assert [type(k) for k in parse_keeps("1,1.0")] == [int, float]
    assert parse_core_ratios("0,0.25,1") == [0.0, 0.25, 1.0]


def _data_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    Image.new("RGB", (30, 40), "blue").save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_text("not an image")
    lines = [
        json.dumps({"image": "red.png", "question": "What colour is it?"}),    # 1: good
        json.dumps({"image": "missing.png", "question": "Anything?"}),         # 2: missing image
        json.dumps({"image": "broken.png", "question": "Anything?"}),          # 3: unreadable
        json.dumps({"image": "blue.png", "question": "  "}),                   # 4: empty question
        "{not json",                                                           # 5
        json.dumps({"question": "no image"}),                                  # 6
        "",                                                                    # 7: blank, ignored
        json.dumps({"image": str(tmp_path / "blue.png"), "question": "And this one?"}),  # 8: good
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_samples_are_reported_with_their_line_and_skipped(tmp_path):
    samples, bad = read_samples(str(_data_file(tmp_path)))
    assert [s.label for s in samples] == ["data.jsonl line 1", "data.jsonl line 8"]
    assert samples[0].image == str(tmp_path / "red.png")
    assert [m.split(":")[0] for m in bad] == [f"data.jsonl line {n}" for n in (2, 3, 4, 5, 6)]
    assert "image not found" in bad[0] and "unreadable image" in bad[1] and "empty question" in bad[2]


def test_a_data_file_with_a_byte_order_mark_keeps_its_first_line_and_an_image_is_refused_naming_data(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    line = json.dumps({"image": "red.png", "question": "What colour is it?"})
    (tmp_path / "data.jsonl").write_bytes(("\ufeff" + line + "\n" + line + "\n").encode("utf-8"))  # as Notepad saves
    samples, bad = read_samples(str(tmp_path / "data.jsonl"))
    assert [s.label for s in samples] == ["data.jsonl line 1", "data.jsonl line 2"] and bad == []
    with pytest.raises(ValueError, match="^--data: expected a JSON-lines file .* 'red.png', which is not text"):
        read_samples(str(tmp_path / "red.png"))

def test_a_folder_of_images_takes_one_question(tmp_path):
    _data_file(tmp_path)
    samples, bad = read_samples(str(tmp_path), "What is it?")
    assert [s.label for s in samples] == ["blue.png", "red.png"]
    assert [m.split(":")[0] for m in bad] == ["broken.png", "data.jsonl"]
    with pytest.raises(ValueError, match="--question"):
        read_samples(str(tmp_path))


CHAT_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def test_command_on_a_local_checkpoint_skips_bad_samples_and_prints_the_call(tmp_path, capsys):
    from zspa_kernels.fidelity import offline
    from zspa_kernels.integrations.transformers.families import tokenizer_special_ids

    model, processor, _ = offline.build(torch.device("cpu"), torch.float32)
    processor.chat_template = CHAT_TEMPLATE  # as real checkpoints ship one
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    args = ["fidelity", "--model", str(tmp_path / "ckpt"), "--data", str(_data_file(tmp_path)),
            "--keep", "8,576", "--core-ratio", "0.5", "--new-tokens", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" not in out and "prompt: the processor chat template" in out
    assert "samples: 2, 5 skipped" in out
    assert "skipped data.jsonl line 3: unreadable image" in out
    assert "keep 8: `zspa_kernels.prune(model, keep=8, core_ratio=0.5, tokenizer=processor)`" in out
    # The processor's special tokens stay out of the pruned prompts, as in the call printed.
    run = json.loads((tmp_path / "out" / "measurements.jsonl").read_text().splitlines()[0])
    assert run["tokenizer_special_ids"] == sorted(tokenizer_special_ids(processor)) != []
    summary = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    keep_all = next(p for p in summary["points"] if p["keep"] == 576)
    assert keep_all["kl_max"] == 0.0 and keep_all["answer_agreement"] == 1.0
    assert (tmp_path / "out" / "fidelity.png").exists() and (tmp_path / "out" / "fidelity.md").exists()


@pytest.mark.skipif("florence2" not in ENCODER_DECODER_BUILDERS, reason="Florence-2: transformers 4.56+")
def test_command_on_a_florence2_checkpoint_asks_the_question_alone(tmp_path, capsys):
    """Florence-2's processor writes the image's tokens around the text itself: the question alone (LLaVA-1.5's
    prompt would be a second image), and keep-all (its 17 tokens) changes nothing."""
    from integrations.test_encoder_decoder_prune import _florence2_with_its_processor
    from PIL import Image

    model, processor, _ = _florence2_with_its_processor(("colour", "it?"))
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    args = ["fidelity", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path), "--question", "What colour is it?",
            "--keep", "4,17", "--new-tokens", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prompt: '{question}'" in out and "samples: 2" in out
    summary = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    keep_all = [p for p in summary["points"] if p["keep"] == 17]
    assert keep_all and all(p["kl_max"] == 0.0 and p["answer_agreement"] == 1.0 for p in keep_all)


def test_command_offline_default_says_its_numbers_mean_nothing(tmp_path, capsys):
    assert main(["fidelity", "--keep", "16", "--core-ratio", "0.5", "--new-tokens", "2", "--batch-size", "6",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "samples: 12" in out
    assert "zspa_kernels.prune(model, keep=16, core_ratio=0.5, tokenizer=processor)" in out


@pytest.mark.parametrize("args, name", [
    (["--keep", "x"], "--keep"), (["--core-ratio", "2"], "--core-ratio"), (["--new-tokens", "0"], "--new-tokens"),
    (["--batch-size", "0"], "--batch-size"), (["--backend", "fast"], "--backend"), (["--model", "nowhere"], "--model"),
    (["--data", "nowhere.jsonl"], "--data"), (["--question", "Why?"], "--question"),
])
def test_command_refuses_bad_options_naming_them(args, name, tmp_path, capsys):
    assert main(["fidelity", "--out", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.startswith(f"zspa fidelity: {name}:")


def test_command_refuses_before_loading_what_would_fail_after_the_unpruned_pass(tmp_path, capsys):
    """A backend this device cannot run, a folder that is no checkpoint, an output path under a
    file: refused at once (exit 2), with no journal written, so the next run is not refused as a
    different run."""
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    cases = [(["--model", str(tmp_path / "empty")], "--model: expected a local checkpoint folder with a config.json"),
             (["--out", str(tmp_path / "file" / "out")], "--out: expected an output folder")]
    if not torch.cuda.is_available():
        cases.append((["--backend", "cuda"], "--backend: 'cuda' cannot run on cpu here"))
    for args, message in cases:
        assert main(["fidelity", "--out", str(tmp_path / "out"), *args]) == 2
        assert capsys.readouterr().err.startswith(f"zspa fidelity: {message}"), args
    assert not (tmp_path / "out").exists()


def test_command_refuses_a_checkpoint_that_is_no_vision_language_model(tmp_path, capsys):
    """A checkpoint that AutoModelForImageTextToText does not load (a causal LM's): refused as the demo refuses
    it (demo.load), exit 2, not a traceback after the header; no journal written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    assert main(["fidelity", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "llama")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("zspa fidelity: --model: cannot load")
    assert not (tmp_path / "out").exists()


def test_repeated_grid_points_are_measured_and_counted_once(tmp_path, capsys):
    assert main(["fidelity", "--keep", "16,16,1,1.0", "--core-ratio", "0.5,0.50", "--new-tokens", "1",
                 "--batch-size", "12", "--out", str(tmp_path)]) == 0
    assert "= 3 points" in capsys.readouterr().out  # 16, 1 (one token), 1.0 (every token)
    summary = json.loads((tmp_path / "fidelity.json").read_text())
    assert sorted((type(p["keep"]).__name__, p["keep"]) for p in summary["points"]) == [
        ("float", 1.0), ("int", 1), ("int", 16)]


def test_a_sample_without_a_question_string_says_so(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    lines = [{"image": "red.png"}, {"image": "red.png", "question": 5}, {"image": "red.png", "question": ""}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples, bad = read_samples(str(tmp_path / "data.jsonl"))
    assert samples == [] and [m.split(": ", 1)[1] for m in bad] == [
        'no "question"', '"question": expected a string, got int', "empty question"]


def test_command_stops_cleanly_when_every_sample_is_bad(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "missing.png", "question": "Anything?"}) + "\n")
    assert main(["fidelity", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "skipped data.jsonl line 1: image not found" in captured.out
    assert "no usable sample" in captured.err and not (tmp_path / "out").exists()


def test_command_interrupted_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from zspa_kernels.fidelity import command

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_grid", interrupted)
    assert main(["fidelity", "--keep", "16", "--core-ratio", "0.5", "--out", str(tmp_path)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_the_backend_zspa_backend_chose_is_journaled_so_a_resume_under_another_is_refused(tmp_path, capsys,
                                                                                        monkeypatch):
    """Under ``--backend auto`` the environment's ``ZSPA_BACKEND`` runs the selection: the journal names it, and a
    resume without it (or with another) is another run."""
    args = ["fidelity", "--keep", "16", "--core-ratio", "0.5", "--new-tokens", "1", "--out", str(tmp_path)]
    monkeypatch.setenv("ZSPA_BACKEND", "reference")
    assert main(args) == 0
    run = json.loads((tmp_path / JOURNAL).read_text().splitlines()[0])
    assert run["backend"] == "reference"
    monkeypatch.delenv("ZSPA_BACKEND")
    capsys.readouterr()
    assert main(args) == 2
    assert "differs in backend" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 5, 12, 200])
def test_each_agreement_interval_is_the_wilson_score_interval(n):
    """Each end of the interval is a share p at which the score test's statistic |x/n - p| / sqrt(p(1-p)/n)
    equals z (the definition, solved here by bisection rather than by the closed form), the share lies inside,
    and the interval touches 0 (1) only when no (every) sample agrees."""
    from statistics import NormalDist

    from zspa_kernels.fidelity.report import CONFIDENCE, wilson_interval

    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    for agree in range(n + 1):
        share = agree / n
        excess = lambda p: abs(share - p) - z * math.sqrt(p * (1 - p) / n)  # noqa: E731  < 0 inside

        def root(outside: float) -> float:  # the p between `share` (inside) and `outside` where excess is 0
            inside = share
            for _ in range(200):
                mid = (inside + outside) / 2
                inside, outside = (mid, outside) if excess(mid) < 0 else (inside, mid)
            return (inside + outside) / 2

        low, high = wilson_interval(agree, n)
        assert low <= share <= high
        assert low == pytest.approx(0.0 if agree == 0 else root(0.0), abs=1e-12)
        assert high == pytest.approx(1.0 if agree == n else root(1.0), abs=1e-12)
        assert (low == 0.0) == (agree == 0) and (high == 1.0) == (agree == n)
    with pytest.raises(ValueError, match="n: expected at least one sample"):
        wilson_interval(0, 0)


def test_the_mcnemar_p_value_is_the_binomial_probability_of_a_split_as_uneven():
    """Under no difference each discordant sample falls either way with probability 1/2: the two-sided p is the
    probability of a split at least as uneven as the one seen, enumerated here over every split."""
    from fractions import Fraction

    from zspa_kernels.fidelity.report import mcnemar_exact_p

    for a in range(16):
        for b in range(16):
            n = a + b
            uneven = abs(a - b)
            p = sum(Fraction(math.comb(n, i), 2**n) for i in range(n + 1) if abs(i - (n - i)) >= uneven)
            assert mcnemar_exact_p(a, b) == pytest.approx(float(min(p, 1)), rel=1e-12), (a, b)
    assert mcnemar_exact_p(0, 6) == 2 / 64  # six answers apart, all one way: p = 2 * (1/2)^6 < 0.05
    assert mcnemar_exact_p(0, 5) > 0.05  # five all one way are not enough at 5%


def test_a_recommendation_names_the_core_ratios_its_samples_cannot_tell_from_it():
    """Twelve samples. Ratio 0.5 agrees on all of them, 0.25 on all but two, 1.0 on none: 0.5 is recommended,
    0.25 cannot be told from it (two samples apart: p = 0.5), 1.0 can (twelve apart: p = 2^-11). The table shows
    each agreement with its interval, and the recommendation line names 0.25 alone."""
    from zspa_kernels.fidelity.report import _point_summary, markdown, recommend

    n = 12
    unpruned = {"first_tokens": [7] * n, "answers": [[7, 1]] * n, "prefill_ms": 10.0, "kv_cache_bytes": 1000 * n}

    def point(ratio: float, agree: int) -> dict:
        answers = [[7, 1]] * agree + [[7, 2]] * (n - agree)
        return _point_summary({"keep": 64, "core_ratio": ratio, "first_tokens": [7] * n, "answers": answers,
                               "kl": [0.01] * n, "prefill_ms": 5.0, "kv_cache_bytes": 100 * n,
                               "visual_tokens": 576 * n, "visual_tokens_kept": 64 * n}, unpruned)

    points = [point(0.25, n - 2), point(0.5, n), point(1.0, 0)]
    (rec,) = recommend(points)
    assert rec["core_ratio"] == 0.5 and rec["not_distinguished"] == [0.25]
    assert points[2]["answer_agreement_interval"] == [0.0, pytest.approx(0.2425, abs=1e-4)]
    summary = {"run": {"model": "m", "samples": ["s"] * n, "new_tokens": 2, "batch_size": 4, "dtype": "float32",
                       "environment": {"device": "cpu", "torch": "x"}, "backend": "auto", "started": "t"},
               "unpruned": {"prefill_ms": 10.0, "kv_cache_bytes_per_sample": 1000.0}, "points": points,
               "recommendations": [rec]}
    text = markdown(summary)
    assert "| 0.83 [0.55, 0.95] |" in text and "| 0.00 [0.00, 0.24] |" in text
    assert "core_ratio=0.5, tokenizer=processor)` (these samples cannot tell it from core ratio 0.25)" in text
