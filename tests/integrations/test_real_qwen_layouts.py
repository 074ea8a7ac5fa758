"""prune() on the layouts that the real processors of three families with Qwen2-VL's token layout write
(``Exaone4_5_Processor``, which EXAONE 4.5 and LLaVA-OneVision-1.5 both load, and ``Ovis2_5Processor``), built
offline around a word-level tokenizer holding their markers; the models are the tiny builders', rebuilt on this
tokenizer's ids. EXAONE 4.5's and LLaVA-OneVision-1.5's processor replaces each image or video placeholder by
its run of pad tokens alone (the chat template writes ``<|vision_start|>`` and ``<|vision_end|>`` around it);
Ovis2.5's writes its own start and end markers around each run (an image's, a video's). Per the family table
(README, "Where an image is") each image is a selection and so is each video, all its frames one run of tokens.
An image and a video in one row, two images in a row, a batch of two rows; with ``tokenizer=`` the prompts are
exactly the question words; the configs name every marker (EXAONE 4.5's checkpoints give
``vision_start_token_id``/``vision_end_token_id`` beside the fields of its config class, as the tiny builder
does), so without one they are the same and prune() does not warn."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (
    _image_processor,
    _photo,
    _prompts_and_warnings,
    _retokenized,
    _runs_of_both,
    _token_layout,
    _tokenizer,
    _video,
    _video_inputs,
)

transformers = pytest.importorskip("transformers")

QWEN_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE, QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
# Ovis2.5's boundary markers (as transformers' own Ovis2.5 processor tests name them). Later releases write one
# placeholder for images and videos (``<ovis_visual_atom>``, one id), which 5.25's processor, counting it as both,
# cannot take.
OVIS_BOUNDARIES = dict(image_start_token="<ovis_image_start>", image_end_token="<ovis_image_end>",
                       video_start_token="<ovis_video_start>", video_end_token="<ovis_video_end>")
BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
FAMILIES = ["exaone4_5", "llava_onevision1_5", "ovis2_5"]
CLASSES = dict(exaone4_5="Exaone4_5_ForConditionalGeneration",
               llava_onevision1_5="LlavaOnevision15ForConditionalGeneration",
               ovis2_5="Ovis2_5ForConditionalGeneration")


def _family(family: str):
    """The tiny ``family`` model on this tokenizer's ids and its real processor classes: the tower's patches
    (2 px), 2x2 merged, 4 to 16 tokens an image or frame group; LLaVA-OneVision-1.5's RiceViT takes no temporal
    patches (one frame a group), EXAONE 4.5's takes two frames a patch, Ovis2.5's one."""
    import torchvision  # noqa: F401  (the video processors need it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, CLASSES[family]) or family not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {CLASSES[family]}")
    if family == "ovis2_5":
        image, video = "<|image_pad|>", "<|video_pad|>"  # its config's default ids: Qwen's pads
        markers = [image, video, *OVIS_BOUNDARIES.values()]
        tokenizer = _tokenizer(markers, plain=["\n"], bos="<|endoftext|>", image_token=image, video_token=video,
                               **OVIS_BOUNDARIES)
        ids = dict(image_token_id=image, video_token_id=video,
                   **{f"{name}_id": token for name, token in OVIS_BOUNDARIES.items()})
        processor_class, images_class, videos_class = "Ovis2_5Processor", "Ovis2_5ImageProcessor", "Ovis2_5VideoProcessor"
    else:
        tokenizer = _tokenizer(QWEN_MARKERS, plain=["\n"], bos="<|endoftext|>")
        ids = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
        processor_class, images_class, videos_class = "Exaone4_5_Processor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"
    model = _retokenized(family, tokenizer, ids)
    assert all(getattr(model.config, name) == tokenizer.convert_tokens_to_ids(token) for name, token in ids.items())
    vision = model.config.vision_config
    frames = {"exaone4_5": vision.temporal_patch_size, "llava_onevision1_5": 1, "ovis2_5": 1}[family]
    sizes = dict(patch_size=vision.patch_size, merge_size=2, temporal_patch_size=frames,
                 size={"shortest_edge": 16 * vision.patch_size ** 2, "longest_edge": 64 * vision.patch_size ** 2})
    processor = getattr(transformers, processor_class)(
        image_processor=_image_processor(images_class, **sizes), video_processor=getattr(transformers, videos_class)(**sizes),
        tokenizer=tokenizer)
    return model, processor, tokenizer, frames


def _placeholders(family: str, processor) -> tuple[str, str]:
    """What a caller (the chat template) writes for an image and a video: EXAONE 4.5's and LLaVA-OneVision-1.5's
    templates the pad token between vision markers, Ovis2.5's the placeholder alone (its processor adds the rest)."""
    if family == "ovis2_5":
        return processor.image_token, processor.video_token
    return QWEN_IMAGE, QWEN_VIDEO


