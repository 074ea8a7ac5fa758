"""zspa_kernels.prune on the inputs real checkpoints and real callers give: where each
image's tokens are, which text forms the prompt, labels, left padding, bad arguments."""
from __future__ import annotations

import copy
import dataclasses
import pathlib
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.integrations.transformers import kv_cache  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import (TEXT_IDS, ACTION_EXPERT_BUILDERS,  # noqa: E402
                                                         BLOCK_DIFFUSION_BUILDERS, BUILDERS, CROSS_ATTENTION_BUILDERS,
                                                         ENCODER_DECODER_BUILDERS, llava, mistral3)

from .reference import assert_same_generation, capture_lm_calls, lm_of, pruned_generation  # noqa: E402

KEEP = 3
PAD_ATOL = 1e-6  # a batch row vs the row alone: the unpatched model's own summation-order noise


def _visual(inputs, handle) -> torch.Tensor:
    return torch.isin(inputs["input_ids"], torch.tensor(handle.visual_ids))


def _kept_positions(inputs, handle, row: int) -> torch.Tensor:
    """Positions of ``row`` that a pruned prefill keeps: its attended text, and of each
    image (the next ``n_tokens`` visual tokens of the row, in order) the ``kept`` ones."""
    visual = _visual(inputs, handle)[row]
    spots, at = visual.nonzero()[:, 0], 0
    keep = ~visual & inputs["attention_mask"][row].bool()
    for sel in (s for s in handle.last_selection if s.batch_row == row):
        keep[spots[at + sel.kept]] = True
        at += sel.n_tokens
    assert at == spots.shape[0]
    return keep.nonzero()[:, 0]


# -- transformers 5.24 renamed the cache argument ----------------------------------------
@torch.no_grad()
def test_hooks_pass_the_cache_under_the_name_the_model_takes():
    """On 5.24 (``cache=``) a hook that passed ``past_key_values`` got a FutureWarning and,
    reading the old name, took every decode step for a prefill."""
    tiny = llava()
    inputs = tiny.make_inputs(tiny.single)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
            out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                      return_dict_in_generate=True)
    assert handle.last_selection and handle.last_selection[0].kept.shape == (KEEP,)
    dropped = handle.last_selection[0].n_tokens - KEEP
    assert kv_cache(out).get_seq_length() == inputs["input_ids"].shape[1] - dropped + 2


# -- finding 1: images are found from the vision tower's own counts ----------------------
LAYOUTS = {
    "clip-default": lambda: llava(tower="clip", strategy="default"),
    "clip-full": lambda: llava(tower="clip", strategy="full"),
    "siglip-default": lambda: llava(tower="siglip", strategy="default"),
    "siglip-full": lambda: llava(tower="siglip", strategy="full"),
    "pixtral": lambda: llava(tower="pixtral", strategy="full"),
    "mistral3": mistral3,
}


def _selections_of_a_forward_and_a_generate(tiny, inputs) -> list:
    """``handle.last_selection`` of a pruned forward of ``inputs``, then of a pruned generate()."""
    out = []
    for call in ("forward", "generate"):
        with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
            if call == "forward":
                tiny.model(**inputs)
            else:
                tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        out.append(handle.last_selection)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@torch.no_grad()
def test_each_image_is_budgeted_with_its_own_feature_count(layout):
    """Adjacent images (no text between them) and Pixtral's row-break tokens inside an
    image: each image is one selection of exactly the features the tower made of it."""
    tiny = LAYOUTS[layout]()
    inputs = tiny.make_inputs(tiny.batch)
    image = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    features = tiny.model.model.get_image_features(**image)
    expected = [f.shape[0] for f in getattr(features, "pooler_output", features)]
    for selection in _selections_of_a_forward_and_a_generate(tiny, inputs):
        assert [s.n_tokens for s in selection] == expected
        assert all(s.kept.shape == (KEEP,) for s in selection)


@pytest.mark.parametrize("name", ["llava_pixtral", "video_llava", "gemma3", "qwen2_5_vl"])
@torch.no_grad()
def test_a_prompt_whose_call_brings_no_images_runs_as_the_unpatched_model(name):
    """Image tokens without pixel inputs or encoded features (transformers 5's assisted decoding gives an
    assistant model the prompt so): the model embeds them as text, and the hooks select nothing, nor read the
    ids back, nor ask for image sizes: the unpatched logits bit for bit."""
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    expected = tiny.model(**text).logits
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        got = tiny.model(**text).logits
        assert handle.last_selection == [] and handle.last_kept_positions is None
        tiny.model(**inputs)  # the same prompt with its images: selected
        assert len(handle.last_selection) == tiny.n_images(tiny.batch)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name, kind", [("llava_next", "image"), ("llava_next_video", "image"),
                                        ("llava_onevision", "video"), ("llava_next_video", "video")])
@torch.no_grad()
def test_any_resolution_images_back_to_back_are_refused(name, kind):
    """Their counts differ per image and cannot be told apart without text between them; nor can
    two videos (one run of tokens each, of any frame count). LLaVA-OneVision's images can (below)."""
    tiny = BUILDERS[name]()
    media = tiny.single[0][1] if kind == "image" else ("video", 2)
    inputs = tiny.make_inputs([[("text", 3), media, media, ("text", 4)]])
    with zspa_kernels.prune(tiny.model, keep=KEEP), pytest.raises(
            ValueError, match=r"^model: 2 images/videos given but 1 runs of their tokens; images or videos back to back"):
        tiny.model(**inputs)


@torch.no_grad()
def test_llava_onevision_images_of_a_multi_image_row_back_to_back_are_told_apart():
    """LLaVA-OneVision encodes each image of a sample of several (``batch_num_images``) as its base
    view and a newline feature, one count for all of them: two such images back to back (as its chat
    template writes a message's images) are one selection each, in a forward and in generate(), beside
    a row whose one image has the any-resolution count; and their picks are those of the same images
    with text between them. Runs that are not whole images of those counts are refused."""
    from zspa_kernels.integrations.transformers.families import _onevision_image_counts

    tiny = BUILDERS["llava_onevision"]()
    image = tiny.model.config.image_token_id
    pair = [("text", 3), ("image", (16, 32)), ("image", (32, 32)), ("text", 4)]
    batch = tiny.make_inputs([pair, [("text", 2), ("image", (32, 16)), ("text", 5)]])
    assert batch["batch_num_images"].tolist() == [2, 1]
    for selection in _selections_of_a_forward_and_a_generate(tiny, batch):
        assert [(s.batch_row, s.n_tokens) for s in selection] == [(0, 17), (0, 17), (1, 56)]
        assert all(s.kept.shape == (KEEP,) for s in selection)

    adjacent = tiny.make_inputs([pair])
    ids = adjacent["input_ids"][0]
    assert (ids == image).sum() == 34 and (ids[3:37] == image).all()  # one run of 17 + 17 tokens
    # The same two images with the question's first token moved between them: the same features, the same question.
    spaced = tiny.make_inputs([[("text", 3), ("image", (16, 32)), ("text", 1), ("image", (32, 32)), ("text", 3)]])
    spaced["input_ids"][0, spaced["input_ids"][0] != image] = ids[ids != image]
    spaced["pixel_values"] = adjacent["pixel_values"]
    (adjacent_picks, _), (spaced_picks, _) = (_selections_of_a_forward_and_a_generate(tiny, x) for x in (adjacent, spaced))
    assert [s.n_tokens for s in spaced_picks] == [17, 17]
    for a, b in zip(adjacent_picks, spaced_picks):
        assert torch.equal(a.order, b.order)

    config = tiny.model.config
    assert _onevision_image_counts(config, {"batch_num_images": torch.tensor([2, 1])}, [34, 56]) == [17, 17, 56]
    assert _onevision_image_counts(config, {"batch_num_images": torch.tensor([2, 1])}, [17, 17, 56]) == [17, 17, 56]
    for numbers, runs in (([2], [30]), ([2, 1], [34]), ([1], [56, 17]), ([3], [34])):
        with pytest.raises(ValueError, match="batch_num_images"):
            _onevision_image_counts(config, {"batch_num_images": torch.tensor(numbers)}, runs)


