"""prune() on several images of different sizes in one row, written by the real processors of the families
whose images are told apart by their grids or sizes (Molmo2, Emu3, Apertus 1.5): back to back (nothing between
them, as a chat template writing a message's images first writes them), with words between, and in a batch of
rows with different image counts (left padding). Each image is a selection over exactly its own tokens (the
runs the processor wrote), the prompt with a tokenizer is the question's words alone, keep-all logits are the
unpatched model's bit for bit, and generate() selects with the same prompts."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from .test_real_processors import (_apertus1p5, _emu3, _molmo2, _photo, _prompt_words, _prompts_and_warnings,
                                   _runs)

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

AFTER, BEFORE, BETWEEN = " Describe them.", "What is in the picture?", " And here?"


def _layout(tokenizer, row: torch.Tensor, image: str) -> str:
    """Row ``row`` decoded, padding aside, each run of ``image`` placeholders written ``<P>``."""
    text = tokenizer.decode(row[row != tokenizer.pad_token_id])
    return re.sub(f"({re.escape(image)})+", "<P>", text)


def _text(tokenizer, words) -> str:
    """A prompt's text, spaces aside (a BPE drops some blank tokens with its special ones)."""
    return "".join(tokenizer.convert_tokens_to_string(words).split())


# Four rows: three images of different sizes back to back, then the question; the question, then one image;
# an image, words, a second image, the question; the question, then two images back to back (nothing after
# the first image but the second's tokens: the question before it is the prompt). Padded on the left.
ROWS = ["{0}{0}{0}" + AFTER, BEFORE + "{0}", "{0}" + BETWEEN + "{0}" + AFTER, BEFORE + "{0}{0}"]
QUESTIONS = [AFTER] * 3 + [BEFORE] + [BETWEEN + AFTER] * 2 + [BEFORE] * 2  # each image's, in order


def _per_image(ids: torch.Tensor, mask: torch.Tensor, image: int, start: int) -> list[tuple[int, int]]:
    """(row, count) of the ``image`` tokens from each begin-of-image marker ``start`` to the next one (or the
    row's end): the tokens the processor wrote for each image, its row breaks and column tokens aside."""
    counts = []
    for r, (row, attended) in enumerate(zip(ids.tolist(), mask.tolist())):
        begins = [i for i, (t, a) in enumerate(zip(row, attended)) if a and t == start] + [len(row)]
        counts += [(r, row[a:b].count(image)) for a, b in zip(begins, begins[1:])]
    return counts


@torch.no_grad()
def _check(model, processor, tokenizer, inputs, counts):
    """Selections over exactly ``counts`` (keep-all logits bit for bit), each image at its own budget; the
    prompts with ``tokenizer=`` are the question's words (generate()'s prefill selects the same images with the
    same prompts); returns the prompts' text without a tokenizer, and prune()'s warnings."""
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == counts
    assert [s.order.numel() for s in selections] == [4] * len(counts)  # each image its own budget
    assert all(int(s.order.max()) < s.n_tokens for s in selections)
    # The question's words (spaces aside: where its BPE left a space a token alone, a tokenizer drops it).
    assert [_text(tokenizer, p) for p in prompts] == [_text(tokenizer, [q]) for q in QUESTIONS]
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert [(s.batch_row, s.n_tokens) for s in handle.last_selection] == counts
    return [tokenizer.convert_tokens_to_string(p) for p in untokenized], warned


