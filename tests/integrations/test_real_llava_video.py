"""prune() on the layouts that transformers' own LLaVA video processors write for an image AND a video in
the same row, in a batch of two rows: LLaVA-OneVision (``LlavaOnevisionProcessor``), LLaVA-NeXT-Video
(``LlavaNextVideoProcessor``) and Video-LLaVA (``VideoLlavaProcessor``). The processors are the real classes,
built offline around a word-level tokenizer holding ``<image>`` and ``<video>`` (the helpers of
``test_real_processors.py``); the models are the tiny builders', rebuilt on that tokenizer's ids. Each image and
each video get the selections the family table gives them (a OneVision or NeXT-Video video one selection, its
frames one run with no marker between them; a Video-LLaVA video one selection a frame, each frame a whole CLIP
output), of the token counts the processor wrote; the prompts are the question words only, in generate() too."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the video processors need it (the test extra installs it)


from .test_real_processors import (  # noqa: E402
    _image_processor,
    _llava_any_resolution,
    _photo,
    _prompts_and_warnings,
    _retokenized,
    _runs_of_both,
    _token_layout,
    _tokenizer,
    _video,
)

BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"


def _layout(tokenizer, inputs, row: int) -> list[str]:
    """Row ``row``'s tokens, padding and a leading BOS aside, each run of ``<image>`` or ``<video>`` tokens
    written ``token*n``."""
    return _token_layout(tokenizer, inputs, row, "<image>", "<video>", bos=False)


def _mixed_inputs(processor, texts: list[str], photos: list[list[tuple[int, int]]], frames: int):
    """The processor's inputs for ``texts``, the random photos of the ``(h, w)`` sizes ``photos`` (a list a row)
    and one random 16 px video of ``frames`` frames a row (the videos of one call have one frame count). The
    three video processors sample no frames by default (4.57's Video-LLaVA processor takes no ``videos_kwargs``)."""
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(h, w, gen) for h, w in row] for row in photos],
                       videos=[_video(frames, 16, 16)] * len(texts), padding=True, return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[:2] == (len(texts), frames)  # every frame kept
    return inputs


def _check(model, inputs, processor, tokenizer):
    """Selections, prompt words with ``tokenizer=`` (generate()'s the same) and without one; no family here
    writes a marker its config does not name, so prune() warns of none. Each selection keeps its own budget."""
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert warned == [] and all(s.order.numel() == 4 for s in selections)
    return [(s.batch_row, s.n_tokens) for s in selections], prompts, untokenized


def test_llava_onevision_image_and_video_in_one_row_are_budgeted_whole():
    """LLaVA-OneVision's processor writes a row's only image in the any-resolution layout (base view, unpadded
    tiles and a newline feature a row: 52 tokens for a 20x36 photo), each image of a multi-image row as its base
    view and one newline feature (17 tokens), and a video as one run of its 2x2-pooled frames and a newline
    feature (4 frames: 17 tokens). Row 0: the question, then an image and a video back to back (two token ids:
    two runs); row 1: a video, words, two images, a newline and the question. Each image and each video is one
    selection, of the run the processor wrote; the prompts are the question words (row 0's, written before its
    image, the text before it), the newline none with a tokenizer; without one it stays (README: tokens that
    decode to whitespace). The images of a multi-image row written back to back (as the checkpoints' chat
    template writes a message's images: all of them first, nothing between) are one run, which the model's
    ``batch_num_images`` splits: an image apiece, 17 tokens each, beside a row whose one image has 52."""
    model, processor, tokenizer = _llava_any_resolution("llava_onevision")
    inputs = _mixed_inputs(processor, [f"{BEFORE} <image><video>", f"<video> {BETWEEN} <image> w9 <image>\n{AFTER}"],
                           [[(20, 36)], [(36, 20), (16, 16)]], frames=4)
    assert _layout(tokenizer, inputs, 0) == [*BEFORE.split(), "<image>*52", "<video>*17"]
    assert _layout(tokenizer, inputs, 1) == ["<video>*17", *BETWEEN.split(), "<image>*17", "w9", "<image>*17", "\n",
                                             *AFTER.split()]
    selections, prompts, untokenized = _check(model, inputs, processor, tokenizer)
    assert selections == _runs_of_both(inputs, model) == [(0, 52), (0, 17), (1, 17), (1, 17), (1, 17)]
    question = [*BETWEEN.split(), "w9", *AFTER.split()]
    assert prompts == [BEFORE.split()] * 2 + [question] * 3
    assert untokenized == [BEFORE.split()] * 2 + [[*BETWEEN.split(), "w9", "\n", *AFTER.split()]] * 3

    inputs = _mixed_inputs(processor, [f"<image><image><video> {AFTER}", f"{BEFORE} <image><video>"],
                           [[(36, 20), (16, 16)], [(20, 36)]], frames=4)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    assert _layout(tokenizer, inputs, 0) == ["<image>*34", "<video>*17", *AFTER.split()]
    assert _layout(tokenizer, inputs, 1) == [*BEFORE.split(), "<image>*52", "<video>*17"]
    selections, prompts, untokenized = _check(model, inputs, processor, tokenizer)
    assert selections == [(0, 17), (0, 17), (0, 17), (1, 52), (1, 17)]
    assert prompts == untokenized == [AFTER.split()] * 3 + [BEFORE.split()] * 2