@torch.no_grad()
def test_video_llava_budgets_each_image_and_each_video_frame():
    """Video-LLaVA's image runs and video runs split apart, by their fixed counts: 16 tokens an
    image (class token dropped), 17 a frame (kept), a video back to back with images included,
    in a forward and in generate() (which on 5.24 passes the frames encoded and flattened)."""
    tiny = BUILDERS["video_llava"]()
    inputs = tiny.make_inputs([[("text", 3), ("image", 0), ("video", (3,)), ("image", 0), ("text", 4)]])
    for call, selection in zip(("forward", "generate"), _selections_of_a_forward_and_a_generate(tiny, inputs)):
        assert [s.n_tokens for s in selection] == [16, 17, 17, 17, 16], call


@torch.no_grad()
def test_dots3_note_images_back_to_back_are_told_apart_by_their_grids():
    """Dots3-Note's processor puts no marker around an image, so images side by side are one run
    of image tokens: each is budgeted with its grid's count (8 then 12 tokens), in a forward and in
    generate(), and each image's picks are those of the same image with text between the two."""
    if "dots3_note" not in BUILDERS:
        pytest.skip("Dots3-Note is not in this transformers release")
    from zspa_kernels.integrations.transformers.tiny import QWEN_END, QWEN_START

    tiny = BUILDERS["dots3_note"]()

    def without_markers(inputs):
        ids = inputs["input_ids"]
        keep = ~torch.isin(ids[0], torch.tensor([QWEN_START, QWEN_END]))
        return {k: v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in inputs.items()}

    image_a, image_b = ("image", (4, 8)), ("image", (6, 8))
    adjacent = without_markers(tiny.make_inputs([[("text", 3), image_a, image_b, ("text", 4)]]))
    image = adjacent["input_ids"][0] == tiny.model.config.image_token_id
    assert image.sum() == 20 and image[3:23].all()  # one run of 8 + 12 tokens
    for selection in _selections_of_a_forward_and_a_generate(tiny, adjacent):
        assert [s.n_tokens for s in selection] == [8, 12]
        assert all(s.kept.shape == (KEEP,) for s in selection)
    # The same two images with the question's first token moved between them: the runs split by
    # themselves, and the images' features and the question (the text after the first image) are the same.
    spaced = without_markers(tiny.make_inputs([[("text", 3), image_a, ("text", 1), image_b, ("text", 3)]]))
    spaced["input_ids"][0, spaced["input_ids"][0] != tiny.model.config.image_token_id] = adjacent["input_ids"][0, ~image]
    spaced["pixel_values"] = adjacent["pixel_values"]  # the same grids, drawn after other text
    (adjacent_picks, _), (spaced_picks, _) = (_selections_of_a_forward_and_a_generate(tiny, x)
                                              for x in (adjacent, spaced))
    assert [s.n_tokens for s in spaced_picks] == [8, 12]
    for a, b in zip(adjacent_picks, spaced_picks):
        assert torch.equal(a.order, b.order)


@torch.no_grad()
def test_video_llava_runs_that_are_not_whole_frames_are_refused():
    """A video's tokens split 16 + 18 by a text token: as many as its two frames have features, so the model
    merges them, but the runs are not whole frames: refused, never cut anywhere. (Image runs that do not
    split evenly into images are refused by the model first: their count differs from the features'.)"""
    tiny = BUILDERS["video_llava"]()
    inputs = tiny.make_inputs([[("text", 2), ("video", (2,)), ("text", 2)]])
    ids = inputs["input_ids"][0]
    first = int((ids == tiny.model.config.video_token_id).nonzero()[0])
    ids = torch.cat([ids[:first + 16], torch.tensor([TEXT_IDS[0]]), ids[first + 16:]])[None]
    inputs = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    tiny.model(**inputs)  # the unpatched model runs it
    with zspa_kernels.prune(tiny.model, keep=KEEP), pytest.raises(ValueError, match="does not split into whole"):
        tiny.model(**inputs)


# -- finding 2: a question that stands before the image ---------------------------------
@torch.no_grad()
def test_question_before_the_image_forms_the_prompt():
    """Nothing but the image after the question: the question (special tokens left out)
    is the prompt, recorded in ``prompt_tokens``; the core is its top-relevance tokens."""
    tiny = llava()
    inputs = tiny.make_inputs([[("text", 9), ("image", 0)]])
    with zspa_kernels.prune(tiny.model, keep=KEEP, core_ratio=1.0) as handle:
        tiny.model(**inputs)
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    (sel,) = handle.last_selection
    ids = inputs["input_ids"][0]
    visual = _visual(inputs, handle)[0]
    question = (~visual & ~torch.isin(ids, handle.special_ids)).nonzero()[:, 0]
    assert question.numel() > 0 and torch.equal(sel.prompt_tokens, question)
    embeds = full[0]["inputs_embeds"][0].double()
    prompt = embeds[question].mean(0)  # mean-pooled question (SPEC §1, relevance="mean")
    relevance = torch.nn.functional.normalize(embeds[visual], dim=-1) @ prompt
    assert torch.equal(sel.kept, relevance.topk(KEEP).indices.sort().values)