def test_molmo2_images_of_different_sizes_back_to_back_are_budgeted_apart():
    """Molmo2's processor writes each image as its low-res view, ``<low_res_im_start>`` rows of patches each
    ended by ``<im_col>``, ``<im_end>``, then its high-res one between ``<im_start>`` and ``<im_end>``; images
    back to back have only ``<im_end><low_res_im_start>`` between them, no text. Each image (both views) is one
    selection over exactly its patch tokens (from ``image_grids``), in rows of one to three images; the prompt
    is the question, with or without a tokenizer (its markers are typed in ``mm_token_type_ids``; without a
    tokenizer the bos before a question written before its image stays), and prune() does not warn. Inputs
    without the token types: the same with a tokenizer; without one each image's last column token is question
    text (the one after the first image stands for a question written before it), and prune() warns."""
    model, processor, tokenizer = _molmo2([BEFORE + AFTER + BETWEEN])
    gen = torch.Generator().manual_seed(0)
    sizes = [[(30, 40), (40, 24), (16, 16)], [(24, 24)], [(40, 24), (30, 40)], [(16, 16), (30, 40)]]
    inputs = processor(text=[r.format("<|image|>") for r in ROWS], padding=True, return_tensors="pt",
                       images=[[_photo(h, w, gen) for h, w in row] for row in sizes])
    patch, start = (tokenizer.convert_tokens_to_ids(t) for t in ("<im_patch>", "<low_res_im_start>"))
    views = "<low_res_im_start><P><im_col><P><im_col><im_end><im_start>"
    assert _layout(tokenizer, inputs["input_ids"][0], "<im_patch>") == (
        f"<s>{views}<P><im_col><P><im_col><P><im_col><im_end>{views}<P><im_col><P><im_col><P><im_col><im_end>"
        f"{views}<P><im_col><P><im_col><im_end>{AFTER}")  # back to back: <im_end><low_res_im_start>, no text
    counts = _per_image(inputs["input_ids"], inputs["attention_mask"], patch, start)
    grids = inputs["image_grids"]
    assert [c for _, c in counts] == (grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).tolist()
    assert counts == [(0, 13), (0, 10), (0, 8), (1, 13), (2, 10), (2, 13), (3, 8), (3, 13)]
    untokenized, warned = _check(model, processor, tokenizer, inputs, counts)
    assert untokenized == [AFTER] * 3 + [f"<s>{BEFORE}"] + [BETWEEN + AFTER] * 2 + [f"<s>{BEFORE}"] * 2
    assert warned == []
    # Without the token types: with a tokenizer the same selections and prompts, no warning; without one, the
    # column token after each image's last row is question text (one an image after the first), and it warns.
    untyped = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    for given in (processor, None):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            with zspa_kernels.prune(model, keep=4, tokenizer=given) as handle:
                model(**untyped)
        warned = [str(w.message) for w in caught if str(w.message).startswith("prune()")]
        assert [(s.batch_row, s.n_tokens) for s in handle.last_selection] == counts
        prompts = [tokenizer.convert_tokens_to_string(_prompt_words(tokenizer, inputs, s)) for s in handle.last_selection]
        if given is not None:
            assert [_text(tokenizer, [p]) for p in prompts] == [_text(tokenizer, [q]) for q in QUESTIONS] and not warned
        else:
            col = "<im_col>"
            assert prompts == [col * 3 + AFTER] * 3 + [col] + [f"{col}{BETWEEN}{col}{AFTER}"] * 2 + [col * 2] * 2
            assert len(warned) == 1 and "Molmo2 inputs without mm_token_type_ids" in warned[0]


