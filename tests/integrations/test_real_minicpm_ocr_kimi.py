"""prune() on the layouts that transformers' own MiniCPM-OCR and Kimi-K2.5 processors write for images:
the real processor classes, built offline around a word-level tokenizer holding each family's markers (as special
tokens, as the checkpoints add them), and tiny random models with the tokenizer's ids.

(Qianfan-OCR, InternVL's layout: with InternVL, in ``test_real_internvl_got.py``.) MiniCPM-OCR's processor is
MiniCPM-V 4.6's (the same code): each image's number, its thumbnail between image markers, its slices between slice
markers, a newline between rows of slices; each crop its own budget. It differs in its image processor's defaults:
``"4x"`` (a 32 px crop of 2 px patches is 64 tokens, not 16) and ``small_image_upsize`` (``"never"``: crops keep their
native size, so the thumbnail's count differs from the slices'). Kimi-K2.5's images (its chat template writes each
as ``<|media_begin|>image<|media_content|>`` its tokens ``<|media_end|>``): each image its own budget, of a count its
size gives (test_real_processors.py tests its video chunks)."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (MINICPM_TOKENS, _kimi_k25, _photo, _prompts_and_warnings, _retokenized, _runs,
                                   _token_layout, _tokenizer, _video)

transformers = pytest.importorskip("transformers")

BEFORE, AFTER = "w44 w39 w53 w0", "w43 w39 w7"


def _skip_without(name: str, family: str) -> None:
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {family} ({name})")


def _minicpm_ocr(small_image_upsize: str = "always"):
    """The real MiniCPMOcrProcessor (its image processor's defaults: ``"4x"``, a 32 px crop of 2 px patches is 8x8 =
    64 tokens; up to 4 slices) and the tiny builder's model rebuilt on this tokenizer's ids."""
    import torchvision  # noqa: F401  (its image and video processors need it: an error here, not a skip)

    tokenizer = _tokenizer(list(MINICPM_TOKENS.values()), plain=["\n"], words=tuple("0123456789"), **MINICPM_TOKENS)
    sizes = dict(scale_resolution=32, patch_size=2)
    processor = transformers.MiniCPMOcrProcessor(
        image_processor=transformers.MiniCPMOcrImageProcessor(max_slice_nums=4, small_image_upsize=small_image_upsize,
                                                              **sizes),
        video_processor=transformers.MiniCPMOcrVideoProcessor(**sizes), tokenizer=tokenizer)
    assert processor.image_processor.downsample_mode == "4x"  # MiniCPM-OCR's default (4.6's is "16x")
    model = _retokenized("minicpm_ocr", tokenizer, dict(image_token_id="<unk_image>", video_token_id="<unk_video>"))
    return model, processor, tokenizer


def _layout(tokenizer, inputs, row: int) -> list[str]:
    """Row ``row``'s tokens, padding aside, each run of image or video tokens written ``token*n``."""
    return _token_layout(tokenizer, inputs, row, tokenizer.image_token, tokenizer.video_token)


@pytest.mark.parametrize("small_image_upsize", ["always", "never"])
def test_minicpm_ocr_crops_are_budgeted_apart_and_image_numbers_are_no_question(small_image_upsize):
    """MiniCPM-OCR's processor (MiniCPM-V 4.6's, handled by its Family entry) writes each image as
    ``<image_id>N</image_id>`` (its number in its row, from 0), its thumbnail between ``<image>`` markers, then its
    slices between ``<slice>`` markers, a newline between rows of them: each crop is a selection over exactly the
    tokens written (``"always"``: every crop upscaled to 32 px, 64 tokens; ``"never"``: native sizes, a small image's
    thumbnail 35 tokens, the other crops 63). The number is the image's: with a tokenizer it goes with its markers,
    in a question after a first image (the second image's number) and in one before its image (its own); keep-all
    bit for bit, generate() the same. The family is flagged ``unnamed_markers``: without a tokenizer prune() warns,
    and the markers, the number and the newline after the first image are question text (row 1's question, before
    its image, is ranked by the markers after it alone)."""
    _skip_without("MiniCPMOcrProcessor", "MiniCPM-OCR")
    model, processor, tokenizer = _minicpm_ocr(small_image_upsize)
    gen = torch.Generator().manual_seed(0)
    small, large = [(32, 32), (64, 64)] if small_image_upsize == "always" else [(20, 28), (50, 70)]
    thumb, crop = (64, 64) if small_image_upsize == "always" else (35, 63)  # (10x14 and 14x18 patches) / 4
    after, between, before = "w3 w4", "w5 w6", "w7 w8"
    inputs = processor(text=[f"w1 w2 <unk_image> {after} <unk_image> {between}", f"{before} <unk_image>"],
                       images=[[_photo(*small, gen), _photo(*large, gen)], [_photo(*large, gen)]],
                       padding=True, return_tensors="pt")
    image = f"<unk_image>*{crop}"
    slices = ["<slice>", image, "</slice>", "<slice>", image, "</slice>", "\n"] * 2
    whole = ["<image>", image, "</image>", *slices[:-1]]  # a 2x2 slice grid after the thumbnail
    assert _layout(tokenizer, inputs, 0) == ["w1", "w2", "<image_id>", "0", "</image_id>", "<image>",
                                             f"<unk_image>*{thumb}", "</image>", *after.split(), "<image_id>", "1",
                                             "</image_id>", *whole, *between.split()]
    assert _layout(tokenizer, inputs, 1) == [*before.split(), "<image_id>", "0", "</image_id>", *whole]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], tokenizer.image_token_id) \
        == [(0, thumb)] + [(0, crop)] * 5 + [(1, crop)] * 5  # thumbnails, 2x2 slices
    assert all(s.order.numel() == 4 for s in selections)  # keep=4 a crop
    assert prompts == [f"{after} {between}".split()] * 6 + [before.split()] * 5
    assert len(warned) == 1 and "MiniCPM-V 4.6" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    markers = ["<image>", "</image>", "<slice>", "</slice>", "<slice>", "</slice>", "\n", "<slice>", "</slice>",
               "<slice>", "</slice>"]
    assert untokenized == [["</image>", *after.split(), "<image_id>", "1", "</image_id>", *markers,
                            *between.split()]] * 6 + [markers[1:]] * 5


