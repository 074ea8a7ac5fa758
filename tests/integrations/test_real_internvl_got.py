"""prune() on the image layouts that transformers' own InternVL (and Qianfan-OCR) and GOT-OCR2 processors write
when they split an image into crops (``crop_to_patches``: a grid of crops, then a thumbnail of the whole image where there is more than
one crop): the real processor classes, built offline around a word-level tokenizer holding each family's markers
(as special tokens, as the checkpoints add them), and tiny random models with the tokenizer's ids.

Both processors write all of an image's crops as one run of image tokens between ``<img>`` and ``</img>`` (no
config names either), and both models encode every crop apart (``pixel_values`` holds one entry a crop, a fixed
count of tokens each). The budget unit is the family table's (README, "Where an image is"): an InternVL image,
all its crops, is one selection; a GOT-OCR2 crop (``_tower_counts``: one per ``pixel_values`` entry; a multi-page
prompt's pages are one run) is a selection of its own."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (_image_processor, _internvl, _photo, _prompts_and_warnings, _retokenized, _runs,
                                   _token_layout, _tokenizer)

transformers = pytest.importorskip("transformers")

BEFORE, AFTER = "w44 w39 w53 w0", "w43 w39 w7"
QIANFAN_MARKERS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def _qianfan_ocr():
    """The real QianfanOCRProcessor (GOT-OCR2's image processor, as its auto class maps it: 32 px crops, up to 6 and
    a thumbnail; 16 tokens a crop) and the tiny builder's model rebuilt on this tokenizer's ids."""
    tokenizer = _tokenizer(QIANFAN_MARKERS, plain=["\n"], bos="<|endoftext|>", start_image_token="<img>",
                           end_image_token="</img>", context_image_token="<IMG_CONTEXT>")
    image_processor = getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
    processor = transformers.QianfanOCRProcessor(
        image_processor=image_processor(size={"height": 32, "width": 32}, max_patches=6), tokenizer=tokenizer,
        image_seq_length=16)
    model = _retokenized("qianfan_ocr", tokenizer, dict(image_token_id="<IMG_CONTEXT>", pad_token_id="<pad>"))
    return model, processor, tokenizer


def _crops_family(family: str):
    """InternVL's or Qianfan-OCR's model, processor and tokenizer (images split into crops), the text's placeholder
    for an image and the family's name."""
    if family == "internvl":
        model, processor, tokenizer = _internvl(crops=True)
        return model, processor, tokenizer, processor.image_token, "InternVL"
    if not hasattr(transformers, "QianfanOCRProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Qianfan-OCR (QianfanOCRProcessor)")
    return (*_qianfan_ocr(), "<image>", "Qianfan-OCR")


