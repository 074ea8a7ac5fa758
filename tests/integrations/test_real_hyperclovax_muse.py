"""prune() on the layouts that the real processors of HyperCLOVAX-SEED vision v2 (``HyperCLOVAXVisionV2Processor``)
and Muse Spark (``MuseSparkProcessor``) write, built offline around a word-level tokenizer holding their markers; the
models are the tiny builders', rebuilt on this tokenizer's ids. Both classes are in transformers 5.24 and 5.25 only.

HyperCLOVAX's processor replaces each image or video placeholder by its run of pad tokens alone (a video's frames one
run, no timestamp, no marker between frames); its chat template writes ``<|vision_start|>``/``<|vision_end|>`` around
it, and ``<|video_duration|>`` where the processor writes the video's duration in seconds (a number: a word). Per the
family table (README, "Where an image is") each image is a selection and so is each video.

Muse Spark's processor (Muse Glimmer's layout) writes an image as ``<|image_start|>`` its tokens ``<|image_end|>`` and a
video as ``<|vid_start|>Time: 0.0s`` its first temporal group's tokens, then ``<|vid_frame_separator|>Time: 1.0s`` and
the next group's, ..., ``<|vid_end|>``: every image and every temporal group a selection; no config names a marker
(``unnamed_markers``), so prune() warns without a tokenizer."""
from __future__ import annotations

import warnings

import pytest
import torch

import zspa_kernels

from .test_real_processors import (MUSE_MARKERS, TIMES, _image_processor, _photo, _prompts_and_warnings, _retokenized,
                                   _runs_of_both, _token_layout, _tokenizer, _video, _video_inputs)

transformers = pytest.importorskip("transformers")

BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
# HyperCLOVAX checkpoints' tokenizers name their pads (``image_token``/``video_token``), upper-case.
HCX_PADS = dict(image_token="<|IMAGE_PAD|>", video_token="<|VIDEO_PAD|>")
HCX_MARKERS = ["<|vision_start|>", "<|vision_end|>", *HCX_PADS.values()]
HCX_IMAGE, HCX_VIDEO = "<|vision_start|><|IMAGE_PAD|><|vision_end|>", "<|vision_start|><|VIDEO_PAD|><|vision_end|>"
# The durations the processor writes for <|video_duration|> (json: "2.0"): ordinary words of the real tokenizer.
DURATIONS = [f"{t / 2:.1f}" for t in range(20)]
MUSE_AUDIO_MARKERS = ["<|audio|>", "<|soft_audio_start|>", "<|soft_audio_end|>"]