def _tokenizer(special_from: int, size: int):
    """A real fast tokenizer over ``size`` made-up words whose ids from ``special_from`` up are
    added tokens marked special under no special-token name, as checkpoints add their image
    markers: only ``added_tokens_decoder`` tells them apart (``all_special_ids`` is empty)."""
    from tokenizers import AddedToken, Tokenizer, models

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    words.add_special_tokens([AddedToken(f"w{i}", special=True) for i in range(special_from, size)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words)
    assert tokenizer.all_special_ids == []
    return tokenizer


# PaliGemma's tiny inputs give the newline that closes its prompt an id past the text: in its tokenizer
# ordinary text that decodes to whitespace (dropped once tokenizer= is given), after the question, no
# marker around an image: prune() does not warn of it.
NEWLINE_PAST_THE_TEXT = {"paligemma", "paligemma2"}


@pytest.mark.parametrize("name", list(BUILDERS))
@torch.no_grad()
def test_the_question_holds_no_marker_that_the_config_or_the_tokenizer_names(name):
    """The tiny inputs draw question text from ``TEXT_IDS`` and give markers ids past it. Without
    a tokenizer, the question of every row holds text only, except in the families whose processors
    write markers that only their tokenizer names (``Family.unnamed_markers``: then some marker is
    there, and prune() warns of it; the flag is exact). With a tokenizer (or the processor holding
    it) whose added special tokens are the ids past the text, every family's question is text only,
    and never empty, and nothing warns; nor does ``prompt="all_text"``, which takes every token."""
    from zspa_kernels.integrations.transformers.families import find_family

    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    ids = inputs["input_ids"]

    def not_text(prompt="question", **tokenizer) -> tuple[set[int], bool]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = zspa_kernels.prune(tiny.model, keep=2, prompt=prompt, **tokenizer)
        warned = any("tokenizer=processor" in str(w.message) for w in caught)
        with handle:
            tiny.model(**inputs)
        assert handle.last_selection and all(s.prompt_tokens.numel() for s in handle.last_selection)
        return {int(i) for s in handle.last_selection for i in ids[s.batch_row, s.prompt_tokens]
                if not TEXT_IDS[0] <= i < TEXT_IDS[1]}, warned

    markers, warned = not_text()
    assert warned == find_family(tiny.model).writes_unnamed_markers(tiny.model.config)
    assert bool(markers) == (warned or name in NEWLINE_PAST_THE_TEXT), markers
    assert not not_text("all_text")[1]
    tokenizer = _tokenizer(TEXT_IDS[1], int(ids.max()) + 1)
    assert not_text(tokenizer=tokenizer) == (set(), False)
    processor = type("Processor", (), {"tokenizer": tokenizer})()  # what a processor holds
    assert not_text(tokenizer=processor) == (set(), False)


@torch.no_grad()
def test_tokens_the_tokenizer_decodes_to_control_characters_are_no_question():
    """Fuyu's processor writes ``<0x04>`` (its "beginning of answer": a byte token of a byte-fallback vocabulary,
    which decodes to the control character U+0004) after every prompt, right after the question. Without a
    tokenizer it is question text; with one it is not, as whitespace is not. A byte token that decodes to part of
    a character (``<0xE2>``, the first byte of a three-byte one: U+FFFD alone) stays: it spells a word."""
    from tokenizers import Tokenizer, decoders, models

    tiny = BUILDERS["fuyu"]()
    inputs = tiny.make_inputs(tiny.single)  # text, an image, text
    ids = inputs["input_ids"]

    def prompt(**tokenizer) -> torch.Tensor:
        with zspa_kernels.prune(tiny.model, keep=KEEP, **tokenizer) as handle:
            tiny.model(**inputs)
        (selection,) = handle.last_selection
        return selection.prompt_tokens

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fuyu's unnamed markers: the warning has its own test
        untokenized = prompt()
    # The question's last two tokens (the text after the image) stand for <0xE2> and <0x04>.
    byte, boa = ids[0, untokenized[-2:]].tolist()
    assert untokenized[-1] > ids.shape[1] - 8 and byte != boa
    vocab = {f"w{i}": i for i in range(int(ids.max()) + 1) if i not in (boa, byte)}
    vocab.update({"<0x04>": boa, "<0xE2>": byte})
    words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    words.decoder = decoders.ByteFallback()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words)
    assert tokenizer.decode([boa]) == "\x04" and tokenizer.decode([byte]) == "\ufffd"
    tokenized = prompt(tokenizer=tokenizer)
    assert torch.equal(tokenized, untokenized[ids[0, untokenized] != boa])


@pytest.mark.parametrize("name", list(BUILDERS))
@torch.no_grad()
def test_image_counts_read_no_input_values_but_those_the_sync_brings(name, monkeypatch):
    """On a GPU, every value read back from the device is a host sync of its own (handle.py's
    docstring promises one a prefill). The values of integer inputs that size the images
    (families.COUNT_INPUTS) are copied to the host ahead of that sync; every other integer input
    reaches the family's counts as a meta tensor here, whose shape can be read and whose values
    cannot: a count that reads one fails, as it would sync on a GPU. The counts are the same."""
    from zspa_kernels.integrations.transformers import handle as handle_module

    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        tiny.model(**inputs)
    expected = [(s.batch_row, s.n_tokens) for s in handle.last_selection]
    on_host = handle_module._count_inputs_on_host

    def valueless(inputs: dict) -> dict:
        sizing = on_host(inputs)
        for key, value in sizing.items():
            if key not in handle_module.COUNT_INPUTS and isinstance(value, torch.Tensor) and not (
                    value.is_floating_point() or value.is_complex()):
                sizing[key] = torch.empty_like(value, device="meta")
        return sizing

    monkeypatch.setattr(handle_module, "_count_inputs_on_host", valueless)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        tiny.model(**inputs)
    assert [(s.batch_row, s.n_tokens) for s in handle.last_selection] == expected


@torch.no_grad()
def test_a_row_without_text_is_refused_unless_diversity_only():
    tiny = llava()
    inputs = tiny.make_inputs([[("image", 0)]])
    inputs["input_ids"][0, :] = tiny.model.config.image_token_id  # not even a bos token
    with zspa_kernels.prune(tiny.model, keep=KEEP), pytest.raises(ValueError, match="^prompt:"):
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=KEEP, core_ratio=0.0) as handle:
        tiny.model(**inputs)
    assert handle.last_selection[0].kept.shape == (KEEP,)


def _video_ranges(tiny, inputs) -> list[tuple[int, int, int]]:
    """(row, first, last) of each video in the tiny inputs, as its processor writes it: GLM's between its
    begin/end-of-video markers; the others' from the first token of its first frame to the last of its
    last (its frames: the next ``video_grid_thw[v, 0]`` runs of video tokens)."""
    config, ids = tiny.model.config, inputs["input_ids"]
    if getattr(config, "video_start_token_id", None) is not None:
        return [(r, int(a), int(b)) for r in range(ids.shape[0])
                for a, b in zip((ids[r] == config.video_start_token_id).nonzero()[:, 0],
                                (ids[r] == config.video_end_token_id).nonzero()[:, 0])]
    runs = []  # [row, first, last] of each run of video tokens
    for r, p in (ids == config.video_token_id).nonzero().tolist():
        if runs and runs[-1][0] == r and runs[-1][2] == p - 1:
            runs[-1][2] = p
        else:
            runs.append([r, p, p])
    if "video_grid_thw" in inputs:
        per_video = inputs["video_grid_thw"][:, 0].tolist()
    elif "num_frames_per_video" in inputs:  # Gemma 4 (5.24+)
        per_video = inputs["num_frames_per_video"].tolist()
    else:  # Gemma 4 on 5.17: (videos, frames, patches, pixels)
        per_video = [inputs["pixel_values_videos"].shape[1]] * inputs["pixel_values_videos"].shape[0]
    ranges, at = [], 0
    for n in per_video:
        (row, first, _), (_, _, last) = runs[at], runs[at + n - 1]
        ranges.append((row, first, last))
        at += n
    return ranges


