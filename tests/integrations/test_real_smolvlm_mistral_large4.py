"""prune() on the layouts that the real SmolVLM and Idefics3 processors write for split images (several of
different sizes in one row, a batch of rows with different image counts, unsplit images back to back; SmolVLM's
chat template), and that
the real Pixtral processor writes for Mistral Large 4 (several images in a row, a batch). The processors are
the real classes, built offline around a word-level tokenizer holding each family's markers (as in
test_real_processors.py, whose helpers these are)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (  # noqa: E402
    _idefics3, _image_processor, _photo, _prompts_and_warnings, _retokenized, _runs, _text, _token_layout, _tokenizer,
    _vision)

BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
TILES = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS_MARKERS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def _smolvlm(words: tuple = ()):
    """A tiny random SmolVLM with the real processor classes (as Idefics3's: 96 px images split into 32 px
    tiles of 4 px patches, pixel-shuffled 2x2: 16 tokens a tile, and the global view)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(IDEFICS_MARKERS + ["<video>", "<|im_start|>"] + TILES, plain=["\n"], words=words)
    sizes = dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(
        image_processor=_image_processor("SmolVLMImageProcessor", do_image_splitting=True, **sizes),
        video_processor=transformers.SmolVLMVideoProcessor(**sizes), tokenizer=tokenizer, image_seq_len=16)
    config = transformers.SmolVLMConfig(
        vision_config=_vision(image_size=32, patch_size=4), text_config=_text(tokenizer, model_type="llama"),
        image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id, scale_factor=2)
    torch.manual_seed(0)
    return transformers.SmolVLMForConditionalGeneration(config).eval(), processor, tokenizer


def _tiles(rows: int, cols: int) -> list[str]:
    """The tokens the processor writes for an image of ``rows`` x ``cols`` tiles (0 x 0: unsplit)."""
    tile = lambda label: ["<fake_token_around_image>", label, "<image>*16"]  # noqa: E731
    out = []
    for r in range(rows):
        out += [t for c in range(cols) for t in tile(f"<row_{r + 1}_col_{c + 1}>")] + ["\n"]
    return out + (["\n"] if rows else []) + tile("<global-img>") + ["<fake_token_around_image>"]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_split_images_of_different_sizes_are_budgeted_per_tile(family, split):
    """Idefics3's and SmolVLM's processors write a split image as its tiles row by row, each
    ``<fake_token_around_image><row_r_col_c>`` and 16 ``<image>`` tokens, a newline after each row, a second
    one, then ``<fake_token_around_image><global-img>``, the global view's 16 tokens and
    ``<fake_token_around_image>``; unsplit (``do_image_splitting=False``), the global view alone, so a row's
    images stand back to back, marker to marker. Row 0 holds three images of different sizes (3x2, 1x3, 3x3
    tiles), the question between them and after; row 1 one image after its question. Every tile and every
    global view is one selection, its own budget, over exactly the 16 tokens the processor wrote; with
    ``tokenizer=`` the prompts are exactly the question words (the tile labels, ``<global-img>`` and the
    newlines are none), in generate() too, keep-all logits bit for bit. Without a tokenizer prune() warns (the
    family is flagged ``unnamed_markers``) and the markers after a row's first image are question text: a
    question written before its image is ranked by the markers after it alone."""
    model, processor, tokenizer = _idefics3() if family == "idefics3" else _smolvlm()
    processor.image_processor.do_image_splitting = split  # (4.57's processor takes no do_image_splitting= call)
    gen = torch.Generator().manual_seed(0)
    photos = [[_photo(64, 40, gen), _photo(16, 90, gen), _photo(80, 80, gen)], [_photo(40, 64, gen)]]
    inputs = processor(text=[f"<image> {BETWEEN} <image><image> {AFTER}", f"{BEFORE} <image>"], images=photos,
                       padding=True, return_tensors="pt")
    grids = [(3, 2), (1, 3), (3, 3), (2, 3)] if split else [(0, 0)] * 4
    layout = [_token_layout(tokenizer, inputs, r, "<image>") for r in range(2)]
    assert layout[0] == _tiles(*grids[0]) + BETWEEN.split() + _tiles(*grids[1]) + _tiles(*grids[2]) + AFTER.split()
    assert layout[1] == BEFORE.split() + _tiles(*grids[3])
    counts = [r * c + 1 for r, c in grids]  # each image's tiles and its global view
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert runs == [(0, 16)] * sum(counts[:3]) + [(1, 16)] * counts[3]

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert all(s.order.numel() == 4 for s in selections)  # each tile its own budget
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [question] * sum(counts[:3]) + [BEFORE.split()] * counts[3]
    assert len(warned) == 1 and "tokenizer=" in warned[0]
    # Without a tokenizer: all of a row's text after its first run of image tokens, markers and newlines too;
    # row 1's question, before its image, gives way to the markers after its first tile (unsplit: the end marker).
    after_first = [[t for t in row[row.index("<image>*16") + 1:] if t != "<image>*16"] for row in layout]
    assert untokenized == [after_first[0]] * sum(counts[:3]) + [after_first[1]] * counts[3]
    assert after_first[1] == [t for t in _tiles(*grids[3])[3:] if t != "<image>*16"]


