"""``zspa demo`` and ``zspa bench``: the main job runs end to end on a CPU without downloads, on its own
random-weight LLaVA and on local checkpoints of other families (``--model``), whose picture is drawn over the
grid their tokens form, or left out with the reason; a checkpoint it cannot run is refused before any timing."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from zspa_kernels import demo
from zspa_kernels.cli import main
from zspa_kernels.spec import DEFAULT_CORE_RATIO, core_count


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


def test_differing_picks_are_told_apart_from_near_ties():
    """The table's note where two backends keep other tokens: a near-tie (their picks part between
    candidates whose fp64 scores are within the backends' rounding) or a real difference."""
    g = torch.Generator().manual_seed(3)
    visual, prompt = torch.randn(2, 12, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    visual[1, 2] = prompt[1].mean(0) + 0.01 * visual[1, 2]  # the most relevant token of row 1 ...
    visual[1, 7] = visual[1, 2] * (1 + 1e-9)  # ... and its copy, to rounding: the core's first two picks
    args = (visual, prompt, 4, 0.5, torch.tensor([12, 10]), None, "mean", "reference", True)
    order = torch.ops.zspa.select_tokens(*args)
    call = [(args, order)]
    assert sorted(order[1, :2].tolist()) == [2, 7]
    twin = order.clone()
    twin[1, :2] = order[1, :2].flip(0)
    assert demo.agreement(("cpu", "reference"), (call, [(args, order.clone())])) == "same picks as cpu"
    assert demo.agreement(("cpu", "reference"), (call, [(args, twin)])).startswith("near-tie: picks part from cpu's")
    worse = order.clone()
    worse[0, 0] = next(i for i in range(12) if i not in order[0].tolist())  # the core's first pick
    assert demo.agreement(("cpu", "reference"), (call, [(args, worse)])).startswith("DIFFERENT tokens from cpu's")


def test_a_split_is_judged_by_the_bound_of_its_step():
    """The same fp64 gap (1e-4) is a near-tie where cpu and reference part at a greedy step (cpu's fp16
    similarities: ~1e-3 together) and a difference where they part in the core (fp32 relevance in both: 4e-5)."""
    e = torch.eye(8, dtype=torch.float64)
    theta = math.acos(1 - 1e-4)
    a, b = e[0], math.cos(theta) * e[0] + math.sin(theta) * e[1]  # relevance 1 and 1 - 1e-4
    c, d = e[2], 1e-4 * e[0] + math.sqrt(1 - 1e-8) * e[3]  # similarity to a: 0 and 1e-4
    filler = 0.5 * e[0] + math.sqrt(0.75) * e[4]
    visual, prompt = torch.stack([a, b, c, d, filler])[None], e[0][None, None]

    def verdict(core_ratio, mine, theirs):
        args = (visual, prompt, 2, core_ratio, None, None, "mean", "reference", True)
        return demo.agreement(("cpu", "reference"), ([(args, torch.tensor([mine]))], [(args, torch.tensor([theirs]))]))

    assert verdict(0.5, [0, 2], [0, 3]).startswith("near-tie: picks part from cpu's where fp64 scores differ by 1e-04")
    assert verdict(1.0, [0, 1], [1, 0]).startswith("DIFFERENT tokens from cpu's (fp64 scores 1.0e-04 apart")


def test_demo_runs_a_local_checkpoint(tmp_path, capsys):
    model, processor = demo.load(None, torch.device("cpu"), torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert main(["demo", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "ckpt"), "--keep", "32"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" not in out and "ckpt" in out
    assert any(line.split()[:4] == ["reference", "576", "->", "32"] for line in out.splitlines()), out
    assert (tmp_path / "out" / "kept_patches.png").exists()


# --model on checkpoints of other families: tiny random models saved with the real processor classes, built
# offline by the integration tests' helpers (their tokenizers hold the config's token ids).

def _checkpoint(path, model, processor, chat_template=None) -> str:
    """``model`` and ``processor`` saved as a local checkpoint folder; ``chat_template``: the processor's."""
    if chat_template is not None:
        processor.chat_template = chat_template  # as real checkpoints ship one
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _demo(capsys, checkpoint: str, out, keep: int) -> tuple[int, str, str]:
    """``zspa demo --model checkpoint``: its exit status, stdout and stderr."""
    capsys.readouterr()  # not the saving's progress bars
    code = main(["demo", "--out", str(out), "--model", checkpoint, "--keep", str(keep)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _question_words(*taken: str) -> tuple:
    """The demo question's words, each once and none of ``taken``: more words of a helper's word-level tokenizer
    (a word twice in its vocabulary would take an id past the model's embeddings)."""
    return tuple(w for w in dict.fromkeys(demo.QUESTION.split()) if w not in taken)


def _assert_table(out: str, n_visual: int, keep: int) -> None:
    """Unpruned ``n -> n``, each backend ``n -> keep``, every backend picking the first one's tokens."""
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "->" in line}
    assert rows.pop("unpruned")[1:4] == [str(n_visual), "->", str(n_visual)], out
    first, *others = rows
    assert "reference" in rows, out
    assert all(row[1:4] == [str(n_visual), "->", str(keep)] for row in rows.values()), out
    assert all(f"same tokens as {first}" in " ".join(rows[b]) for b in others), out


def _assert_picture(path, grid: tuple[int, int], keep: int) -> None:
    """The picture has the size of ``grid`` drawn at PICTURE_SIDE; its left panel is the astronaut (de-normalised
    right); the right panel outlines ``keep`` cells, the core's in orange, the rest in blue."""
    import numpy as np
    from skimage import data

    rows, cols = grid
    cell = -(-demo.PICTURE_SIDE // max(rows, cols))
    with Image.open(path) as image:
        image = image.convert("RGB")
    assert image.size == (max(2 * cols * cell + 12, 620), rows * cell + 40)
    panel = image.crop((0, 40, cols * cell, 40 + rows * cell))
    photo = Image.fromarray(data.astronaut()).resize(panel.size)
    small = [np.asarray(p.resize((8, 8), Image.BOX), dtype=float) for p in (panel, photo)]
    assert np.abs(small[0] - small[1]).mean() < 12  # wrong mean/std or a transposed grid: several times more
    left = cols * cell + 12  # each cell's outline, at the middle of its left edge
    marks = [image.getpixel((left + c * cell, 40 + r * cell + cell // 2)) for r in range(rows) for c in range(cols)]
    core = core_count(DEFAULT_CORE_RATIO, keep)
    assert (marks.count(demo.CORE_COLOUR), marks.count(demo.DIVERSITY_COLOUR)) == (core, keep - core)


def _assert_runs_and_draws_16_tokens(capsys, tmp_path, model, processor, template: str, keep: int, family: str):
    """The demo on ``model``'s checkpoint, prompted by its chat template: its 16 visual tokens pruned to ``keep``
    by every backend alike, and drawn as a 4 x 4 grid over the photo."""
    code, out, err = _demo(capsys, _checkpoint(tmp_path / "ckpt", model, processor, template), tmp_path / "out", keep)
    assert code == 0, err
    assert f"family: {family}; prompt: the processor's chat template" in out
    assert "16 of them visual" in out and "LLaVA" not in out
    _assert_table(out, 16, keep)
    _assert_picture(tmp_path / "out" / "kept_patches.png", (4, 4), keep)


def test_demo_runs_a_qwen2_5_vl_checkpoint_and_draws_its_merged_patches(tmp_path, capsys):
    """Qwen2.5-VL: its chat template; the photo resized to 112 x 112 px (the processor's max_pixels), 8 x 8 patches
    of 14 px merged 2 x 2 into 16 tokens, drawn as a 4 x 4 grid over the photo."""
    from integrations.test_real_processors import QWEN_TEMPLATE, _qwen

    template_words = tuple("system You are a helpful assistant. user assistant".split())
    words = template_words + _question_words(*template_words)
    model, processor, _ = _qwen("2.5", ["<|im_start|>", "<|im_end|>"], words)
    _assert_runs_and_draws_16_tokens(capsys, tmp_path, model, processor, QWEN_TEMPLATE, keep=4,
                                     family="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)")


def test_demo_runs_a_gemma3_checkpoint_and_draws_its_soft_tokens(tmp_path, capsys):
    """Gemma3: its chat template and token types; a 16 x 16 px picture of 4 px patches, 16 soft tokens, drawn as
    a 4 x 4 grid over the pixels de-normalised with its processor's mean and std (0.5, not CLIP's)."""
    from integrations.test_real_processors import GEMMA3_TEMPLATE, PAN_AND_SCAN_WORDS, _gemma3

    words = ("user", "model", *_question_words(*PAN_AND_SCAN_WORDS))  # the helper adds those
    model, processor, _ = _gemma3(["<start_of_turn>", "<end_of_turn>"], words)
    _assert_runs_and_draws_16_tokens(capsys, tmp_path, model, processor, GEMMA3_TEMPLATE, keep=5,
                                     family="Gemma3 (Gemma3ForConditionalGeneration)")


def test_demo_runs_a_tiled_checkpoint_without_a_picture(tmp_path, capsys, monkeypatch):
    """LLaVA-NeXT cuts the photo into a base view and tiles: pruned and timed, but no picture (an earlier run's
    removed), and one line why."""
    from integrations.test_real_processors import _llava_any_resolution

    monkeypatch.setattr(demo, "QUESTION", "w4 w5 w6")  # words of its tokenizer: a question to rank by
    model, processor, _ = _llava_any_resolution("llava_next")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept_patches.png").write_bytes(b"an earlier run's")
    code, out, err = _demo(capsys, _checkpoint(tmp_path / "next", model, processor), tmp_path / "out", keep=4)
    assert code == 0, err
    n_visual = int(out.split(" of them visual")[0].rsplit("(", 1)[1].split()[-1])
    assert n_visual > 16  # the base view's 16 tokens and the tiles'
    _assert_table(out, n_visual, 4)
    assert "no picture of the kept patches: the processor splits the photo into tiles or crops" in out
    assert not (tmp_path / "out" / "kept_patches.png").exists()  # an earlier run's would pass for this model's


def test_demo_runs_a_florence2_checkpoint_on_the_question_alone(tmp_path, capsys):
    """Florence-2's processor writes the image's tokens, bos and eos around the text itself and has no chat
    template: the demo gives it the question alone (LLaVA-1.5's prompt would be a second image). Its 17 tokens
    are the patches' mean, then a 4 x 4 grid of 8 px patches: drawn as that grid, the mean as no cell."""
    if not hasattr(pytest.importorskip("transformers"), "Florence2ForConditionalGeneration"):
        pytest.skip("Florence-2: transformers 4.56+")
    from integrations.test_encoder_decoder_prune import _florence2_with_its_processor

    model, processor, _ = _florence2_with_its_processor(_question_words())
    code, out, err = _demo(capsys, _checkpoint(tmp_path / "florence2", model, processor), tmp_path / "out", keep=4)
    assert code == 0, err
    assert "family: Florence-2 (Florence2ForConditionalGeneration); prompt: '{question}'" in out
    assert f'question: "{demo.QUESTION}"' in out and "17 of them visual" in out
    _assert_table(out, 17, 4)
    path = tmp_path / "out" / "kept_patches.png"
    assert f"wrote {path}" in out
    with Image.open(path) as image:
        image = image.convert("RGB")
    cell = demo.PICTURE_SIDE // 4
    assert image.size == (2 * 4 * cell + 12, 4 * cell + 40)
    marks = [image.getpixel((4 * cell + 12 + c * cell, 40 + r * cell + cell // 2)) for r in range(4) for c in range(4)]
    lit = marks.count(demo.CORE_COLOUR) + marks.count(demo.DIVERSITY_COLOUR)
    assert lit in (3, 4)  # the 4 picks, but the mean where it is one of them


def test_demo_refuses_a_prompt_prune_cannot_rank_before_the_timed_rounds(tmp_path, capsys):
    """The hooks refuse a prompt only once they see it, in the warm-up: there, the question's words are all
    unknown to the tokenizer (<unk>, special), so no question is left to rank by: exit 2, no timed round."""
    from integrations.test_real_processors import _llava_any_resolution

    model, processor, _ = _llava_any_resolution("llava_next")
    code, out, err = _demo(capsys, _checkpoint(tmp_path / "next", model, processor), tmp_path / "out", keep=4)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("zspa demo: --model: prune() cannot prune its prompt: prompt: "), err
    assert "warm-up" in out and "timed round" not in out and not (tmp_path / "out").exists()


def _llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    demo.build_processor().save_pretrained(path)
    return "a 'llama' checkpoint, which AutoModelForImageTextToText does not load"


def _git(path):
    from transformers import GitConfig, GitForCausalLM

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    GitForCausalLM(GitConfig(vision_config=vision, vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2)).save_pretrained(path)
    return "zspa_kernels.prune supports"  # an image-text-to-text model of no supported family


def _of_its_own_suite(builders: str, name: str, message: str):
    """A maker of a checkpoint of the tiny ``name`` of ``tiny.<builders>`` (skipped where this transformers lacks
    it), saved with any processor (the model is refused first); it returns the refusal's ``message``."""
    def make(path):
        from zspa_kernels.integrations.transformers import tiny

        built = getattr(tiny, builders)
        if name not in built:
            pytest.skip(f"{name} is not in this transformers")
        built[name]().model.save_pretrained(path)
        demo.build_processor().save_pretrained(path)
        return message
    return make


_diffusion_gemma = _of_its_own_suite("BLOCK_DIFFUSION_BUILDERS", "diffusion_gemma",
                                     "DiffusionGemma generates by block diffusion")
_pi0 = _of_its_own_suite("ACTION_EXPERT_BUILDERS", "pi0", "PI0/PI0.5 generates actions, not text")


@pytest.mark.parametrize("make", [_llama, _git, _diffusion_gemma, _pi0],
                         ids=["causal-lm", "unsupported-vlm", "block-diffusion", "vision-language-action"])
def test_demo_refuses_a_checkpoint_it_cannot_run_before_any_timing(tmp_path, capsys, make):
    """A checkpoint AutoModelForImageTextToText cannot load, one of a family prune() does not take, a model whose
    prefill the demo cannot time: exit status 2 (returned: no exception), a message naming --model, nothing written."""
    message = make(tmp_path / "ckpt")
    code, out, err = _demo(capsys, str(tmp_path / "ckpt"), tmp_path / "out", keep=4)
    assert code == 2
    last = err.strip().splitlines()[-1]  # after any warning of transformers' loading
    assert last.startswith("zspa demo: --model: ") and message in last, err
    assert "failed" in out and "warm-up" not in out and not (tmp_path / "out").exists()


def test_picture_grid_reads_the_grid_of_each_known_layout():
    """[1, 3, H, W] pixels: the grid of the picture's aspect (Pixtral's non-square images too); image_grid_thw:
    h / m x w / m merged patches over the photo resized to h x w patches; anything else: no grid, and why."""
    from types import SimpleNamespace

    photo = Image.new("RGB", (60, 40))
    qwen = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, patch_size=14)))
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    picture, grid, why = demo.picture_grid(qwen, processor, {"image_grid_thw": torch.tensor([[1, 4, 6]])}, photo, 6)
    assert (picture.size, grid, why) == ((84, 56), (2, 3), None)
    pixels = torch.zeros(1, 3, 32, 48)  # 0 normalised with mean 0.5: grey
    picture, grid, why = demo.picture_grid(None, processor, {"pixel_values": pixels}, photo, 6)
    assert (picture.size, grid, why, picture.getpixel((0, 0))) == ((48, 32), (2, 3), None, (127, 127, 127))
    # Florence-2: the patches' mean, then their grid.
    florence = SimpleNamespace(config=SimpleNamespace(model_type="florence2"))
    picture, grid, why = demo.picture_grid(florence, processor, {"pixel_values": pixels}, photo, 7)
    assert (picture.size, grid, why) == ((48, 32), (2, 3), None)
    for inputs, n, reason in [({"pixel_values": torch.zeros(1, 3, 32, 32)}, 5, "form no grid"),
                              ({"pixel_values": torch.zeros(1, 5, 3, 16, 16)}, 80, "splits the photo into tiles"),
                              ({"pixel_values": torch.zeros(3, 3, 16, 16)}, 48, "splits the photo into tiles"),
                              ({"image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 2]])}, 5, "not one image"),
                              ({"image_grid_thw": torch.tensor([[1, 4, 6]])}, 5, "form no grid of 2 x 2 patches"),
                              ({"pixel_values": torch.zeros(1, 1, 3, 16, 16)}, 16, "a stack of one crop"),
                              ({"pixel_values": torch.zeros(1, 3, 2, 2560), "tgt_sizes": torch.ones(5, 2)}, 80,
                               "packs the patches of 5 slice(s)"),
                              ({"input_features": torch.zeros(1, 3)}, 5, "no picture")]:
        picture, grid, why = demo.picture_grid(qwen, processor, inputs, photo, n)
        assert picture is None and grid is None and reason in why, (inputs, why)
    # The merge in the image processor where the config names none (VideoLLaMA3's, Muse Glimmer's); in neither: why.
    bare = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(patch_size=14)))
    merging = SimpleNamespace(image_processor=SimpleNamespace(merge_size=1, patch_size=14))
    picture, grid, why = demo.picture_grid(bare, merging, {"image_grid_thw": torch.tensor([[1, 4, 6]])}, photo, 24)
    assert (picture.size, grid, why) == ((84, 56), (4, 6), None)
    picture, grid, why = demo.picture_grid(bare, processor, {"image_grid_thw": torch.tensor([[1, 4, 6]])}, photo, 6)
    assert picture is None and "names a merge size" in why


def test_prompts_drop_labels_and_ask_for_the_token_types_the_model_reads():
    """PaliGemma's processor returns labels (all -100) for every prompt, which would reach the model and its loss;
    Cosmos3-Edge's forward needs mm_token_type_ids, which processors return only when asked."""
    from types import SimpleNamespace

    from zspa_kernels.fidelity.samples import Prompts, Sample

    class Processor:
        tokenizer = SimpleNamespace(padding_side="right")
        calls = []

        def __call__(self, **kwargs):
            self.calls.append({**kwargs, "padding_side": self.tokenizer.padding_side})
            ids = torch.ones(1, 3, dtype=torch.long)
            return {"input_ids": ids, "labels": ids, "token_type_ids": ids, "mm_token_type_ids": ids}

    class Reads(torch.nn.Module):
        def forward(self, input_ids, mm_token_type_ids=None):
            pass

    class Plain(torch.nn.Module):
        def forward(self, input_ids, token_type_ids=None):
            pass

    sample = Sample("astronaut", demo.PHOTO, "what?")
    for model, asked, kept in ((Reads(), True, {"input_ids", "mm_token_type_ids"}),
                               (Plain(), False, {"input_ids", "token_type_ids", "mm_token_type_ids"})):
        processor = Processor()
        inputs = Prompts(processor, model, "{question}")([sample])
        assert set(inputs) == kept and processor.calls[-1]["padding_side"] == "left"  # padded for generate()
        assert processor.tokenizer.padding_side == "right"  # and the caller's processor left as it was
        assert processor.calls[-1].get("return_mm_token_type_ids", False) is asked


def test_draw_lights_the_kept_cells_row_major(tmp_path):
    """A 2 x 3 grid: token 5 is the bottom-right cell (a core pick, orange), token 0 the top-left (diversity, blue);
    the other cells are dimmed."""
    from zspa_kernels.integrations.transformers.selection import ImageSelection

    picture = Image.new("RGB", (30, 20), (200, 200, 200))
    selection = ImageSelection(0, 0, 6, torch.tensor([5, 0]), 1, torch.tensor([], dtype=torch.long))
    demo.draw(picture, (2, 3), selection, tmp_path / "p.png", "title")
    cell = demo.PICTURE_SIDE // 3
    with Image.open(tmp_path / "p.png") as image:
        image = image.convert("RGB")
    assert image.size == (2 * 3 * cell + 12, 2 * cell + 40)
    left = 3 * cell + 12
    at = {(r, c): image.getpixel((left + c * cell, 40 + r * cell + cell // 2)) for r in range(2) for c in range(3)}
    assert at.pop((1, 2)) == demo.CORE_COLOUR and at.pop((0, 0)) == demo.DIVERSITY_COLOUR
    assert all(max(pixel) < 60 for pixel in at.values())  # dimmed
    assert image.getpixel((left + 2 * cell + cell // 2, 40 + cell + cell // 2)) == (200, 200, 200)  # kept: lit
    # One token before the grid (Florence-2's mean of the patches): no cell; tokens 1.. are the cells.
    selection = ImageSelection(0, 0, 7, torch.tensor([0, 6, 1]), 2, torch.tensor([], dtype=torch.long))
    demo.draw(picture, (2, 3), selection, tmp_path / "lead.png", "title", lead=1)
    with Image.open(tmp_path / "lead.png") as image:
        image = image.convert("RGB")
    at = {(r, c): image.getpixel((left + c * cell, 40 + r * cell + cell // 2)) for r in range(2) for c in range(3)}
    assert at.pop((1, 2)) == demo.CORE_COLOUR and at.pop((0, 0)) == demo.DIVERSITY_COLOUR
    assert all(max(pixel) < 60 for pixel in at.values())


def test_bench_times_every_implementation_available_here(capsys):
    assert main(["bench", "--shape", "llava-1.5", "--keep", "0.05"]) == 0
    out = capsys.readouterr().out
    for impl in ("cpu", "reference", "torch_loop", "divprune_loop"):
        assert any(line.startswith(impl) and "µs" in line for line in out.splitlines()), out