def _hyperclovax(named_markers: bool = True):
    """A tiny random HyperCLOVAX vision v2 on this tokenizer's ids with the real processor classes (2 px patches of
    two frames, 2x2 merged). ``named_markers``: the config names the template's vision start/end markers
    (``vision_start_token_id``/``vision_end_token_id``, as the tiny builder's does); else only the fields of its
    config class, the pads' ids (as the ``tiny-hcx-model`` checkpoint's config.json)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "HyperCLOVAXVisionV2Processor") or "hyperclovax_vision_v2" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no HyperCLOVAX vision v2")
    tokenizer = _tokenizer(HCX_MARKERS, plain=DURATIONS, bos="<|endoftext|>", **HCX_PADS)
    ids = dict(image_token_id=HCX_PADS["image_token"], video_token_id=HCX_PADS["video_token"])
    if named_markers:
        ids.update(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    model = _retokenized("hyperclovax_vision_v2", tokenizer, ids)
    if not named_markers:
        for name in ("vision_start_token_id", "vision_end_token_id"):
            delattr(model.config, name)  # the builder's: no field of the config class
    assert {k for k in model.config.to_dict() if k.endswith("_token_id")} == set(ids)
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2,
                 size={"shortest_edge": 16 * 4, "longest_edge": 64 * 4})
    processor = transformers.HyperCLOVAXVisionV2Processor(
        image_processor=_image_processor("Qwen2VLImageProcessor", **sizes),
        video_processor=transformers.Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer)
    assert (processor.image_token_id, processor.video_token_id) == (model.config.image_token_id,
                                                                     model.config.video_token_id)
    return model, processor, tokenizer


def _wrapped(pad: str, n: int, video: bool = False) -> list[str]:
    return ["<|vision_start|>", *([pad] * n if video else [f"{pad}*{n}"]), "<|vision_end|>"]


def test_hyperclovax_images_and_a_video_in_one_row_are_budgeted_whole():
    """Row 0: a question, then an image; row 1: an image of another size, words, a video, the question. The processor
    writes each image as one run of ``h*w/4`` pads and the video as one run over all its frames (two frames a
    temporal patch): a selection each, of exactly the run's tokens, in generate() too; keep-all logits bit for bit.
    With ``tokenizer=`` the prompts are the question words; the config names the markers, so without one the same,
    and prune() does not warn."""
    model, processor, tokenizer = _hyperclovax()
    inputs, (before, question), _ = _video_inputs(processor, _video(4, 16, 16), [(16, 12), (12, 20)], HCX_IMAGE,
                                                  HCX_VIDEO, do_sample_frames=False)
    counts = [int(g.prod()) // 4 for g in (*inputs["image_grid_thw"], *inputs["video_grid_thw"])]
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]] and counts == [12, 15, 32]
    pad, video_pad = HCX_PADS["image_token"], HCX_PADS["video_token"]
    assert _token_layout(tokenizer, inputs, 0, pad) == before + _wrapped(pad, counts[0])
    assert _token_layout(tokenizer, inputs, 1, pad) == (_wrapped(pad, counts[1]) + question[:2]
                                                        + _wrapped(video_pad, counts[2], video=True) + question[2:])
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (1, counts[1]), (1, counts[2])]
    assert prompts == untokenized == [before, question, question]
    assert not warned


def test_hyperclovax_two_images_in_a_row_and_a_video_alone_are_budgeted_apart():
    """Row 0: two images back to back (the end marker of one, the start marker of the next between their runs), then
    the question; row 1: a question, an image, words, an image; then a row of a video alone. Each image and the video
    is a selection of its run; the prompts are the words after a row's first image (the question before it where
    nothing follows), with or without ``tokenizer=``; keep-all bit for bit, generate() the same."""
    model, processor, tokenizer = _hyperclovax()
    gen = torch.Generator().manual_seed(1)
    photos = [[_photo(16, 16, gen), _photo(16, 8, gen)], [_photo(8, 24, gen), _photo(12, 20, gen)]]
    inputs = processor(text=[f"{HCX_IMAGE} {HCX_IMAGE} {AFTER}", f"{BEFORE} {HCX_IMAGE} {BETWEEN} {HCX_IMAGE}"],
                       images=photos, padding=True, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert len(set(counts)) == 4
    pad = HCX_PADS["image_token"]
    assert _token_layout(tokenizer, inputs, 0, pad) == (_wrapped(pad, counts[0]) + _wrapped(pad, counts[1])
                                                        + AFTER.split())
    assert _token_layout(tokenizer, inputs, 1, pad) == (BEFORE.split() + _wrapped(pad, counts[2]) + BETWEEN.split()
                                                        + _wrapped(pad, counts[3]))
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (0, counts[1]), (1, counts[2]), (1, counts[3])]
    assert prompts == untokenized == [AFTER.split()] * 2 + [BETWEEN.split()] * 2
    assert not warned

    video = processor(text=[f"{BEFORE} {HCX_VIDEO}"], videos=[_video(6, 16, 24)], return_tensors="pt",
                      videos_kwargs=dict(do_sample_frames=False))
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, video, processor, tokenizer)
    n = int(video["video_grid_thw"][0].prod()) // 4
    assert video["video_grid_thw"].tolist() == [[3, 6, 8]]
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, n)]
    assert prompts == untokenized == [BEFORE.split()] and not warned


def test_hyperclovax_video_duration_is_a_word_of_the_question():
    """Where the chat template leaves ``<|video_duration|>`` (a video block without ``video_duration``), the
    processor writes the video's duration there, ``json.dumps`` of its seconds (``2.0``): a word of the real
    tokenizer, not a marker. Like any text a template writes in words (README: template words stay), it is a word
    of the question, with a tokenizer or without: the known limit "HyperCLOVAX template sentences are words"."""
    model, processor, tokenizer = _hyperclovax()
    inputs, (before, question), words = _video_inputs(processor, _video(4, 16, 16), [(16, 12), (12, 20)], HCX_IMAGE,
                                                      f"{HCX_VIDEO} <|video_duration|>", fps=2, do_sample_frames=False)
    assert "2.0" in words and "<|video_duration|>" not in words  # 4 frames at 2 fps, as text
    selections, prompts, untokenized, _ = _prompts_and_warnings(model, inputs, processor, tokenizer)
    row_1 = question[:2] + ["2.0"] + question[2:]
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert prompts == untokenized == [before, row_1, row_1]


def test_hyperclovax_without_named_markers_prune_warns_of_its_end_marker():
    """The config class of HyperCLOVAX vision v2 names the pads alone (``image_token_id``, ``video_token_id``), and
    checkpoints' configs may give nothing more (``tiny-hcx-model``'s does not): then the ``<|vision_start|>`` and
    ``<|vision_end|>`` the chat template writes around every image and video are named by the tokenizer only. With
    ``tokenizer=`` the prompts are the question words; without one the markers count as question text, and a
    question written before its image was ranked by ``<|vision_end|>`` alone, so prune() must warn, as it does for
    the families flagged ``unnamed_markers``."""
    model, processor, tokenizer = _hyperclovax(named_markers=False)
    inputs, (before, question), _ = _video_inputs(processor, _video(4, 16, 16), [(16, 12), (12, 20)], HCX_IMAGE,
                                                  HCX_VIDEO, do_sample_frames=False)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert prompts == [before, question, question]
    row_1 = ["<|vision_end|>", *question[:2], "<|vision_start|>", "<|vision_end|>", *question[2:]]
    assert untokenized == [["<|vision_end|>"], row_1, row_1]
    assert len(warned) == 1 and "HyperCLOVAX vision v2" in warned[0] and "tokenizer=processor" in warned[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the processor: nothing to warn of
        zspa_kernels.prune(model, keep=4, tokenizer=processor)


def _muse_spark():
    """A tiny random Muse Spark on this tokenizer's ids with the real processor classes (Muse Glimmer's image and
    video processors, as its checkpoints load them: 2 px patches of 2 frames, 2x2 merged; its audio feature
    extractor)."""
    import torchvision  # noqa: F401  (its image and video processors need it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "MuseSparkProcessor") or "muse_spark" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Muse Spark")
    tokenizer = _tokenizer(MUSE_MARKERS + MUSE_AUDIO_MARKERS, plain=TIMES, bos="<|begin_of_text|>")
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = transformers.MuseSparkProcessor(
        image_processor=transformers.MuseGlimmerImageProcessor(max_image_tokens=16, **sizes),
        video_processor=transformers.MuseGlimmerVideoProcessor(max_video_frame_tokens=16, **sizes), tokenizer=tokenizer,
        feature_extractor=transformers.MuseSparkFeatureExtractor(samples_per_token=4))
    model = _retokenized("muse_spark", tokenizer, dict(image_token_id="<|patch|>", video_token_id="<|video|>",
                                                       audio_token_id="<|audio|>"))
    assert (processor.image_token_id, processor.video_token_id) == (model.config.image_token_id,
                                                                     model.config.video_token_id)
    return model, processor, tokenizer


def _muse_video(n: int, groups: list[str]) -> list[str]:
    """A Muse video's tokens as the row holds them: each temporal group after its timestamp, ``n`` tokens each."""
    out = ["<|vid_start|>"]
    for g, time in enumerate(groups):
        end = "<|vid_frame_separator|>" if g < len(groups) - 1 else "<|vid_end|>"
        out += ["Time:", time] + ["<|video|>"] * n + [end]
    return out