def test_minicpm_ocr_video_frames_are_budgeted_apart_and_its_number_is_no_question():
    """MiniCPM-OCR's processor writes a video as its number (``<image_id>0</image_id>``, counted apart from the
    images) then each frame's thumbnail of video tokens between ``<image>`` markers (64 tokens, "4x"): every frame
    is a selection of its own; with a tokenizer the prompt is the words around the image and the video, never the
    number; without one the markers and the number stay."""
    _skip_without("MiniCPMOcrProcessor", "MiniCPM-OCR")
    from transformers.video_utils import VideoMetadata

    model, processor, tokenizer = _minicpm_ocr()
    gen = torch.Generator().manual_seed(0)
    frames = 4
    metadata = [VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))]
    inputs = processor(text=["w1 <unk_image> w2 w3 <unk_video> w4", f"{BEFORE} <unk_image>"],
                       images=[[_photo(32, 32, gen)], [_photo(32, 32, gen)]], videos=[_video(frames, 32, 32)],
                       padding=True, return_tensors="pt",
                       videos_kwargs=dict(do_sample_frames=False, video_metadata=metadata))
    frame = ["<image>", "<unk_video>*64", "</image>"]
    assert _layout(tokenizer, inputs, 0) == ["w1", "<image_id>", "0", "</image_id>", "<image>", "<unk_image>*64",
                                             "</image>", "w2", "w3", "<image_id>", "0", "</image_id>",
                                             *frame * frames, "w4"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(
        inputs["input_ids"], tokenizer.image_token_id, tokenizer.video_token_id) == [(0, 64)] * (1 + frames) + [(1, 64)]
    assert prompts == [["w2", "w3", "w4"]] * (1 + frames) + [BEFORE.split()]
    assert len(warned) == 1 and "tokenizer=" in warned[0]
    assert untokenized == [["</image>", "w2", "w3", "<image_id>", "0", "</image_id>",
                            *["<image>", "</image>"] * frames, "w4"]] * (1 + frames) + [["</image>"]]


def test_kimi_k25_images_are_budgeted_apart_and_their_wrappers_are_no_question():
    """Kimi-K2.5's processor replaces each ``<|media_pad|>`` with an image's tokens (``t*h*w`` patches merged 2x2: a
    count its size gives), and its chat template writes each image as ``<|media_begin|>image<|media_content|>``
    ``<|media_pad|><|media_end|>``. A batch of three rows: one image, then the question; two images in a row (of
    different sizes, no text between them), then the question; the question, then an image. Every image is a
    selection over exactly its tokens (keep-all bit for bit, generate() the same); the wrapper (the config's begin/end
    markers, ``<|media_content|>`` in no config and the word ``image`` between them) is the image's, so the prompts are
    the question words with and without a tokenizer, and prune() gives no warning (the family writes no marker
    outside an image's wrapper that the config does not name)."""
    model, processor, tokenizer, _ = _kimi_k25()
    image = f"<|media_begin|>image<|media_content|>{processor.image_token}<|media_end|>"  # as its chat template
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{image} {AFTER}", f"{image}{image} {AFTER}", f"{BEFORE} {image}"],
                       images=[[_photo(16, 12, gen)], [_photo(12, 16, gen), _photo(20, 20, gen)], [_photo(28, 8, gen)]],
                       padding=True, return_tensors="pt")
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert counts == [12, 12, 16, 14]  # 8x6, 6x8, 8x8 and 14x4 patches
    wrapped = [["<|media_begin|>", "image", "<|media_content|>", f"{processor.image_token}*{n}", "<|media_end|>"]
               for n in counts]
    assert _token_layout(tokenizer, inputs, 0, processor.image_token) == wrapped[0] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 1, processor.image_token) == wrapped[1] + wrapped[2] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 2, processor.image_token) == BEFORE.split() + wrapped[3]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 12), (1, 12), (1, 16), (2, 14)]
    assert all(s.order.numel() == 4 for s in selections)  # keep=4 an image
    assert prompts == untokenized == [AFTER.split()] * 3 + [BEFORE.split()]
    assert warned == []