# The families whose processors write text between a video's frames (timestamps): ``Family.video_spans``.
TIMED_VIDEOS = ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "lfm3_vl", "cosmos3_edge",
                "cohere_compass", "glm4v_video", "glm4v_moe_video", "glm46v_video", "glm5_next_video", "gemma4",
                "gemma4_unified", "muse_glimmer", "muse_spark", "video_llama_3"]


@pytest.mark.parametrize("name", [n for n in TIMED_VIDEOS if n in BUILDERS])
@torch.no_grad()
def test_the_text_between_a_videos_frames_is_no_question(name):
    """The timestamps a processor writes between the frames of a video (the tiny inputs hold a text
    token there, as Qwen3-VL's writes ``<0.5 seconds>`` before each frame and GLM's a time after it) are
    inside the video, as row breaks are inside an image: no prompt position lies in a video, without a
    tokenizer too, and the frames are budgeted apart as before."""
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    ranges = _video_ranges(tiny, inputs)
    ids = inputs["input_ids"]
    assert ranges and all(((ids[r, a:b + 1] >= TEXT_IDS[0]) & (ids[r, a:b + 1] < TEXT_IDS[1])).any()
                          for r, a, b in ranges)  # words stand between the frames
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        tiny.model(**inputs)
    assert handle.last_selection and all(s.prompt_tokens.numel() for s in handle.last_selection)
    for s in handle.last_selection:
        inside = [int(p) for p in s.prompt_tokens for r, a, b in ranges if r == s.batch_row and a <= p <= b]
        assert inside == [], (s.batch_row, inside)


# -- finding 3: labels -------------------------------------------------------------------
def _labels(inputs, handle) -> torch.Tensor:
    labels = inputs["input_ids"].masked_fill(_visual(inputs, handle), -100)
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


# Llama 4: a wrapper without a base model, which merges the image features itself.
@pytest.mark.parametrize("name", [n for n in ("llava", "qwen2_5_vl", "llama4") if n in BUILDERS])
@torch.no_grad()
def test_labels_give_the_loss_over_the_kept_positions(name):
    """Each kept label is predicted by the kept position before it in its row (a row's
    first token by none); keep-all is the unpatched model's loss exactly."""
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=1.0) as handle:
        labels = _labels(inputs, handle)
        kept_all = tiny.model(**inputs, labels=labels)
    assert torch.equal(kept_all.loss, tiny.model(**inputs, labels=labels).loss)

    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model(**inputs, labels=labels)
        as_tuple = tiny.model(**inputs, labels=labels, return_dict=False)  # the loss first, as unpatched
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    logits, targets = [], []
    for r in range(len(tiny.batch)):  # the loss of each row's kept positions, no padding
        kept = _kept_positions(inputs, handle, r)
        logits.append(out.logits[r, -kept.numel():-1])
        targets.append(labels[r, kept][1:])
    expected = torch.nn.functional.cross_entropy(torch.cat(logits).float(), torch.cat(targets),
                                                 ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def _answered(tiny, inputs: dict, n: int = 4) -> dict:
    """``inputs`` with an answer of ``n`` text tokens after every row, as a training batch holds it:
    each per-position input gets ``n`` more positions like its last (text), the answer's token types
    the suffix's on PaliGemma; the question's positions stay where they were."""
    ids = inputs["input_ids"]
    B, L = ids.shape
    answer = torch.randint(*TEXT_IDS, (B, n), generator=torch.Generator().manual_seed(L))
    out = dict(inputs, input_ids=torch.cat([ids, answer], 1))
    for key, value in inputs.items():
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == (B, L):
            last = value[:, -1:].expand(B, n, *value.shape[2:])
            if key == "token_type_ids" and tiny.model.config.model_type == "paligemma":
                last = torch.ones_like(last)  # the suffix, as the processor marks an answer given with the prompt
            out[key] = torch.cat([value, last], 1)
    return out


def _picks(tiny, inputs, prompt, **labels):
    with zspa_kernels.prune(tiny.model, keep=KEEP, prompt=prompt) as handle:
        tiny.model(**inputs, **labels)
    return [(s.batch_row, s.prompt_tokens.tolist(), s.order.tolist()) for s in handle.last_selection]


ANSWER_FAMILIES = ["llava", "qwen2_5_vl", "llama4", "paligemma", "gemma3", "mllama"]


@pytest.mark.parametrize("prompt", ["question", "all_text"])
@pytest.mark.parametrize("name", [n for n in ANSWER_FAMILIES if n in BUILDERS or n in CROSS_ATTENTION_BUILDERS])
@torch.no_grad()
def test_a_labelled_answer_is_no_prompt_so_training_selects_as_inference_will(name, prompt):
    """In a training batch whose labels mark the answer (the question's are -100), the answer is left
    out of the prompt: each image keeps the tokens (in the same order) that the question alone gives,
    as generation will, where no answer is written yet. Labels over every text token (a language-
    modelling loss) mark no answer: the answer then counts as prompt text, as with no labels, and
    prune() warns; PaliGemma's token types mark its suffix, the answer, which is then no prompt, nor
    a question without labels."""
    tiny = (BUILDERS.get(name) or CROSS_ATTENTION_BUILDERS[name])()
    asked = tiny.make_inputs(tiny.batch)
    answered = _answered(tiny, asked)
    ids, L = answered["input_ids"], asked["input_ids"].shape[1]
    at_inference = _picks(tiny, asked, prompt)
    answer_only = ids.clone()
    answer_only[:, :L] = -100
    assert _picks(tiny, answered, prompt, labels=answer_only) == at_inference

    every_token = ids.masked_fill(answered["attention_mask"] == 0, -100)
    unlabelled = _picks(tiny, answered, prompt)
    if name == "paligemma":  # its token types mark the answer (the suffix): no question without labels too
        if prompt == "question":
            assert unlabelled == at_inference
        else:  # every attended token, the suffix too
            assert all(max(p) >= L for _, p, _ in unlabelled)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # labels over every token, and the answer told by its types
            assert _picks(tiny, answered, prompt, labels=every_token) == at_inference
    else:
        assert all(max(p) >= L for _, p, _ in unlabelled)  # the answer was in every row's prompt
        with pytest.warns(UserWarning, match=r"labels cover every question token of a row with images .*"
                                             r"tokenizer=processor"):  # no template: no answer to tell apart
            assert _picks(tiny, answered, prompt, labels=every_token) == unlabelled

    with pytest.raises(ValueError, match=r"^labels: expected the shape of input_ids"):
        _picks(tiny, answered, prompt, labels=answer_only[:, 1:])


# -- finding 4: a refused call leaves the model untouched -------------------------------
@pytest.mark.parametrize("arg, value", [("tokenizer", object()), ("keep", 0), ("backend", "gpu")])
def test_a_refused_prune_leaves_the_model_unpruned(arg, value):
    tiny = llava()
    with pytest.raises((ValueError, TypeError), match=f"^{arg}: expected"):
        zspa_kernels.prune(tiny.model, **{arg: value})
    zspa_kernels.prune(tiny.model).remove()  # not "already pruned"
    assert not tiny.model._forward_pre_hooks and not tiny.model.model._forward_pre_hooks


@torch.no_grad()
@pytest.mark.parametrize("keep, as_python", [(np.int64(KEEP), KEEP), (np.float32(0.5), 0.5)])
def test_a_numpy_budget_prunes_as_the_python_number_it_holds(keep, as_python):
    """A budget computed with numpy (``np.int64`` count, ``np.float32`` fraction or ratio) is
    read as the int or float it holds, not refused and not taken for the other kind."""
    tiny = llava()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=as_python, core_ratio=0.25):
        expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=keep, core_ratio=np.float32(0.25)) as handle:
        assert handle.keep == as_python and type(handle.keep) is type(as_python)
        assert torch.equal(tiny.model(**inputs).logits, expected)