def _wrapped(family: str, kind: str, n: int, pad: str) -> list[str]:
    """An image's or video's tokens as the row holds them (:func:`_token_layout`'s notation for images)."""
    if family == "ovis2_5":
        start, end = OVIS_BOUNDARIES[f"{kind}_start_token"], OVIS_BOUNDARIES[f"{kind}_end_token"]
    else:
        start, end = QWEN_MARKERS[:2]
    return [start, *([f"{pad}*{n}"] if kind == "image" else [pad] * n), end]


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_a_video_in_one_row_are_budgeted_whole(family):
    """Row 0: a question, then an image; row 1: an image, words, a video, the question. The processor writes
    each image as one run of ``t*h*w/4`` image pads and the video as one run of ``t*h*w/4`` video pads over all its
    frames (no timestamp, no marker between frames), each between the markers (the template's, or Ovis2.5's own):
    a selection each, of the run's tokens, in generate() too; keep-all logits bit for bit. With ``tokenizer=`` the
    prompts are the question words (row 0's from before its image, row 1's the words after its first image, the
    video's markers left out); without one the same (the configs name every marker), and prune() does not warn."""
    model, processor, tokenizer, frames = _family(family)
    image, video = _placeholders(family, processor)
    side = 8 * model.config.vision_config.patch_size
    inputs, (before, question), _ = _video_inputs(processor, _video(4, side, side), [(side, side * 3 // 4),
                                                                                    (side * 3 // 4, side)],
                                                  image, video, do_sample_frames=False)
    counts = [int(g.prod()) // 4 for g in (*inputs["image_grid_thw"], *inputs["video_grid_thw"])]
    assert inputs["video_grid_thw"][0, 0] == 4 // frames and counts == [12, 12, 16 * 4 // frames]
    pad, video_pad = tokenizer.convert_ids_to_tokens([model.config.image_token_id, model.config.video_token_id])
    assert _token_layout(tokenizer, inputs, 0, pad) == before + _wrapped(family, "image", counts[0], pad)
    assert _token_layout(tokenizer, inputs, 1, pad) == (_wrapped(family, "image", counts[1], pad) + question[:2]
                                                        + _wrapped(family, "video", counts[2], video_pad) + question[2:])
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs_of_both(inputs, model)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, counts[0]), (1, counts[1]), (1, counts[2])]
    assert prompts == untokenized == [before, question, question]
    assert not warned


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_a_row_are_budgeted_apart(family):
    """Row 0: two images back to back (the end marker of one, the start marker of the next between their runs),
    then the question; row 1: a question, an image, words, an image. Each image is a selection of its run; the
    prompts are the words after a row's first image (the markers between its images left out), with or without
    ``tokenizer=``, in generate() too; keep-all logits bit for bit."""
    model, processor, tokenizer, _ = _family(family)
    image, _ = _placeholders(family, processor)
    gen = torch.Generator().manual_seed(1)
    side = 8 * model.config.vision_config.patch_size
    photos = [[_photo(side, side, gen), _photo(side, side // 2, gen)], [_photo(side // 2, side, gen), _photo(side, side, gen)]]
    inputs = processor(text=[f"{image} {image} {AFTER}", f"{BEFORE} {image} {BETWEEN} {image}"], images=photos,
                       padding=True, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    pad = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    wrapped = [_wrapped(family, "image", n, pad) for n in counts]
    assert _token_layout(tokenizer, inputs, 0, pad) == wrapped[0] + wrapped[1] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 1, pad) == BEFORE.split() + wrapped[2] + BETWEEN.split() + wrapped[3]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [
        (0, counts[0]), (0, counts[1]), (1, counts[2]), (1, counts[3])]
    assert prompts == untokenized == [AFTER.split()] * 2 + [BETWEEN.split()] * 2
    assert not warned



def test_exaone4_5_without_the_vision_markers_ids_prune_warns_of_them():
    """EXAONE 4.5's config class holds the pads' ids alone; a checkpoint whose config does not give
    ``vision_start_token_id``/``vision_end_token_id`` beside them leaves the markers its chat template writes around
    every image named by the tokenizer only. Without ``tokenizer=`` they count as question text (row 0's question,
    written before its image, is ranked by ``<|vision_end|>`` alone), so prune() warns, as for every family whose
    processors write markers no config names; with it the prompts are the question words and nothing warns."""
    model, processor, tokenizer, _ = _family("exaone4_5")
    for name in ("vision_start_token_id", "vision_end_token_id"):
        setattr(model.config, name, None)
    gen = torch.Generator().manual_seed(2)
    side = 8 * model.config.vision_config.patch_size
    inputs = processor(text=[f"{BEFORE} {QWEN_IMAGE}", f"{QWEN_IMAGE} {BETWEEN} {QWEN_IMAGE} {AFTER}"], padding=True,
                       images=[[_photo(side, side, gen)], [_photo(side, side // 2, gen), _photo(side // 2, side, gen)]],
                       return_tensors="pt")
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    row_1 = ["<|vision_end|>", *BETWEEN.split(), "<|vision_start|>", "<|vision_end|>", *AFTER.split()]
    assert prompts == [BEFORE.split(), (BETWEEN + " " + AFTER).split(), (BETWEEN + " " + AFTER).split()]
    assert untokenized == [["<|vision_end|>"], row_1, row_1]
    assert len(warned) == 1 and "EXAONE 4.5" in warned[0] and "tokenizer=processor" in warned[0]