def test_muse_spark_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """Row 0: a question, then an image; row 1: an image of another size, words, a video of 6 frames (3 temporal
    groups), the question. Each image and each temporal group is a selection of exactly its run, in generate() too;
    keep-all bit for bit. With ``tokenizer=`` the prompts are the question words (the markers, the separators and
    the timestamps left out). Without one prune() warns (``unnamed_markers``), and the markers no config names and
    the first group's timestamp count as question text: row 0's question gave way to ``<|image_end|>`` alone."""
    model, processor, tokenizer = _muse_spark()
    frames = 6
    inputs, (before, question), _ = _video_inputs(processor, _video(frames, 16, 24), [(16, 12), (12, 20)],
                                                  do_sample_frames=False, return_metadata=True)
    groups = int(inputs["video_grid_thw"][0, 0])
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    per_group = int(inputs["video_grid_thw"][0, 1:].prod()) // 4
    assert groups == frames // 2 and len(set(counts)) == 2
    image = lambda n: ["<|image_start|>", f"<|patch|>*{n}", "<|image_end|>"]  # noqa: E731
    assert _token_layout(tokenizer, inputs, 0, "<|patch|>") == before + image(counts[0])
    assert _token_layout(tokenizer, inputs, 1, "<|patch|>") == (image(counts[1]) + question[:2]
                                                               + _muse_video(per_group, ["0.0s", "1.0s", "2.0s"])
                                                               + question[2:])
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (1, counts[1])] + [(1, per_group)] * groups
    assert prompts == [before] + [question] * (1 + groups)
    row_1 = ["<|image_end|>", *question[:2], "<|vid_start|>", "Time:", "0.0s", "<|vid_end|>", *question[2:]]
    assert untokenized == [["<|image_end|>"]] + [row_1] * (1 + groups)
    assert len(warned) == 1 and "Muse Spark" in warned[0] and "tokenizer=processor" in warned[0]