def test_a_family_older_than_its_first_pruned_transformers_is_refused(monkeypatch):
    from zspa_kernels.integrations.transformers import families

    tiny = llava()
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in tiny.model.modules()]
    monkeypatch.setattr(families, "FAMILIES", tuple(
        dataclasses.replace(f, min_transformers=(99, 0)) if f.name == "LLaVA-1.5" else f
        for f in families.FAMILIES))
    with pytest.raises(ValueError, match=r"^model: zspa_kernels.prune supports LLaVA-1.5 from transformers 99\.0; this is "):
        zspa_kernels.prune(tiny.model)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in tiny.model.modules()] == hooks


def test_a_family_whose_unpatched_model_fails_is_refused(monkeypatch):
    from zspa_kernels.integrations.transformers import families

    tiny = llava()
    monkeypatch.setattr(families, "FAMILIES", tuple(
        dataclasses.replace(f, broken_in=((0, 0), None, "it fails")) if f.name == "LLaVA-1.5" else f
        for f in families.FAMILIES))
    with pytest.raises(ValueError, match=r"^model: zspa_kernels.prune cannot prune LLaVA-1.5 on transformers .*: it fails$"):
        zspa_kernels.prune(tiny.model)
    assert not tiny.model._forward_pre_hooks and not tiny.model.model._forward_pre_hooks


@pytest.mark.parametrize("name", ["llava", "video_llava"])
def test_a_config_that_names_no_visual_token_is_refused(name):
    """Without a visual token id no prompt would hold an image: every prefill would run unpruned."""
    tiny = BUILDERS[name]()
    attrs = [a for a in ("image_token_id", "video_token_id") if hasattr(tiny.model.config, a)]
    for attr in attrs:
        setattr(tiny.model.config, attr, None)
    with pytest.raises(ValueError, match=r"^model\.config: names no .* visual token id \(image_token_id(, video_token_id)?: None\); cannot tell"):
        zspa_kernels.prune(tiny.model)
    assert not any(m._forward_pre_hooks for m in tiny.model.modules())


def test_a_family_that_embeds_its_ids_cannot_also_build_masks():
    """Its decode steps reach the hooks as ids: a mask builder would get them for embeddings."""
    from zspa_kernels.integrations.transformers import families

    phi4 = next(f for f in families.FAMILIES if f.embed is not None)
    builder = next(f.build_mask for f in families.FAMILIES if f.build_mask is not None)
    with pytest.raises(ValueError, match=r"^Family 'Phi-4-multimodal': a family that embeds its input_ids itself"):
        dataclasses.replace(phi4, build_mask=builder)


@torch.no_grad()
def test_llama4_is_refused_exactly_where_its_unpatched_model_fails():
    """transformers 5.24's Llama4ForConditionalGeneration reads image_outputs from its causal LM's
    output, which has none: refused there (no builder in the shared suite), accepted where it runs."""
    from zspa_kernels.integrations.transformers.tiny import llama4

    tiny = llama4()
    try:
        tiny.model(**tiny.make_inputs(tiny.single))
        runs = True
    except AttributeError:
        runs = False
    assert ("llama4" in BUILDERS) == runs
    if not runs:
        with pytest.raises(ValueError, match=r"^model: zspa_kernels.prune cannot prune Llama 4 on transformers "):
            zspa_kernels.prune(tiny.model)