def _llava_next_video():
    """A tiny random LLaVA-NeXT-Video (the tiny builder's config, this tokenizer's ids) with the real processor:
    16 px views and frames of 4 px patches (a CLIP tower; its class token dropped, "default" strategy), the
    builder's grid pinpoints."""
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes Llama's tokenizer class only
    tokenizer = _tokenizer(["<image>", "<video>"], plain=["\n"], cls=transformers.LlamaTokenizerFast if v4 else None)
    model = _retokenized("llava_next_video", tokenizer, dict(
        image_token_index="<image>", image_token_id="<image>", video_token_index="<video>", video_token_id="<video>",
        pad_token_id="<pad>"))
    config = model.config
    sizes = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaNextVideoProcessor(
        video_processor=transformers.LlavaNextVideoVideoProcessor(**sizes),
        image_processor=_image_processor("LlavaNextImageProcessor", image_grid_pinpoints=config.image_grid_pinpoints,
                                         **sizes),
        tokenizer=tokenizer, patch_size=4, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy)
    return model, processor, tokenizer


def test_llava_next_video_image_and_video_in_one_row_are_budgeted_whole():
    """LLaVA-NeXT-Video's processor writes an image as LLaVA-NeXT's one run (base view, unpadded tiles, a newline
    feature a row: 52 or 56 tokens here), a video as one run of its frames' 2x2-pooled patches (8 frames of 4
    tokens: 32), no marker between frames. Row 0: the question, then an image and a video back to back; row 1: a
    video, a newline, words, an image, a newline, the question. Each image and each video is one selection; the
    prompts are the question words, the newlines none with a tokenizer (without one they stay)."""
    model, processor, tokenizer = _llava_next_video()
    inputs = _mixed_inputs(processor, [f"{BEFORE} <image><video>", f"<video>\n{BETWEEN} <image>\n{AFTER}"],
                           [[(20, 36)], [(36, 20)]], frames=8)
    assert _layout(tokenizer, inputs, 0) == [*BEFORE.split(), "<image>*52", "<video>*32"]
    assert _layout(tokenizer, inputs, 1) == ["<video>*32", "\n", *BETWEEN.split(), "<image>*56", "\n", *AFTER.split()]
    selections, prompts, untokenized = _check(model, inputs, processor, tokenizer)
    assert selections == _runs_of_both(inputs, model) == [(0, 52), (0, 32), (1, 32), (1, 56)]
    question = [*BETWEEN.split(), *AFTER.split()]
    assert prompts == [BEFORE.split()] * 2 + [question] * 2
    assert untokenized == [BEFORE.split()] * 2 + [["\n", *BETWEEN.split(), "\n", *AFTER.split()]] * 2


def _video_llava():
    """A tiny random Video-LLaVA (the tiny builder's config, this tokenizer's ids) with the real processor: 16 px
    images and frames of 4 px patches, CLIP towers (16 patches and a class token)."""
    tokenizer = _tokenizer(["<image>", "<video>"], plain=["\n"])
    model = _retokenized("video_llava", tokenizer, dict(
        image_token_index="<image>", image_token_id="<image>", video_token_index="<video>", video_token_id="<video>",
        pad_token_id="<pad>"))
    sizes = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.VideoLlavaProcessor(
        video_processor=transformers.VideoLlavaVideoProcessor(**sizes),
        image_processor=_image_processor("VideoLlavaImageProcessor", **sizes), tokenizer=tokenizer, patch_size=4,
        num_additional_image_tokens=1, vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return model, processor, tokenizer


def test_video_llava_image_and_video_frames_in_one_row_are_budgeted_apart():
    """Video-LLaVA's processor writes an image as its patches (16 tokens: the "default" strategy drops the class
    token) and a video of 8 frames as one run of ``8 x (16 + 1)`` tokens (each frame a whole CLIP output, its
    class token kept), no marker between frames. Row 0: the question, then an image and a video back to back;
    row 1: a video, words, two images back to back, a newline and the question. Each image is a selection of 16
    tokens, each frame one of 17 (README: Video-LLaVA's image and video runs split apart by their fixed counts);
    the prompts are the question words, the newline none with a tokenizer (without one it stays)."""
    model, processor, tokenizer = _video_llava()
    inputs = _mixed_inputs(processor, [f"{BEFORE} <image><video>", f"<video> {BETWEEN} <image><image>\n{AFTER}"],
                           [[(20, 36)], [(36, 20), (16, 16)]], frames=8)
    assert _layout(tokenizer, inputs, 0) == [*BEFORE.split(), "<image>*16", "<video>*136"]
    assert _layout(tokenizer, inputs, 1) == ["<video>*136", *BETWEEN.split(), "<image>*32", "\n", *AFTER.split()]
    assert _runs_of_both(inputs, model) == [(0, 16), (0, 136), (1, 136), (1, 32)]
    selections, prompts, untokenized = _check(model, inputs, processor, tokenizer)
    assert selections == [(0, 16)] + [(0, 17)] * 8 + [(1, 17)] * 8 + [(1, 16)] * 2
    question = [*BETWEEN.split(), *AFTER.split()]
    assert prompts == [BEFORE.split()] * 9 + [question] * 10
    assert untokenized == [BEFORE.split()] * 9 + [[*BETWEEN.split(), "\n", *AFTER.split()]] * 10
