"""prune() on the token layouts that transformers' own PerceptionLM and Ovis2 processors write (the real
classes, built offline around a word-level tokenizer holding each family's markers; the tiny builders'
models with this tokenizer's ids in their configs). PerceptionLM: an image's thumbnail and tiles, and a
video's frames, each one run of tokens without a marker, an image and a video in one batch. Ovis2: an image's
global view and its tiles (crops of a grid) between visual indicator markers its config names, two images
back to back in a row."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (  # noqa: E402
    _photo, _prompts_and_warnings, _runs, _runs_of_both, _tokenizer, _video, _video_inputs)


def _rebuilt(builder: str, tokenizer, ids: dict):
    """The tiny ``builder``'s model (zspa_kernels.integrations.transformers.tiny), rebuilt with its config's
    token ids set to ``tokenizer``'s ids of the tokens ``ids`` names (lists too) and its pad id. Its config
    is copied as an object: PerceptionLM's config on transformers 4.57 and 5.17 turns a vision config given
    as a dict into a timm tower's (no timm here), where the tiny builder's is a CLIP tower. Its vocabulary is
    kept (it holds the tokenizer's ids): Ovis2's head reads the top-level ``vocab_size``, its embeddings the text
    config's, and generate() would pick ids past a text vocabulary cut to the tokenizer's."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    tiny = BUILDERS[builder]().model
    config = copy.deepcopy(tiny.config)
    assert len(tokenizer) <= config.text_config.vocab_size  # the builder's vocabulary holds the tokenizer's ids
    for name, token in ids.items():
        setattr(config, name, tokenizer.convert_tokens_to_ids(token))
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    return type(tiny)(config).eval()


def _layout(tokenizer, ids, *visual: str) -> str:
    """The row's tokens without padding or blanks, each run of one of ``visual`` written ``<token*n>``."""
    text = tokenizer.decode(ids).replace(" ", "").replace(tokenizer.pad_token, "")
    pattern = "|".join(f"(?:{re.escape(v)})+" for v in visual)
    return re.sub(pattern, lambda m: next(f"<{v}*{len(m.group(0)) // len(v)}>" for v in visual
                                          if m.group(0).startswith(v)), text)


PLM_IMAGE, PLM_VIDEO = "<|image|>", "<|video|>"


def _perception_lm():
    """A tiny random PerceptionLM (the tiny builder's: a CLIP tower on 32 px crops of 4 px patches, pooled 2x2:
    16 tokens a crop) with the real processor classes: 32 px tiles, at most 4, and 32 px video frames; the
    thumbnail and tiles as the checkpoints' image processor config asks (4.57's class defaults to one tile)."""
    import torchvision  # noqa: F401  (its image and video processors need it: an error here, not a skip)

    tokenizer = _tokenizer([PLM_IMAGE, PLM_VIDEO], plain=["\n"], bos="<|begin_of_text|>", image_token=PLM_IMAGE,
                           video_token=PLM_VIDEO)
    images = getattr(transformers, "PerceptionLMImageProcessor", None) or transformers.PerceptionLMImageProcessorFast
    processor = transformers.PerceptionLMProcessor(
        image_processor=images(vision_input_type="thumb+tile", tile_size=32, max_num_tiles=4),  # 4.57's default: None
        video_processor=transformers.PerceptionLMVideoProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=4, pooling_ratio=2)
    model = _rebuilt("perception_lm", tokenizer, dict(image_token_id=PLM_IMAGE, video_token_id=PLM_VIDEO))
    return model, processor, tokenizer


def test_perception_lm_tiles_and_frames_are_budgeted_apart():
    """PerceptionLM's processor writes an image as one run of ``<|image|>`` tokens, 16 for each of its crops (the
    thumbnail, then its tiles: a 2:1 image is 2x1 tiles and the thumbnail, 3 crops), and a video as one run of
    ``<|video|>`` tokens, 16 a frame; nothing else, no marker, no newline. Every crop and every frame is a
    selection (the family's ``_per_tile``: the tokens shared out over the crops of ``pixel_values``, ``(images,
    crops, ...)``, and the frames of ``pixel_values_videos``), keep-all logits bit for bit. There is no text
    but the question, so the prompts are exactly its words with or without a tokenizer (before the image in
    row 0; in row 1 the words between the image and the video, and after it), the same in generate(); the
    family writes no marker its config does not name, so prune() does not warn."""
    model, processor, tokenizer = _perception_lm()
    frames = 4
    inputs, (before, question), _ = _video_inputs(processor, _video(frames, 48, 48), [(32, 64), (40, 80)], fps=None,
                                                  do_sample_frames=False)
    crops = 1 + 2  # the thumbnail and 2x1 tiles, for both images (a call's images have as many crops)
    assert tuple(inputs["pixel_values"].shape[:2]) == (2, crops)
    assert tuple(inputs["pixel_values_videos"].shape[:2]) == (1, frames)
    assert _layout(tokenizer, inputs["input_ids"][0], PLM_IMAGE, PLM_VIDEO).endswith(
        f"w44w39w53w0<{PLM_IMAGE}*48>")
    assert _layout(tokenizer, inputs["input_ids"][1], PLM_IMAGE, PLM_VIDEO) == (
        f"<{PLM_IMAGE}*48>w5w6<{PLM_VIDEO}*64>w43w39w7")
    assert _runs_of_both(inputs, model) == [(0, 16 * crops), (1, 16 * crops), (1, 16 * frames)]

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * crops + [(1, 16)] * (crops + frames)
    assert all(s.order.numel() == 4 for s in selections)  # each crop and frame its own budget
    assert prompts == untokenized == [before] * crops + [question] * (crops + frames)
    assert not warned


def test_perception_lm_media_back_to_back_are_budgeted_by_crop():
    """Two images written back to back (``<|image|><|image|>``) are one run of image tokens, 16 for each crop of
    each, and a video right before them (row 0) or after the question (row 1) one run of video tokens: every
    crop and frame is still a selection (3 crops an image, from ``pixel_values``; 2 frames a video, from
    ``pixel_values_videos``), in the order they stand, and nothing but the question is text, before the
    media or between them, with or without a tokenizer."""
    model, processor, tokenizer = _perception_lm()
    gen = torch.Generator().manual_seed(1)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    photos = [[_photo(64, 32, gen), _photo(64, 32, gen)], [_photo(64, 32, gen), _photo(64, 32, gen)]]
    text = [f"{before} {PLM_VIDEO}{PLM_IMAGE}{PLM_IMAGE}", f"{PLM_IMAGE}{PLM_IMAGE} {after} {PLM_VIDEO}"]
    inputs = processor(text=text,
                       images=photos, videos=[_video(2, 32, 32), _video(2, 40, 40)], padding=True, return_tensors="pt",
                       videos_kwargs=dict(do_sample_frames=False))
    assert tuple(inputs["pixel_values"].shape[:2]) == (4, 3)  # the thumbnail and 1x2 tiles, each image
    assert tuple(inputs["pixel_values_videos"].shape[:2]) == (2, 2)
    assert _layout(tokenizer, inputs["input_ids"][0], PLM_IMAGE, PLM_VIDEO).endswith(
        f"w44w39w53w0<{PLM_VIDEO}*32><{PLM_IMAGE}*96>")
    assert _layout(tokenizer, inputs["input_ids"][1], PLM_IMAGE, PLM_VIDEO) == (
        f"<{PLM_IMAGE}*96>w43w39w7<{PLM_VIDEO}*32>")
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * (2 + 6) + [(1, 16)] * (6 + 2)
    assert prompts == untokenized == [before.split()] * 8 + [after.split()] * 8
    assert not warned


OVIS2_INDICATORS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def _ovis2():
    """A tiny random Ovis2 (the tiny builder's: 32 px crops of 4 px patches, merged 2x2: 16 tokens a crop) with
    the real processor classes: 32 px tiles, at most 4 (``crop_to_patches``), 16 image tokens a crop. The
    checkpoints' tokenizer holds ``<IMG_ATOM>`` (the config's ``image_token_id``) and the five visual indicator
    markers (its ``visual_indicator_token_ids``) as added tokens; the processor's placeholder is ``<image>``."""
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes Qwen2's tokenizer class only
    tokenizer = _tokenizer(["<image>", "<IMG_ATOM>", *OVIS2_INDICATORS], plain=["\n"], bos="<|endoftext|>",
                           cls=transformers.Qwen2TokenizerFast if v4 else None)
    images = getattr(transformers, "Ovis2ImageProcessorPil", None) or transformers.Ovis2ImageProcessor
    processor = transformers.Ovis2Processor(
        image_processor=images(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4),
        tokenizer=tokenizer, image_seq_length=16)
    model = _rebuilt("ovis2", tokenizer, dict(image_token_id="<IMG_ATOM>", visual_indicator_token_ids=OVIS2_INDICATORS))
    return model, processor, tokenizer


def test_ovis2_crops_are_budgeted_apart_and_its_markers_are_no_question():
    """Ovis2's processor writes an image as ``<IMG_START>``, the global view's 16 ``<IMG_ATOM>`` tokens,
    ``<IMG_GRID>``, then (for more than one tile) the tiles row by row, ``<IMG_COL>`` between the tiles of a row
    and ``<IMG_ROW>`` between rows, then ``<IMG_END>``; a row's images back to back. Each crop (view or tile) is
    a run of its own and a selection of its own, keep-all bit for bit. Its config names the markers
    (``visual_indicator_token_ids``, embedded from the visual table), so they are no question text with or
    without a tokenizer: the prompts are the question words, before the image or after two (also in
    generate()), and prune() does not warn."""
    model, processor, tokenizer = _ovis2()
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"{before} <image>", f"<image><image> {after}"],
                       images=[[_photo(32, 64, gen)], [_photo(64, 64, gen), _photo(32, 32, gen)]], padding=True,
                       return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == (1 + 2) + (1 + 4) + 1  # views and tiles; a one-tile image: its view
    view = "<IMG_START><<IMG_ATOM>*16><IMG_GRID>"
    assert _layout(tokenizer, inputs["input_ids"][0], "<IMG_ATOM>").endswith(
        f"w44w39w53w0{view}<<IMG_ATOM>*16><IMG_ROW><<IMG_ATOM>*16><IMG_END>")
    assert _layout(tokenizer, inputs["input_ids"][1], "<IMG_ATOM>") == (
        f"{view}<<IMG_ATOM>*16><IMG_COL><<IMG_ATOM>*16><IMG_ROW><<IMG_ATOM>*16><IMG_COL><<IMG_ATOM>*16><IMG_END>"
        f"{view}<IMG_END>w43w39w7")
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert runs == [(0, 16)] * 3 + [(1, 16)] * 6

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == untokenized == [before.split()] * 3 + [after.split()] * 6
    assert not warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zspa_kernels.prune(model, keep=4).remove()  # no marker its config does not name: nothing to warn of
