"""prune() on the token layouts that transformers' own Inkling, LFM3-VL and Janus processors write (the real
``InklingProcessor``, ``Lfm3VlProcessor`` and ``JanusProcessor`` classes, built offline around a word-level
tokenizer holding the families' markers; the tiny builders' models rebuilt on its ids), several images of
different sizes in a row and batches of rows with different image counts, a text-only row among them.
Inkling's processor writes each image as its patch tokens in place of the prompt's image token; the chat
template's image-begin marker before it (``<|content_image|>``) is named by the config (``image_bos_token_id``).
LFM3-VL's writes each image (Qwen2-VL's image processor: no tiles, no splitting) as its merged grid's tokens
between the template's ``<|vision_start|>``/``<|vision_end|>``, both named by the config. Janus's writes each image
as ``<begin_of_image>``, its tokens, ``<end_of_image>``: markers no config names (``unnamed_markers``)."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (QWEN_IMAGE, QWEN_MARKERS, TIMESTAMPS, _image_processor, _janus, _photo,
                                   _prompts_and_warnings, _retokenized, _runs, _token_layout, _tokenizer)

transformers = pytest.importorskip("transformers")

BEFORE, BETWEEN, AFTER, ONLY_TEXT = "w44 w39", "w43 w39", "w5", "w1 w2"

# The processor's default image and audio tokens and the begin markers its checkpoints' chat template writes.
INKLING_IMAGE, INKLING_AUDIO = "<|unused_200054|>", "<|unused_200053|>"
INKLING_IMAGE_BOS, INKLING_AUDIO_BOS = "<|content_image|>", "<|content_audio_input|>"


def _inkling(**images_kwargs):
    """The real InklingProcessor (its torchvision image processor cuts 2 px patches, the tiny tower's: one image
    token each; its feature extractor 4 mel bins, each quantized into 8 dMel bins, the tiny audio tower's) and the
    tiny builder's model on this tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "inkling" not in BUILDERS or not hasattr(transformers, "InklingProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Inkling (InklingProcessor: 5.17+)")
    import torchvision  # noqa: F401  (its image processor is torchvision's: an error here, not a skip)

    markers = [INKLING_IMAGE, INKLING_AUDIO, INKLING_IMAGE_BOS, INKLING_AUDIO_BOS]
    tokenizer = _tokenizer(markers, plain=[])
    processor = transformers.InklingProcessor(
        feature_extractor=transformers.InklingFeatureExtractor(feature_size=4),
        image_processor=transformers.InklingImageProcessor(size={"height": 2, "width": 2}, **images_kwargs),
        tokenizer=tokenizer, num_dmel_bins=8)
    model = _retokenized("inkling", tokenizer, dict(image_token_id=INKLING_IMAGE, audio_token_id=INKLING_AUDIO,
                                                    image_bos_token_id=INKLING_IMAGE_BOS,
                                                    audio_bos_token_id=INKLING_AUDIO_BOS),
                         text=dict(unpadded_vocab_size=len(tokenizer)))
    return model, processor, tokenizer


INKLING_SIZES = [[(6, 6)], [(4, 8), (8, 4)], [], [(4, 4), (2, 6)]]


@pytest.mark.parametrize("frac, counts", [(None, [12, 10, 12, 6, 4]), (2.0, [42, 36, 40, 20, 14])],
                         ids=["as-is", "upscaled"])
def test_inkling_images_of_each_row_are_budgeted_apart_after_their_begin_markers(frac, counts):
    """Inkling's processor writes an image as ``ceil(h / 2) * (w // 2 + 1)`` patch tokens of its (rescaled:
    ``rescale_image_frac``) size in place of the prompt's image token, nothing around it: the chat template's
    ``<|content_image|>`` before each image (written here as the template does) is the only marker, and the
    config names it. Each image is one selection of exactly its run, a row's two images back to back too (the
    marker between them); budget ``min(keep, n)``. With or without a tokenizer the prompts are exactly the
    question words (a question before its image; after a row's first image, all the row's text after it) and
    prune() does not warn (the family is not flagged); keep-all logits bit for bit, generate() the same prompts."""
    model, processor, tokenizer = _inkling(rescale_image_frac=frac)
    image = INKLING_IMAGE_BOS + INKLING_IMAGE
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {image}", f"{image} {BETWEEN} {image} {AFTER}", ONLY_TEXT,
                             f"{image}{image} w7"],
                       images=[[_photo(*s, gen) for s in row] for row in INKLING_SIZES], padding=True,
                       return_tensors="pt")
    assert "num_patches" not in inputs  # no per-image count goes to the model: the markers alone tell images apart
    a, b, c, d, e = (f"{INKLING_IMAGE}*{n}" for n in counts)
    assert _token_layout(tokenizer, inputs, 0, INKLING_IMAGE) == [*BEFORE.split(), INKLING_IMAGE_BOS, a]
    assert _token_layout(tokenizer, inputs, 1, INKLING_IMAGE) == [
        INKLING_IMAGE_BOS, b, *BETWEEN.split(), INKLING_IMAGE_BOS, c, *AFTER.split()]
    assert _token_layout(tokenizer, inputs, 2, INKLING_IMAGE) == ONLY_TEXT.split()
    assert _token_layout(tokenizer, inputs, 3, INKLING_IMAGE) == [INKLING_IMAGE_BOS, d, INKLING_IMAGE_BOS, e, "w7"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    rows = [0, 1, 1, 3, 3]
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == list(zip(rows, counts))
    assert [s.order.numel() for s in selections] == [4] * 5
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == untokenized == [BEFORE.split(), question, question, ["w7"], ["w7"]]
    assert not warned


def _lfm3_vl():
    """The real Lfm3VlProcessor (Qwen2-VL's PIL image processor and Qwen3-VL's video processor, as its checkpoints
    load them: the tiny tower's 2 px patches, merged 2x2; 4 to 64 patches an image) and the tiny builder's model on
    this tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "lfm3_vl" not in BUILDERS or not hasattr(transformers, "Lfm3VlProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no LFM3-VL (Lfm3VlProcessor: 5.24+)")
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    start, end, image, video = QWEN_MARKERS
    tokenizer = _tokenizer(QWEN_MARKERS, plain=TIMESTAMPS, bos="<|endoftext|>")
    model = _retokenized("lfm3_vl", tokenizer, dict(image_token_id=image, video_token_id=video,
                                                    vision_start_token_id=start, vision_end_token_id=end))
    vision = model.config.vision_config
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 size={"shortest_edge": 4 * vision.patch_size ** 2, "longest_edge": 64 * vision.patch_size ** 2})
    processor = transformers.Lfm3VlProcessor(
        image_processor=_image_processor("Qwen2VLImageProcessor", **sizes),
        video_processor=transformers.Qwen3VLVideoProcessor(**sizes), tokenizer=tokenizer)
    return model, processor, tokenizer


def test_lfm3_vl_images_of_different_sizes_are_budgeted_apart():
    """LFM3-VL's processor writes an image as ``h*w / 4`` image tokens of its merged grid (``image_grid_thw``) in
    place of the template's ``<|image_pad|>``, between the template's ``<|vision_start|>`` and ``<|vision_end|>``
    (both named by the config); its image processor (Qwen2-VL's) resizes, never splits. A batch: one image after
    a question; two of different sizes with words between; none; three back to back (each in its markers). Each
    image is one selection of exactly its run; with or without a tokenizer the prompts are exactly the question
    words and prune() does not warn; keep-all logits bit for bit, generate() the same prompts."""
    model, processor, tokenizer = _lfm3_vl()
    start, end, image, _ = QWEN_MARKERS
    wrapped = start + image + end
    p = model.config.vision_config.patch_size
    sizes = [[(8, 8)], [(4, 10), (12, 6)], [], [(4, 4), (6, 8), (16, 4)]]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {wrapped}", f"{wrapped} {BETWEEN} {wrapped} {AFTER}", ONLY_TEXT,
                             f"{wrapped}{wrapped}{wrapped} w7"],
                       images=[[_photo(h * p, w * p, gen) for h, w in row] for row in sizes], padding=True,
                       return_tensors="pt")
    # In patches: each image's own, but 12x6 (72 patches) is over the 64 allowed, resized (not split) to 10x4.
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 10], [1, 10, 4], [1, 4, 4], [1, 6, 8], [1, 16, 4]]
    counts = [16, 10, 10, 4, 12, 16]  # h*w / 4
    a, b, c, d, e, f = ([start, f"{image}*{n}", end] for n in counts)
    assert _token_layout(tokenizer, inputs, 0, image) == [*BEFORE.split(), *a]
    assert _token_layout(tokenizer, inputs, 1, image) == [*b, *BETWEEN.split(), *c, *AFTER.split()]
    assert _token_layout(tokenizer, inputs, 2, image) == ONLY_TEXT.split()
    assert _token_layout(tokenizer, inputs, 3, image) == [*d, *e, *f, "w7"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    rows = [0, 1, 1, 3, 3, 3]
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == list(zip(rows, counts))
    assert [s.order.numel() for s in selections] == [4] * 6
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == untokenized == [BEFORE.split(), question, question, ["w7"], ["w7"], ["w7"]]
    assert not warned


@pytest.mark.parametrize("system_prompt", [False, True], ids=["plain", "system_prompt"])
def test_janus_rows_of_several_images_are_budgeted_apart_and_their_markers_are_no_question(system_prompt):
    """Janus's processor writes every image, whatever its size (resized to 16 px: 16 tokens), as
    ``<begin_of_image>``, 16 ``<image_placeholder>``, ``<end_of_image>``; a row's images back to back are runs
    apart, the end and begin markers between them. A batch: two images after a question; two with words between;
    none; three back to back. Each image is one selection; with ``tokenizer=`` the prompts are exactly the question
    words (with ``use_default_system_prompt``, its words too where the question is before the image, as in the
    one-image test). Without one prune() warns (``unnamed_markers``), and the markers after a row's first image are
    question text: a question written before its images gives way to them."""
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    model, processor, tokenizer = _janus(system_prompt)
    image = "<image_placeholder>"
    boi, eoi = "<begin_of_image>", "<end_of_image>"
    sizes = [[(30, 30), (12, 40)], [(40, 24), (24, 40)], [], [(8, 8), (50, 20), (16, 16)]]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {image}{image}", f"{image} {BETWEEN} {image} {AFTER}", ONLY_TEXT,
                             f"{image} {image} {image} w7"],
                       images=[[_photo(*s, gen) for s in row] for row in sizes], padding=True, return_tensors="pt")
    system = tokenizer.tokenize(DEFAULT_SYSTEM_PROMPT) if system_prompt else []  # its words, then "\n\n"
    one, bos = [boi, f"{image}*16", eoi], tokenizer.bos_token  # 4.57's adds <bos>

    def layout(row):
        return [t for t in _token_layout(tokenizer, inputs, row, image) if t != bos]

    assert layout(0) == system + BEFORE.split() + one * 2
    assert layout(1) == system + one + BETWEEN.split() + one + AFTER.split()
    assert layout(2) == system + ONLY_TEXT.split()
    assert layout(3) == system + one * 3 + ["w7"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    rows = [0, 0, 1, 1, 3, 3, 3]
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(r, 16) for r in rows]
    assert [s.order.numel() for s in selections] == [4] * 7
    question = (BETWEEN + " " + AFTER).split()
    before = [w for w in system if w != "\n\n"] + BEFORE.split()  # the system prompt's words, no newline
    assert prompts == [before] * 2 + [question] * 2 + [["w7"]] * 3
    assert len(warned) == 1 and "Janus" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: each row's text after its first image's tokens, markers and all.
    assert untokenized == ([[eoi, boi, eoi]] * 2 + [[eoi, *BETWEEN.split(), boi, eoi, *AFTER.split()]] * 2
                           + [[eoi, boi, eoi, boi, eoi, "w7"]] * 3)


def test_inkling_audio_clips_are_no_selection_and_no_question():
    """Inkling's processor writes an audio clip as one audio token a frame of its features in place of the prompt's
    audio token, after the template's ``<|content_audio_input|>`` (named by the config: ``audio_bos_token_id``), in rows
    with images. The audio tokens are kept whole, no selection of their own; each image is one selection, and with
    or without a tokenizer the prompts are exactly the question words, the audio tokens and their marker not among
    them (the config names both); prune() does not warn; keep-all logits bit for bit, generate() the same prompts."""
    import numpy as np

    model, processor, tokenizer = _inkling()
    image, audio = INKLING_IMAGE_BOS + INKLING_IMAGE, INKLING_AUDIO_BOS + INKLING_AUDIO
    gen, sound = torch.Generator().manual_seed(0), np.random.default_rng(0)
    inputs = processor(text=[f"w44 {audio} w39 {image}", f"{image} w43 {audio} w5"],
                       images=[[_photo(6, 6, gen)], [_photo(4, 8, gen)]], padding=True, return_tensors="pt",
                       audio=[sound.standard_normal(n).astype(np.float32) for n in (1600, 3200)], sampling_rate=16000)
    clip = [INKLING_AUDIO_BOS] + [INKLING_AUDIO]  # then more audio tokens: 2 for 0.1 s, 4 for 0.2 s
    assert _token_layout(tokenizer, inputs, 0, INKLING_IMAGE) == [
        "w44", *clip, INKLING_AUDIO, "w39", INKLING_IMAGE_BOS, f"{INKLING_IMAGE}*12"]
    assert _token_layout(tokenizer, inputs, 1, INKLING_IMAGE) == [
        INKLING_IMAGE_BOS, f"{INKLING_IMAGE}*10", "w43", *clip, *[INKLING_AUDIO] * 3, "w5"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 12), (1, 10)]
    assert prompts == untokenized == [["w44", "w39"], ["w43", "w5"]]
    assert not warned


@torch.no_grad()
def test_lfm3_vl_images_written_back_to_back_without_their_markers_are_told_apart_by_their_grids():
    """Written by hand without the template's markers, two images back to back are one run of image tokens that
    ``image_grid_thw`` gives two grids for: each grid's tokens (``t*h*w`` over the merged patches) cut the run,
    so each image is a selection of its own tokens, with the picks of the same images written in their markers
    (diversity alone: ``core_ratio=0``, which no prompt text changes), never two images on one budget."""
    import zspa_kernels

    model, processor, tokenizer = _lfm3_vl()
    image = QWEN_MARKERS[2]
    p = model.config.vision_config.patch_size
    gen = torch.Generator().manual_seed(0)
    photos = [_photo(8 * p, 8 * p, gen), _photo(4 * p, 8 * p, gen)]
    bare = processor(text=[f"{image}{image} w7"], images=[photos], return_tensors="pt")
    assert _token_layout(tokenizer, bare, 0, image) == [f"{image}*24", "w7"]  # 16 + 8, one run
    marked = processor(text=[f"{QWEN_IMAGE}{QWEN_IMAGE} w7"], images=[photos], return_tensors="pt")
    picks = []
    for inputs in (bare, marked):
        with zspa_kernels.prune(model, keep=4, core_ratio=0.0, tokenizer=processor) as handle:
            model(**inputs)
        assert [(s.batch_row, s.n_tokens) for s in handle.last_selection] == [(0, 16), (0, 8)]
        picks.append([s.order.tolist() for s in handle.last_selection])
    assert picks[0] == picks[1]
