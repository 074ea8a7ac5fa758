"""prune() on the layouts that the real processor of Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``), Cosmos3-Omni
(``cosmos3_omni``, Qwen3-VL's classes) and Qwen4-Exp (``qwen4_exp``, Qwen3.5-MoE's classes) writes. None has a
processor module of its own: their checkpoints load ``Qwen3VLProcessor`` (transformers' auto mappings: Qwen2-VL's
image processor, Qwen3-VL's video processor; Cosmos3-Omni's has no processor entry, its image, video processor and
tokenizer entries are Qwen3-VL's), built here offline around a word-level tokenizer holding Qwen's markers and
timestamp words; the models are the tiny builders', rebuilt on this tokenizer's ids. The processor writes an
image as ``<|vision_start|>`` its run of image pads ``<|vision_end|>`` (the template's markers), and a video as
each frame (temporal patch) after its timestamp: ``<0.2 seconds><|vision_start|>`` its video pads
``<|vision_end|>``. Per the family table (README, "Where an image is") each image is a selection and each frame
has its own budget ("yes, per frame"); with ``tokenizer=`` the prompts are exactly the question words (the
timestamps, ordinary words of the real vocabulary, and the markers left out); keep-all logits bit for bit;
generate() (Qwen3.5's gated-DeltaNet layers, Qwen4-Exp's n-gram embeddings and indexed attention) selects with
the same prompts. Not in transformers 4.57: skipped there."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (QWEN_MARKERS, TIMESTAMPS, _image_processor, _photo, _prompts_and_warnings,
                                   _retokenized, _runs_of_both, _token_layout, _tokenizer, _video, _video_inputs)

transformers = pytest.importorskip("transformers")

from zspa_kernels.spec import release  # noqa: E402

FAMILIES = ["qwen3_5", "qwen3_5_moe", "cosmos3_omni", "qwen4_exp"]
CLASSES = dict(qwen3_5="Qwen3_5ForConditionalGeneration", qwen3_5_moe="Qwen3_5MoeForConditionalGeneration",
               cosmos3_omni="Cosmos3OmniForConditionalGeneration", qwen4_exp="Qwen4ExpForConditionalGeneration")
START, END, IMAGE, VIDEO = QWEN_MARKERS
QWEN_IMAGE, QWEN_VIDEO = START + IMAGE + END, START + VIDEO + END
BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
FRAMES = 4  # temporal patches of the video


def _family(family: str):
    """The tiny ``family`` model on this tokenizer's ids and the real Qwen3VLProcessor its checkpoints load:
    the tower's patches (2 px), 2x2 merged, two frames a temporal patch; images of 4 to 64 merged tokens, the
    video's frames 16 tokens each."""
    import torchvision  # noqa: F401  (the video processor needs it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, CLASSES[family]) or family not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {CLASSES[family]}")
    tokenizer = _tokenizer(QWEN_MARKERS, plain=TIMESTAMPS, bos="<|endoftext|>")
    model = _retokenized(family, tokenizer, dict(image_token_id=IMAGE, video_token_id=VIDEO,
                                                 vision_start_token_id=START, vision_end_token_id=END))
    vision = model.config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    side = 8 * patch
    images = dict(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                  size={"shortest_edge": 4 * (patch * merge) ** 2, "longest_edge": 64 * (patch * merge) ** 2})
    videos = dict(images, size={"shortest_edge": images["size"]["shortest_edge"],
                                "longest_edge": FRAMES * temporal * side * side})  # its pixels count all frames
    processor = transformers.Qwen3VLProcessor(
        image_processor=_image_processor("Qwen2VLImageProcessor", **images),
        video_processor=transformers.Qwen3VLVideoProcessor(**videos), tokenizer=tokenizer)
    return model, processor, tokenizer, side


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_and_a_video_in_one_row_frames_are_budgeted_apart_and_timestamps_are_no_question(family):
    """Row 0: a question, then an image; row 1: an image, words, a video of 4 temporal patches, the question.
    Each image is a selection of its run, and so is each frame (``<t seconds><|vision_start|>`` 16 video pads
    ``<|vision_end|>``). With ``tokenizer=`` the prompts are the question words, the timestamps left out (row 1's:
    the words after its image, the video's frames and timestamps between them left out). Without one (the config
    names every marker: no warning) the timestamps between frames are no question either, and the first goes
    where the processor leaves the template's start marker before it (transformers 5.x before 5.25); on 5.25 it
    replaces the template's whole wrapper, and the first timestamp stays."""
    model, processor, tokenizer, side = _family(family)
    inputs, (before, question), words = _video_inputs(
        processor, _video(FRAMES * model.config.vision_config.temporal_patch_size, side, side),
        [(side, side * 3 // 4), (side * 3 // 4, side)], QWEN_IMAGE, QWEN_VIDEO, types=True, do_sample_frames=False,
        return_metadata=True)
    assert int(inputs["video_grid_thw"][0, 0]) == FRAMES
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    per_frame = int(inputs["video_grid_thw"][0, 1:].prod()) // 4
    assert counts == [12, 12] and per_frame == 16
    stamps = ["<0.2", "<1.2", "<2.2", "<3.2"]  # 2 fps, 2 frames a patch: each patch's mean time
    assert [w for w in words if w in TIMESTAMPS and w != "seconds>"] == stamps
    outer = release("transformers")[0] == 5 and release("transformers") < (5, 25)  # the template's start marker stays
    frames = [w for stamp in stamps for w in [stamp, "seconds>", START, f"{VIDEO}*{per_frame}", END]]
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == before + [START, f"{IMAGE}*12", END]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == _layout_of_row_1(question, frames, outer, per_frame)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == (
        [(0, 12), (1, 12)] + [(1, per_frame)] * FRAMES)
    assert all(s.order.numel() == 4 for s in selections)  # each frame its own budget
    assert prompts == [before] + [question] * (1 + FRAMES)
    row_1 = question[:2] + ([] if outer else [stamps[0], "seconds>"]) + question[2:]
    assert untokenized == [before] + [row_1] * (1 + FRAMES)
    assert not warned


def _layout_of_row_1(question, frames, outer, per_frame):
    """Row 1 as :func:`_token_layout` writes it (video pads one by one, runs of image pads counted)."""
    video = [w for f in frames for w in ([VIDEO] * per_frame if f.startswith(VIDEO) else [f])]
    return ([START, f"{IMAGE}*12", END] + question[:2] + ([START] if outer else []) + video
            + ([END] if outer else []) + question[2:])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_a_row_are_budgeted_apart(family):
    """Row 0: two images back to back (the end marker of one, the start marker of the next between their runs),
    then the question; row 1: a question, an image, words, an image. Each image is a selection of its run; the
    prompts are the words after a row's first image (the markers between its images left out), with or without
    ``tokenizer=`` (no warning), in generate() too; keep-all logits bit for bit."""
    model, processor, tokenizer, side = _family(family)
    gen = torch.Generator().manual_seed(1)
    photos = [[_photo(side, side, gen), _photo(side, side // 2, gen)],
              [_photo(side // 2, side, gen), _photo(side, side, gen)]]
    inputs = processor(text=[f"{QWEN_IMAGE} {QWEN_IMAGE} {AFTER}", f"{BEFORE} {QWEN_IMAGE} {BETWEEN} {QWEN_IMAGE}"],
                       images=photos, padding=True, return_tensors="pt", return_mm_token_type_ids=True)
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    wrapped = [[START, f"{IMAGE}*{n}", END] for n in counts]
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == wrapped[0] + wrapped[1] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == BEFORE.split() + wrapped[2] + BETWEEN.split() + wrapped[3]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (0, counts[1]), (1, counts[2]), (1, counts[3])]
    assert prompts == untokenized == [AFTER.split()] * 2 + [BETWEEN.split()] * 2
    assert not warned