def test_a_family_not_in_the_table_is_refused_before_any_hook():
    """BLIP-2 (a Q-Former's few query tokens stand for the image) is an image-text model prune does
    not support."""
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         word_embed_proj_dim=32, vocab_size=128),
        num_query_tokens=4)
    model = transformers.Blip2ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="^model: zspa_kernels.prune supports .*PaliGemma.*'blip-2'"):
        zspa_kernels.prune(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name, full", [("qwen2_5_omni", "Qwen2_5Omni"), ("qwen3_omni_moe", "Qwen3OmniMoe")])
@torch.no_grad()
def test_a_qwen_omni_model_is_pruned_through_its_thinker(name, full):
    """The full Qwen Omni model is refused, pointing at its thinker (its talker would read the thinker's
    hidden state at every prompt position); its thinker is pruned as the thinker alone is."""
    tiny = BUILDERS[name]()
    config = getattr(transformers, f"{full}Config")(thinker_config=tiny.model.config.to_dict(),
                                                    enable_audio_output=False)
    model = getattr(transformers, f"{full}ForConditionalGeneration")(config).eval()
    model.thinker.load_state_dict(tiny.model.state_dict())
    with pytest.raises(ValueError, match=r"^model: .*prune\(model\.thinker, \.\.\.\)"):
        zspa_kernels.prune(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(model.thinker, keep=KEEP) as handle:
        assert torch.equal(model.thinker(**inputs).logits, expected) and handle.last_selection


@torch.no_grad()
def test_a_peft_wrapper_is_pruned_through_the_model_it_wraps():
    """A LoRA model left unmerged (peft's PeftModel, as fine-tuned checkpoints are served): prune()
    hooks the model it wraps; keep-all is the wrapper's own logits bit for bit, and a pruned
    forward runs through the adapters (disabling them changes its logits)."""
    peft = pytest.importorskip("peft")
    tiny = llava()
    inputs = tiny.make_inputs(tiny.batch)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny.model, lora)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]  # peft's own
    expected = model(**inputs).logits
    attended = inputs["attention_mask"].bool()
    with zspa_kernels.prune(model, keep=1.0) as handle:
        assert torch.equal(model(**inputs).logits[attended], expected[attended])
        assert handle.last_selection
    with zspa_kernels.prune(model, keep=KEEP) as handle:
        pruned = model(**inputs).logits
        assert pruned.shape[1] < expected.shape[1] and handle.last_selection
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, pruned)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3", "mllama"])
@torch.no_grad()
def test_a_model_dispatched_by_accelerate_prunes_as_it_does_in_memory(name, tmp_path):
    """``from_pretrained(..., device_map=...)`` hands the model to accelerate's ``dispatch_model``,
    which replaces the forward of every placed module by one that moves (or loads) its weights and
    inputs first. Here one decoder layer is offloaded to disk, so its weights are read in at every
    call: the pruned generation must pick the same tokens and compute the same logits as the model
    held in memory (one hook path each: LLaVA's, Qwen2.5-VL's M-RoPE, Gemma3's dict of masks,
    Llama 3.2 Vision's cross-attention)."""
    accelerate = pytest.importorskip("accelerate")
    tiny = (BUILDERS.get(name) or CROSS_ATTENTION_BUILDERS[name])()
    inputs = tiny.make_inputs(tiny.batch)
    expected = pruned_generation(tiny.model, inputs, KEEP, max_new_tokens=2)
    layer = f"{next(n for n, m in tiny.model.named_modules() if m is lm_of(tiny.model))}.layers.0"
    model = accelerate.dispatch_model(copy.deepcopy(tiny.model), device_map={"": "cpu", layer: "disk"},
                                      offload_dir=str(tmp_path))
    assert hasattr(model.get_submodule(layer), "_hf_hook")  # its weights live on disk
    got = pruned_generation(model, inputs, KEEP, max_new_tokens=2)
    assert len(got[1]) == tiny.n_images(tiny.batch)
    assert_same_generation(got, expected, atol=0)


@torch.no_grad()
def test_the_image_text_to_text_pipeline_is_pruned_as_generate_is():
    """``transformers.pipeline("image-text-to-text")`` runs the processor and ``generate()`` itself:
    under prune() it keeps the same tokens and generates the same ids as ``generate()`` on the
    processor's inputs (the demo's tiny LLaVA and processor, a real photo, 576 tokens kept to 16)."""
    from PIL import Image

    from zspa_kernels import demo

    photo = pytest.importorskip("skimage.data").astronaut()
    model, processor = demo.load(None, "cpu", torch.float32, "tiny")
    model.generation_config.eos_token_id = None  # decode every one of max_new_tokens
    image, text = Image.fromarray(photo), demo.TEMPLATE.format(question=demo.QUESTION)
    gen = dict(max_new_tokens=3, do_sample=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with zspa_kernels.prune(model, keep=16, tokenizer=processor) as handle:
        expected = model.generate(**inputs, **gen)
    expected_selection = handle.last_selection
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    with zspa_kernels.prune(model, keep=16, tokenizer=processor) as handle:
        out = pipe(images=image, text=text, generate_kwargs=gen, return_tensors=True)
    assert [(s.n_tokens, s.kept.shape[0]) for s in handle.last_selection] == [(576, 16)]
    assert torch.equal(handle.last_selection[0].order, expected_selection[0].order)
    assert torch.equal(handle.last_selection[0].prompt_tokens, expected_selection[0].prompt_tokens)
    assert torch.as_tensor(out[0]["generated_token_ids"]).tolist() == expected[0].tolist()


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "mllama"])
@torch.no_grad()
def test_a_compiled_forward_prunes_as_the_eager_one(name):
    """``model.forward = torch.compile(model.forward)``, as served models are: Dynamo traces the hooks
    with the model (breaking its graph at their one host sync), and a pruned generate() picks the
    same tokens and generates the same ids as eager, its logits equal up to the compiled graphs'
    own rounding. Dynamo's ``eager`` backend: what is tested is the tracing, not a code generator."""
    tiny = (BUILDERS.get(name) or CROSS_ATTENTION_BUILDERS[name])()
    inputs = tiny.make_inputs(tiny.batch)
    expected = pruned_generation(tiny.model, inputs, KEEP, max_new_tokens=3)
    torch._dynamo.reset()
    tiny.model.forward = torch.compile(tiny.model.forward, backend="eager")
    got = pruned_generation(tiny.model, inputs, KEEP, max_new_tokens=3)
    assert len(got[1]) == tiny.n_images(tiny.batch)
    assert_same_generation(got, expected, atol=1e-6)