def test_smolvlm_chat_template_text_and_tile_markers_are_no_question():
    """SmolVLM's default chat template writes ``<|im_start|>User:``, the message (text and ``<image>`` in its
    order), ``<end_of_utterance>``, a newline and ``Assistant:``; the processor expands the image into its tiles
    and global view. With ``tokenizer=`` (the processor, holding the template) the prompts are exactly the
    question words, written before the image or after it: not ``User:``/``Assistant:``, the markers or the
    newlines. Without one the template's words, markers and newlines after the image's first tile are question
    text (prune() warns), and a question written before the image is no part of its prompt."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    model, processor, tokenizer = _smolvlm(words=("User:", "Assistant:"))
    processor.chat_template = DEFAULT_CHAT_TEMPLATE
    question = "w4 w5 w6"
    texts = [processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
             for parts in ([{"type": "text", "text": question}, {"type": "image"}],
                           [{"type": "image"}, {"type": "text", "text": question}])]
    assert texts == [f"<|im_start|>User: {question}<image><end_of_utterance>\nAssistant:",
                     f"<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(40, 64, gen)], [_photo(64, 40, gen)]], padding=True,
                       return_tensors="pt")
    end = ["<end_of_utterance>", "\n", "Assistant:"]
    layout = [_token_layout(tokenizer, inputs, r, "<image>") for r in range(2)]
    assert layout == [["<|im_start|>", "User:", *question.split(), *_tiles(2, 3), *end],
                      ["<|im_start|>", "User:", *_tiles(3, 2), *question.split(), *end]]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * 7 + [(1, 16)] * 7
    assert prompts == [question.split()] * 14
    assert len(warned) == 1 and "tokenizer=" in warned[0]
    after_first = [[t for t in row[row.index("<image>*16") + 1:] if t != "<image>*16"] for row in layout]
    assert untokenized == [after_first[0]] * 7 + [after_first[1]] * 7
    assert not set(question.split()) & set(after_first[0]) and after_first[0][-3:] == end


PIXTRAL_MARKERS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]


def _mistral_large4():
    """The real PixtralProcessor (Mistral Large 4's: 2 px patches merged 2x2, a token per 4x4 pixels, images of at
    most 16 px) and the tiny builder's Mistral Large 4 on this tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "mistral_large4" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Mistral Large 4")
    tokenizer = _tokenizer(PIXTRAL_MARKERS, plain=[])
    processor = transformers.PixtralProcessor(
        image_processor=_image_processor("PixtralImageProcessor", size={"longest_edge": 16}, patch_size=2),
        tokenizer=tokenizer, patch_size=2, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]")
    model = _retokenized("mistral_large4", tokenizer, dict(image_token_index="[IMG]", pad_token_id="<pad>"))
    return model, processor, tokenizer


def test_mistral_large4_images_are_one_budget_each_and_without_a_tokenizer_prune_warns_of_its_end_marker():
    """Pixtral's processor (Mistral Large 4's, as Mistral3's) writes an image as rows of ``[IMG]`` tokens, each
    row ended by ``[IMG_BREAK]``, the last by ``[IMG_END]`` (no config names either). Row 0 holds two images of
    different sizes (the question between and after them), row 1 one image after its question: every image is
    one selection, its own budget, over all its ``[IMG]`` tokens (its row breaks inside it); with ``tokenizer=``
    the prompts are exactly the question words (no marker, no ``[/INST]``), in generate() too, keep-all logits
    bit for bit. Without one prune() warns (``unnamed_markers``) and the markers are question text: row 1's
    question, before its image, gives way to ``[IMG_END]`` and ``[/INST]``."""
    model, processor, tokenizer = _mistral_large4()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"[INST][IMG] {BETWEEN} [IMG] {AFTER}[/INST]", f"[INST]{BEFORE} [IMG][/INST]"],
                       images=[[_photo(20, 28, gen), _photo(12, 8, gen)], [_photo(28, 16, gen)]], padding=True,
                       return_tensors="pt")
    rows = lambda n, w: (([f"[IMG]*{w}", "[IMG_BREAK]"] * n)[:-1] + ["[IMG_END]"])  # noqa: E731  (n rows of w)
    assert _token_layout(tokenizer, inputs, 0, "[IMG]") == (
        ["[INST]"] + rows(3, 4) + BETWEEN.split() + rows(3, 2) + AFTER.split() + ["[/INST]"])
    assert _token_layout(tokenizer, inputs, 1, "[IMG]") == ["[INST]"] + BEFORE.split() + rows(4, 3) + ["[/INST]"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 12), (0, 6), (1, 12)]  # all of each image's [IMG]
    assert all(s.order.numel() == 4 for s in selections)  # each image its own budget
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [question, question, BEFORE.split()]
    assert len(warned) == 1 and "Mistral Large 4" in warned[0] and "tokenizer=" in warned[0]
    # Without a tokenizer: the end markers and [/INST] are question text (the row breaks are inside the images).
    row_0 = ["[IMG_END]", *BETWEEN.split(), "[IMG_END]", *AFTER.split(), "[/INST]"]
    assert untokenized == [row_0, row_0, ["[IMG_END]", "[/INST]"]]