@pytest.mark.parametrize("family", ["internvl", "qianfan_ocr"])
def test_internvl_an_image_of_crops_is_one_budget_and_its_markers_are_no_question(family):
    """InternVL's processor (``crop_to_patches``, its default), and Qianfan-OCR's (the same layout, for each
    ``<image>`` of the text), write each image as ``<img>``, 16 ``<IMG_CONTEXT>`` for each of its crops and its
    thumbnail, ``</img>``: one run an image, of a count its size gives. Row 0 holds two images (4 and 5 crops, a
    ``"\\n"`` after each, as InternVL's chat template writes them) before the question, row 1 one image (3 crops)
    after it. Each image, all its crops, is one selection (one budget: ``keep`` tokens an
    image, whatever its crops); keep-all bit for bit; with ``tokenizer=`` the prompts are exactly the question words
    (``<img>``/``</img>`` and the newlines are none of it), also in generate(). The family is flagged
    ``unnamed_markers``: without a tokenizer prune() warns, and rightly: the markers and newlines after the first
    image are question text, and row 1's question, written before its image, is ranked by ``</img>`` alone."""
    model, processor, tokenizer, placeholder, name = _crops_family(family)
    image = processor.image_token
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{placeholder}\n{placeholder}\n{AFTER}", f"{BEFORE} {placeholder}"],
                       images=[[_photo(32, 96, gen), _photo(64, 64, gen)], [_photo(64, 32, gen)]], padding=True,
                       return_tensors="pt", images_kwargs=dict(crop_to_patches=True, max_patches=6))
    crops = [4, 5, 3]  # 1x3 crops and a thumbnail, 2x2 and a thumbnail, 2x1 and a thumbnail
    assert inputs["pixel_values"].shape[0] == sum(crops)  # the model encodes every crop apart
    wrapped = ["<img>", f"{image}*{16 * crops[0]}", "</img>", "\n", "<img>", f"{image}*{16 * crops[1]}", "</img>", "\n"]
    assert _token_layout(tokenizer, inputs, 0, image) == wrapped + AFTER.split()
    wrapped = ["<img>", f"{image}*{16 * crops[2]}", "</img>"]
    assert _token_layout(tokenizer, inputs, 1, image) == BEFORE.split() + wrapped
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16 * crops[0]), (0, 16 * crops[1]), (1, 16 * crops[2])]
    assert all(s.order.numel() == 4 for s in selections)  # keep=4 an image, all its crops
    assert prompts == [AFTER.split()] * 2 + [BEFORE.split()]
    assert len(warned) == 1 and name in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: row 0's markers and newlines after its first image; row 1's end marker alone.
    assert untokenized == [["</img>", "\n", "<img>", "</img>", "\n", *AFTER.split()]] * 2 + [["</img>"]]


GOT_MARKERS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]
# The words of the prompt GOT-OCR2's processor writes around an image: its system prompt, the roles, the query.
GOT_WORDS = tuple(dict.fromkeys(
    "system You should follow the instructions carefully and explain your answers in detail. user assistant "
    "OCR OCR: with format across multi pages upon the patch reference:".split()))


def _got_ocr2():
    """The real GotOcr2Processor (64 px crops, 16 image tokens a crop) and the tiny builder's model (a SAM
    tower: 64 px, 16 tokens a crop) rebuilt on this tokenizer's ids."""
    tokenizer = _tokenizer(GOT_MARKERS, plain=["\n"], bos="<|endoftext|>", words=GOT_WORDS)
    processor = transformers.GotOcr2Processor(
        image_processor=_image_processor("GotOcr2ImageProcessor", size={"height": 64, "width": 64}),
        tokenizer=tokenizer)
    model = _retokenized("got_ocr2", tokenizer, dict(image_token_index="<imgpad>", pad_token_id="<pad>"))
    return model, processor, tokenizer


def _got_prompt(processor, crops: int, query: str) -> list[str]:
    """The tokens GOT-OCR2's processor writes for an image of ``crops`` crops (16 tokens each)."""
    system = processor.tokenizer.tokenize(processor.system_query)  # "system\nYou should ..."
    return (["<|im_start|>", *system, "<|im_end|>", "<|im_start|>", "user", "\n", "<img>", f"<imgpad>*{16 * crops}",
             "</img>", "\n", *query.split(), "<|im_end|>", "<|im_start|>", "assistant", "\n"])