def test_emu3_images_of_different_sizes_back_to_back_are_budgeted_apart():
    """Emu3's processor writes each image as ``<|image start|>`` its grid size (``2*3``, text) ``<|image
    token|>`` its ``h * (w + 1)`` placeholders (a line's end-of-line placeholder each) ``<|extra_201|><|image
    end|>``; images back to back have ``<|extra_201|><|image end|><|image start|>3*2<|image token|>`` between
    their placeholders: each image is one selection over exactly its placeholders, in rows of one to three
    images. With a tokenizer the prompt is the question (the second and third images' sizes are theirs,
    decoded); without one the markers and sizes after the first image stay, and prune() warns."""
    model, processor, tokenizer = _emu3(BEFORE + AFTER + BETWEEN)
    gen = torch.Generator().manual_seed(0)
    sizes = [[(16, 24), (24, 16), (16, 16)], [(16, 16)], [(24, 16), (16, 24)], [(16, 16), (16, 24)]]
    inputs = processor(text=[r.format("<image>") for r in ROWS], padding=True, return_tensors="pt",
                       images=[[_photo(h, w, gen) for h, w in row] for row in sizes])
    end = "<|extra_201|><|image end|>"
    assert _layout(tokenizer, inputs["input_ids"][0], "<image>") == (
        f"<s><|image start|>2*3<|image token|><P>{end}<|image start|>3*2<|image token|><P>{end}"
        f"<|image start|>2*2<|image token|><P>{end}{AFTER}")
    start = tokenizer.convert_tokens_to_ids("<|image start|>")
    counts = _per_image(inputs["input_ids"], inputs["attention_mask"], tokenizer.image_token_id, start)
    assert counts == _runs(inputs["input_ids"], tokenizer.image_token_id)  # one run an image
    assert counts == [(0, 2 * 4), (0, 3 * 3), (0, 2 * 3), (1, 2 * 3), (2, 3 * 3), (2, 2 * 4), (3, 2 * 3), (3, 2 * 4)]
    untokenized, warned = _check(model, processor, tokenizer, inputs, counts)
    b2b = f"{end}<|image start|>3*2<|image token|>{end}<|image start|>2*2<|image token|>{end}{AFTER}"
    assert untokenized == [b2b] * 3 + [end] + [f"{end}{BETWEEN}<|image start|>2*3<|image token|>{end}{AFTER}"] * 2 + [
        f"{end}<|image start|>2*3<|image token|>{end}"] * 2  # the question before its images: the second's size
    assert len(warned) == 1 and "Emu3 processors write image markers" in warned[0]


def test_apertus1p5_images_of_different_sizes_back_to_back_are_budgeted_apart():
    """Apertus 1.5's processor writes each image as ``<|image_start|>`` its grid size (``3*4``, text)
    ``<|image_wrapper|>`` its rows of codes joined by ``<|eol|>``, ``<|image_end|>``; images back to back have
    ``<|image_end|><|image_start|>4*2<|image_wrapper|>`` between their codes: each image is one selection
    over exactly its codes (from ``image_sizes``; its end-of-line tokens inside it), in rows of one to three
    images. With a tokenizer the prompt is the question (the later images' sizes are theirs, decoded); without
    one the markers and sizes after the first image stay (the end-of-line tokens do not), and prune() warns."""
    model, processor, tokenizer = _apertus1p5(BEFORE + AFTER + BETWEEN)
    gen = torch.Generator().manual_seed(0)
    sizes = [[(6, 8), (8, 4), (4, 4)], [(4, 4)], [(8, 4), (6, 8)], [(4, 4), (6, 8)]]
    inputs = processor(text=[r.format("<|image|>") for r in ROWS], padding=True, return_tensors="pt",
                       images=[[_photo(h, w, gen) for h, w in row] for row in sizes])
    assert _layout(tokenizer, inputs["input_ids"][0], "<|image|>") == (
        "<|image_start|>3*4<|image_wrapper|><P><|eol|><P><|eol|><P><|image_end|>"
        "<|image_start|>4*2<|image_wrapper|><P><|eol|><P><|eol|><P><|eol|><P><|image_end|>"
        f"<|image_start|>2*2<|image_wrapper|><P><|eol|><P><|image_end|>{AFTER}")
    image, start = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image|>", "<|image_start|>"))
    counts = _per_image(inputs["input_ids"], inputs["attention_mask"], image, start)
    assert counts == [(0, 3 * 4), (0, 4 * 2), (0, 2 * 2), (1, 2 * 2), (2, 4 * 2), (2, 3 * 4), (3, 2 * 2), (3, 3 * 4)]
    untokenized, warned = _check(model, processor, tokenizer, inputs, counts)
    b2b = "<|image_end|><|image_start|>4*2<|image_wrapper|><|image_end|><|image_start|>2*2<|image_wrapper|><|image_end|>"
    assert untokenized == [b2b + AFTER] * 3 + ["<|image_end|>"] + [
        f"<|image_end|>{BETWEEN}<|image_start|>3*4<|image_wrapper|><|image_end|>{AFTER}"] * 2 + [
        "<|image_end|><|image_start|>3*4<|image_wrapper|><|image_end|>"] * 2  # the question before its images: gone
    assert len(warned) == 1 and "Apertus 1.5 processors write image markers" in warned[0]