# -- finding 5: every tiny builder gives something to select between ---------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_tiny_builders_make_distinct_visual_tokens(name):
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as calls:
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:  # only to learn the visual ids
        pass
    embeds = calls[0]["inputs_embeds"]
    if handle.family.select_on is not None:  # what the tokens are selected by (Granite 4 Vision)
        embeds = handle.family.select_on(calls[0], embeds)
    tokens = embeds[_visual(inputs, handle)]
    assert tokens.shape[0] > 0
    assert bool((tokens.norm(dim=-1) > 1e-3).all())
    merger = getattr(getattr(getattr(tiny.model, "model", None), "vision_tower", None), "patch_merger", None)
    if hasattr(merger, "image_begin"):  # HunYuan-VL: learned begin, end and row-newline features in every image
        learned = int((inputs["image_grid_thw"][:, 1] // 2 + 2).sum())
        assert tokens.shape[0] - learned + 3 <= torch.unique(tokens, dim=0).shape[0] < tokens.shape[0]
        return
    image_embed = getattr(getattr(getattr(tiny.model, "model", None), "embed_tokens_extend", None), "image_embed", None)
    if image_embed is not None:
        # Phi-4-multimodal: a learned separator ends each row, another parts the two views, and a one-crop
        # image's global view is its crop again (the same pixels): repeats, the rest distinct.
        repeated = torch.unique(tokens, dim=0, return_counts=True)[1]
        assert int((repeated > 1).sum()) >= 2 and repeated.numel() > tokens.shape[0] // 2
        return
    tokenizer = getattr(getattr(tiny.model, "model", None), "vision_tokenizer", None)
    if tokenizer is not None:  # Apertus 1.5: VQ codes embedded by the text table, equal where the codes are
        codes = torch.cat(tiny.model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"]))
        assert torch.equal((tokens[:, None] == tokens[None]).all(-1), codes[:, None] == codes[None])
        assert torch.unique(codes).numel() > codes.numel() // 2
        return
    if tiny.model.config.model_type in ("chameleon", "emu3"):  # VQ codes embedded by the text table, likewise
        images = [inputs["pixel_values"]] + ([inputs["image_sizes"]] if "image_sizes" in inputs else [])
        codes = tiny.model.model.get_image_tokens(*images).flatten()
        assert torch.equal((tokens[:, None] == tokens[None]).all(-1), codes[:, None] == codes[None])
        codes = codes[codes != getattr(tiny.model.model.vocabulary_mapping, "eol_token_id", None)]  # Emu3's
        assert torch.unique(codes).numel() > codes.numel() // 2
        return
    # Distinct, but for learned features repeated: LLaVA-NeXT-style models' newline per row of patches
    # (HY-V4-VL's from its patch merger), DeepSeek-OCR-2's view separator after each image (UnlimitedOCR: both).
    base = getattr(tiny.model, "model", tiny.model)  # Llama 4: no base model
    learned = [getattr(base, "image_newline", None), getattr(base, "view_separator", None),
               getattr(merger, "image_newline", None)]
    repeats = sum(max(int((tokens == f).all(-1).sum()) - 1, 0) for f in learned if f is not None)
    assert torch.unique(tokens, dim=0).shape[0] == tokens.shape[0] - repeats


def test_every_supported_model_type_has_a_tiny_builder_and_a_row_in_the_readme():
    """A family in the table is tested by the shared suite only through a builder of its
    ``model_type`` (where this transformers has the model), and documented in the support matrix."""
    from zspa_kernels.integrations.transformers.families import FAMILIES

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    built = set()
    # But the first: suites of their own.
    for name, build in {**BUILDERS, **CROSS_ATTENTION_BUILDERS, **BLOCK_DIFFUSION_BUILDERS,
                        **ENCODER_DECODER_BUILDERS, **ACTION_EXPERT_BUILDERS}.items():
        built.add(build().model.config.model_type)
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
    for family in FAMILIES:
        for model_type in family.model_types:
            assert f"`{model_type}`" in readme, f"README's support matrix lacks {model_type}"
        if any(t in known for t in family.model_types) and family.refusal() is None:
            assert built & set(family.model_types), f"no tiny builder makes a {family.name} model"


# -- finding 6: left padding -------------------------------------------------------------
def _pad_left(inputs: dict, extra: int) -> dict:
    """Every row padded by ``extra`` more columns (no row is unpadded any more)."""
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            out[key] = torch.nn.functional.pad(inputs[key], (extra, 0))
    return out


@pytest.mark.parametrize("name", ["llava", "gemma3", "qwen2_vl"])
@torch.no_grad()
def test_keep_all_with_every_row_padded_is_bit_exact(name):
    tiny = BUILDERS[name]()
    inputs = _pad_left(tiny.make_inputs(tiny.batch), 3)
    expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=1.0):
        got = tiny.model(**inputs).logits
    attended = inputs["attention_mask"].bool()
    assert got.shape == expected.shape and torch.equal(got[attended], expected[attended])


@pytest.mark.parametrize("name", ["llava", "gemma3", "qwen2_vl"])
@torch.no_grad()
def test_padded_rows_match_the_row_alone_as_closely_as_the_unpatched_model(name):
    """Not bit-exact: a padded row in a batch and the row alone are different shapes, so
    the kernels sum in different orders; the unpatched model itself differs by ~1e-7."""
    tiny = BUILDERS[name]()
    batch = _pad_left(tiny.make_inputs(tiny.batch), 3)
    gen = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for keep in (None, KEEP):
        handle = zspa_kernels.prune(tiny.model, keep=keep) if keep else None
        together = tiny.model.generate(**batch, **gen)
        for r, row in enumerate(tiny.batch):
            alone = tiny.model.generate(**tiny.make_inputs([row], seeds=[r]), **gen)
            assert torch.equal(together.sequences[r, -3:], alone.sequences[0, -3:])
            for a, b in zip(together.logits, alone.logits):
                torch.testing.assert_close(a[r], b[0], atol=PAD_ATOL, rtol=0)
        if handle:
            handle.remove()


@pytest.mark.skipif("ernie4_5_vl_moe" not in BUILDERS, reason="ERNIE-4.5-VL is not in this transformers")
@torch.no_grad()
def test_ernie_moe_token_types_follow_the_kept_positions():
    """ERNIE-4.5-VL's MoE layers send each token to the text or the vision experts by its
    ``moe_mm_token_type_ids``: the language model must get the types of the positions it keeps (a
    kept image token stays vision, its markers too; re-padding is text), or kept image tokens would
    run through the text experts."""
    tiny = BUILDERS["ernie4_5_vl_moe"]()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        tiny.model(**inputs)
        kept = handle.last_kept_positions
    types = inputs["moe_mm_token_type_ids"]
    expected = types.gather(1, kept.clamp_min(0)).masked_fill(kept < 0, 0)
    assert kept.shape[1] < types.shape[1] and (expected == 2).any()
    assert torch.equal(calls[0]["moe_mm_token_type_ids"], expected)


@pytest.mark.skipif("phi4_multimodal" not in BUILDERS, reason="Phi-4-multimodal is not in this transformers")
@torch.no_grad()
def test_phi4_multimodal_prunes_image_tokens_only_and_captures_outputs_as_unpatched():
    """Phi-4-multimodal's decoder embeds the image and audio features itself; the hooks compute those
    embeddings ahead. Its output-capturing hooks are installed as its forward installs them, before the
    vision tower runs (a first pruned call asking for hidden states leaves later calls working, as
    unpatched); every audio token is kept, with the unpatched model's features; only image tokens go."""
    from zspa_kernels.integrations.transformers.tiny import PHI4_AUDIO, PHI4_IMAGE

    tiny = BUILDERS["phi4_multimodal"](capture_hooks=False)
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=KEEP) as handle:
        first = model(**inputs, output_hidden_states=True)
    assert first.hidden_states is not None and first.logits.shape[1] < inputs["input_ids"].shape[1]
    expected = model(**inputs).logits  # would fail had the vision tower's hooks been installed twice
    with capture_lm_calls(model) as full:
        model(**inputs)
    with zspa_kernels.prune(model, keep=1.0):
        assert torch.equal(model(**inputs).logits, expected)
    with zspa_kernels.prune(model, keep=KEEP) as handle, capture_lm_calls(model) as pruned:
        model(**inputs)
    kept = handle.last_kept_positions
    ids = inputs["input_ids"]
    kept_ids = ids.gather(1, kept.clamp_min(0)).masked_fill(kept < 0, -1)
    assert torch.equal((kept_ids == PHI4_AUDIO).sum(1), (ids == PHI4_AUDIO).sum(1)) and (ids == PHI4_AUDIO).any()
    assert int((kept_ids == PHI4_IMAGE).sum()) == KEEP * len(handle.last_selection) < int((ids == PHI4_IMAGE).sum())
    audio = kept_ids == PHI4_AUDIO
    embeds = full[0]["inputs_embeds"]
    original = embeds.gather(1, kept.clamp_min(0)[..., None].expand(-1, -1, embeds.shape[-1]))
    assert torch.equal(pruned[0]["inputs_embeds"][audio], original[audio])
    # Past original_max_position_embeddings its generate() runs the whole sequence again while its cache
    # is shorter, which a pruned cache stays: refused, whether a prompt or such a re-run is that long.
    model.config.original_max_position_embeddings = inputs["input_ids"].shape[1] - 1
    try:
        with zspa_kernels.prune(model, keep=KEEP), pytest.raises(ValueError, match="^input_ids: .*Phi-4"):
            model(**inputs)
    finally:
        model.config.original_max_position_embeddings = 512


@pytest.mark.skipif("nemotron_h_omni" not in BUILDERS, reason="Nemotron-H Omni is not in this transformers")
def test_nemotron_h_omni_with_its_own_video_pruning_is_refused():
    """Nemotron-H Omni's video pruning (EVS) drops video tokens inside the wrapper, after the inputs the
    hooks read: a config that turns it on is refused, before any hook is installed."""
    tiny = BUILDERS["nemotron_h_omni"]()
    tiny.model.config.video_pruning_rate = 0.5
    with pytest.raises(ValueError, match="video_pruning_rate=0.5"):
        zspa_kernels.prune(tiny.model, keep=KEEP)
    assert all(not m._forward_pre_hooks for m in tiny.model.modules())


# Families on 1-D positions whose models take images written back to back by hand, and the tokens their
# tiny inputs write around an image (Kimi-K2.5: also its word and <|media_content|>).
BARE_IMAGES = {"exaone4_5": (), "hyperclovax_vision_v2": (), "kimi_k25": (30, 118)}


@pytest.mark.parametrize("name", list(BARE_IMAGES))
@torch.no_grad()
def test_grid_images_back_to_back_without_markers_are_told_apart_by_their_grids(name):
    """These families' images are one run each between the vision markers their chat templates write.
    Written by hand with nothing between them, two images are one run of image tokens, which the models
    take (prune() ranked them as one image with one budget, ``keep`` tokens for both). With one grid an
    image given (``image_grid_thw``), each grid's tokens cut the run: two selections, each over its own
    image's tokens, with the picks of the same images written with their markers (diversity alone, which
    no prompt text changes). Grids that do not add up to the run are refused, before any selection; so
    are such runs where the config names no merge size. (Qwen2/2.5/3-VL's models fail on such inputs
    themselves: their M-RoPE finds images by their start markers.)"""
    if name not in BUILDERS:
        pytest.skip(f"{name} is not in this transformers release")
    from zspa_kernels.integrations.transformers.tiny import QWEN_END, QWEN_START

    tiny = BUILDERS[name]()
    image_a, image_b = ("image", (4, 8)), ("image", (6, 8))
    marked = tiny.make_inputs([[("text", 3), image_a, image_b, ("text", 4)]])

    def keep_of(inputs):  # no markers
        return ~torch.isin(inputs["input_ids"][0], torch.tensor([QWEN_START, QWEN_END, *BARE_IMAGES[name]]))

    bare = {k: v[:, keep_of(marked)] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
            for k, v in marked.items()}
    counts = [int(g.prod()) // 4 for g in marked["image_grid_thw"]]
    image = (bare["input_ids"][0] == tiny.model.config.image_token_id).nonzero()[:, 0]
    assert image.numel() == sum(counts) and bool((image.diff() == 1).all())  # one run of both images' tokens
    tiny.model(**bare)  # the model takes them
    picks = {}
    for inputs in (marked, bare):
        with zspa_kernels.prune(tiny.model, keep=KEEP, core_ratio=0.0) as handle:
            tiny.model(**inputs)
        assert [s.n_tokens for s in handle.last_selection] == counts
        picks[id(inputs)] = [s.order.tolist() for s in handle.last_selection]
    assert picks[id(bare)] == picks[id(marked)]

    # Three images, the first two back to back, their run 3 tokens short and the third's 3 long: the model
    # takes them (as many image tokens as features), the grids do not cut the runs into images.
    three = tiny.make_inputs([[("text", 3), image_a, image_b, ("text", 2), image_b, ("text", 4)]])
    ids = three["input_ids"][0, keep_of(three)]
    image = (ids == tiny.model.config.image_token_id).nonzero()[:, 0]
    ids[image[counts[0] + counts[1] - 3:counts[0] + counts[1]]] = int(ids[0])
    ids[image[-1] + 1:image[-1] + 4] = tiny.model.config.image_token_id
    shifted = {k: v[:, keep_of(three)] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
               for k, v in three.items()}
    shifted["input_ids"] = ids[None]
    tiny.model(**shifted)  # the model takes them
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        with pytest.raises(ValueError, match=r"^model: 3 images given \(image_grid_thw\) but 2 runs of their tokens, "
                                             r"which their grids do not cut into images"):
            tiny.model(**shifted)


# -- finding 7: a prompt's masks are built once ------------------------------------------
def _counted_mask_builds(monkeypatch) -> list:
    """A list that grows by one at each mask transformers builds (every attention kind's builder)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as builders

    calls = []
    for kind, build in builders._global_mapping.items():
        def counted(*args, _build=build, _kind=kind, **kwargs):
            calls.append(_kind)
            return _build(*args, **kwargs)

        monkeypatch.setitem(builders._local_mapping, kind, counted)
    return calls


@pytest.mark.parametrize("name", [n for n in ("gemma3", "shieldgemma2", "gemma4", "gemma4_unified") if n in BUILDERS])
@pytest.mark.parametrize("keep", [KEEP, 1.0])
@torch.no_grad()
def test_a_pruned_prompt_builds_its_masks_as_often_as_the_unpatched_one(name, keep, monkeypatch):
    """Family.passes_mask_dicts: the base model carries the hooks' placeholder instead of building masks for
    the whole prompt, which the hooks then built again for the pruned one (transformers builds a Gemma's
    image-block masks with torch.vmap: milliseconds of host time a prompt, twice); on a static cache,
    generate() hands it on in place of the masks it builds ahead of every step."""
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(tiny.batch)
    builds = _counted_mask_builds(monkeypatch)

    def run():
        tiny.model(**inputs)
        tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        builds.append("static")
        # generate() builds a static cache's masks ahead of each step (create_masks_for_generate), where the
        # hooks then built them again (a step on the pruned cache: _GenerateMasks).
        tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")

    run()
    unpatched, builds[:] = list(builds), []
    assert len(unpatched) > unpatched.index("static") + 1
    with zspa_kernels.prune(tiny.model, keep=keep) as handle:
        assert handle.family.passes_mask_dicts
        run()
    assert builds == unpatched
    assert "create_masks_for_generate" not in tiny.model.__dict__  # the handle's builder left with it