@pytest.mark.parametrize("multi_page", [False, True], ids=["crops", "multi-page"])
def test_got_ocr2_crops_are_budgeted_apart_and_its_markers_are_no_question(multi_page):
    """GOT-OCR2's processor writes its own prompt: ``<|im_start|>system`` and its system prompt, ``<|im_start|>user``,
    ``<img>``, 16 ``<imgpad>`` for each crop (``crop_to_patches``: the crops and a thumbnail; ``multi_page``: every
    page's, in one run), ``</img>``, the query (``OCR upon the patch reference:``), ``<|im_end|><|im_start|>assistant``.
    Every crop is a selection (``_tower_counts``: one per ``pixel_values`` entry, as the model encodes them), keep-all
    bit for bit; with ``tokenizer=`` the prompts are the query's words and the role word ``assistant`` (plain text the
    processor writes, no template to tell it: README), never ``</img>``, ``<|im_end|>``, ``<|im_start|>`` or the
    newlines, also in generate(). The family is flagged ``unnamed_markers``: without a tokenizer prune() warns, and
    the markers and newlines after the image count as question text."""
    model, processor, tokenizer = _got_ocr2()
    gen = torch.Generator().manual_seed(0)
    if multi_page:  # one row: a 1x2 page (2 crops and a thumbnail) and a 1x1 page (one crop, no thumbnail)
        images, crops = [[_photo(64, 128, gen), _photo(64, 64, gen)]], [4]
        query = "OCR across multi pages upon the patch reference:"
    else:  # two rows: 1x3 crops and a thumbnail, 2x1 crops and a thumbnail
        images, crops, query = [_photo(64, 192, gen), _photo(128, 64, gen)], [4, 3], "OCR upon the patch reference:"
    inputs = processor(images, return_tensors="pt", padding=True, crop_to_patches=True, max_patches=6,
                       num_image_tokens=16, multi_page=multi_page)
    assert inputs["pixel_values"].shape[0] == sum(crops)  # the model encodes every crop apart
    for row, n in enumerate(crops):
        assert _token_layout(tokenizer, inputs, row, "<imgpad>") == _got_prompt(processor, n, query)
    assert _runs(inputs["input_ids"], model.config.image_token_index) == [(r, 16 * n) for r, n in enumerate(crops)]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(r, 16) for r, n in enumerate(crops) for _ in range(n)]
    assert all(s.order.numel() == 4 for s in selections)  # keep=4 a crop
    assert prompts == [[*query.split(), "assistant"]] * sum(crops)
    assert len(warned) == 1 and "GOT-OCR2" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: everything after the image, markers and newlines too.
    after = ["</img>", "\n", *query.split(), "<|im_end|>", "<|im_start|>", "assistant", "\n"]
    assert untokenized == [after] * sum(crops)


def test_got_ocr2_a_question_written_before_its_image_is_the_prompt():
    """Given text, GOT-OCR2's processor (5.x) expands each ``<imgpad>`` to 16 a crop, the ``<img>``/``</img>``
    around it as written: row 0 holds its question before the image, row 1 after it (and a newline). Every crop
    is a selection; with ``tokenizer=`` the prompts are exactly the question words (row 0's: the text before its
    image, nothing but markers standing after it). Without one, row 0's question is ranked by ``</img>`` alone."""
    if transformers.__version__.startswith("4."):
        pytest.skip(f"transformers {transformers.__version__}'s GotOcr2Processor expands no <imgpad> of the text given")
    model, processor, tokenizer = _got_ocr2()
    gen = torch.Generator().manual_seed(0)
    image = "<img><imgpad></img>"
    inputs = processor(images=[_photo(64, 192, gen), _photo(128, 64, gen)],
                       text=[f"{BEFORE} {image}", f"{image}\n{AFTER}"], return_tensors="pt", padding=True,
                       crop_to_patches=True, max_patches=6, num_image_tokens=16)
    crops = [4, 3]
    assert _token_layout(tokenizer, inputs, 0, "<imgpad>") == [*BEFORE.split(), "<img>", "<imgpad>*64", "</img>"]
    assert _token_layout(tokenizer, inputs, 1, "<imgpad>") == ["<img>", "<imgpad>*48", "</img>", "\n", *AFTER.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(r, 16) for r, n in enumerate(crops) for _ in range(n)]
    assert prompts == [BEFORE.split()] * crops[0] + [AFTER.split()] * crops[1]
    assert len(warned) == 1 and "GOT-OCR2" in warned[0]
    assert untokenized == [["</img>"]] * crops[0] + [["</img>", "\n", *AFTER.split()]] * crops[1]