def test_muse_spark_two_images_in_a_row_and_a_video_alone_are_budgeted_apart():
    """Row 0: two images back to back, then the question; row 1: a question, an image, words, an image (four sizes);
    then a row of a video alone after its question. Each image and each temporal group is a selection; with
    ``tokenizer=`` the prompts are the words after a row's first image (the question before it where nothing
    follows), the markers between images and the timestamps left out; keep-all bit for bit, generate() the same."""
    model, processor, tokenizer = _muse_spark()
    gen = torch.Generator().manual_seed(1)
    photos = [[_photo(16, 16, gen), _photo(16, 8, gen)], [_photo(8, 24, gen), _photo(12, 20, gen)]]
    image = processor.image_token
    inputs = processor(text=[f"{image} {image} {AFTER}", f"{BEFORE} {image} {BETWEEN} {image}"], images=photos,
                       padding=True, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert len(set(counts)) == 4
    wrapped = [["<|image_start|>", f"<|patch|>*{n}", "<|image_end|>"] for n in counts]
    assert _token_layout(tokenizer, inputs, 0, "<|patch|>") == wrapped[0] + wrapped[1] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 1, "<|patch|>") == (BEFORE.split() + wrapped[2] + BETWEEN.split()
                                                               + wrapped[3])
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (0, counts[1]), (1, counts[2]), (1, counts[3])]
    assert prompts == [AFTER.split()] * 2 + [BETWEEN.split()] * 2
    # Without a tokenizer (it warns), the markers after a row's first image are question text too.
    assert untokenized == [["<|image_end|>", "<|image_start|>", "<|image_end|>", *AFTER.split()]] * 2 + [
        ["<|image_end|>", *BETWEEN.split(), "<|image_start|>", "<|image_end|>"]] * 2
    assert len(warned) == 1

    from transformers.video_utils import VideoMetadata

    video = processor(text=[f"{BEFORE} {processor.video_token}"], videos=[_video(4, 16, 16)], return_tensors="pt",
                      videos_kwargs=dict(do_sample_frames=False, return_metadata=True, video_metadata=[
                          VideoMetadata(total_num_frames=4, fps=2, frames_indices=list(range(4)))]))
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, video, processor, tokenizer)
    n = int(video["video_grid_thw"][0, 1:].prod()) // 4
    assert video["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(video, model) == [(0, n)] * 2
    assert prompts == [BEFORE.split()] * 2 and len(warned) == 1
