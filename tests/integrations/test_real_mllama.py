"""prune() on the layout that transformers' own ``MllamaProcessor`` (Llama 3.2 Vision) writes, not the tiny
builder's imitation of it. The processor is the real class (its image processor: 16 px tiles, at most 4 an
image), built offline around a word-level tokenizer holding ``<|image|>`` and the Llama 3 chat markers; the model
is the tiny builder's (``CROSS_ATTENTION_BUILDERS["mllama"]``: 4 px patches, 17 tokens a tile with its class
token), rebuilt on that tokenizer's ids, its ``eos_token_id`` a list holding ``<|eot_id|>`` as the checkpoints'.

The processor writes one ``<|image|>`` token an image (``<|begin_of_text|>`` after the images a row starts
with, before the rest); the image's tiles reach the text model's cross-attention layers only. Its
``cross_attention_mask`` ``(B, L, images, tiles)`` marks the positions that see each image, from its token up to
the next image's (to the row's end for the last, and for images back to back), and its real tiles only; a row of
fewer images is padded with images of one tile (``aspect_ratio_mask`` ``[1, 0, 0, 0]``, ``aspect_ratio_ids`` 0)
that no position sees, and every image with zero tiles up to ``max_image_tiles``. What must hold: each image a
selection of its own budget over its real tiles' tokens (``tiles x 17``, the tiles its aspect ratio gives; no
padding tile or padding image), its prompt the row's question alone with ``tokenizer=`` (the text after its
first image, else before it; the chat template's markers, role words and newlines left out), keep-all logits bit
for bit, generate()'s prefill selecting with the same prompts. The family is not flagged ``unnamed_markers``: the
processor writes no marker but ``<|image|>`` and ``<|begin_of_text|>``, both named by the config, so without a
tokenizer prune() does not warn, and the prompts are the same where no chat template wrote the text."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.spec import keep_budget  # noqa: E402

from .test_real_processors import (  # noqa: E402
    _image_processor,
    _photo,
    _prompt_words,
    _prompts_and_warnings,
    _token_layout,
    _tokenizer,
)

IMAGE, BOS = "<|image|>", "<|begin_of_text|>"
HEADERS, EOT = ["<|start_header_id|>", "<|end_header_id|>"], "<|eot_id|>"
MARKERS = [IMAGE, *HEADERS, EOT, "<|python_tag|>"]
TILE, PATCH = 16, 4
PATCHES = (TILE // PATCH) ** 2 + 1  # a tile's patches and its class token
BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
# The tile grids (rows, columns) of the photos' (h, w): as the image processor fits them to 16 px tiles.
GRIDS = {(16, 40): (1, 3), (40, 40): (2, 2), (16, 16): (1, 1), (40, 16): (3, 1), (16, 32): (1, 2)}

# Llama 3.2 Vision Instruct's chat template, its part for a conversation with images and no system message (no
# system block then, no tools): the bos, each turn's header, ``"\n\n"``, the content, ``<|eot_id|>``, then the
# generation prompt.
LLAMA_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def _mllama():
    """The real MllamaProcessor and the tiny builder's Llama 3.2 Vision on its tokenizer's ids."""
    if not hasattr(transformers, "MllamaProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama 3.2 Vision")
    from zspa_kernels.integrations.transformers.tiny import CROSS_ATTENTION_BUILDERS

    tokenizer = _tokenizer(MARKERS, plain=["\n\n"], bos=BOS, words=("user", "assistant"))
    processor = transformers.MllamaProcessor(
        image_processor=_image_processor("MllamaImageProcessor", size={"height": TILE, "width": TILE},
                                         max_image_tiles=4),
        tokenizer=tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    tiny = CROSS_ATTENTION_BUILDERS["mllama"]()
    config = tiny.model.config.to_dict()
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, ids(EOT)])
    config.update(image_token_index=ids(IMAGE))
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    assert model.model.vision_model.num_patches == PATCHES
    with torch.no_grad():  # its tanh gates start at 0: the images would not reach the text (as the tiny builder)
        for name, param in model.named_parameters():
            if param.numel() == 1 and "gate" in name.rsplit(".", 1)[-1]:
                param.fill_(1.0)
    return model, processor, tokenizer


def _inputs(processor, texts: list[str], sizes: list[list[tuple[int, int]]], **kwargs):
    gen = torch.Generator().manual_seed(0)
    images = [[_photo(h, w, gen) for h, w in row] for row in sizes]
    return processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)


def _images(inputs, tokenizer, sizes) -> list[tuple[int, int, int]]:
    """(row, image, tokens) of every ``<|image|>`` token the processor wrote, in order: its photo's tiles
    (the grid its size gives) times 17; and the processor's tile inputs checked against the same grids."""
    ids, image = inputs["input_ids"], tokenizer.convert_tokens_to_ids(IMAGE)
    out = []
    for r, row in enumerate(sizes):
        assert int((ids[r] == image).sum()) == len(row)
        for i, size in enumerate(row):
            h, w = GRIDS[size]
            out.append((r, i, h * w * PATCHES))
            assert inputs["aspect_ratio_mask"][r, i].tolist() == [1] * (h * w) + [0] * (4 - h * w)
            assert inputs["cross_attention_mask"][r, :, i, h * w:].sum() == 0  # no position sees a padding tile
        for i in range(len(row), inputs["aspect_ratio_ids"].shape[1]):  # the processor's padding images
            assert inputs["aspect_ratio_ids"][r, i] == 0 and inputs["aspect_ratio_mask"][r, i].tolist() == [1, 0, 0, 0]
            assert inputs["cross_attention_mask"][r, :, i].sum() == 0  # seen by no position
    return out


def _seen_by(inputs, tokenizer, r: int, i: int) -> list[str]:
    """The tokens of row ``r`` that see image ``i`` (the processor's cross-attention mask), padding aside."""
    seen = inputs["cross_attention_mask"][r, :, i].any(-1) & inputs["attention_mask"][r].bool()
    return tokenizer.convert_ids_to_tokens(inputs["input_ids"][r][seen].tolist())


@torch.no_grad()
def test_mllama_one_image_a_row_is_one_budget_over_its_real_tiles():
    """One image a row: row 0's question before its image (``<|begin_of_text|>`` the question ``<|image|>``; the
    image's token alone sees it), row 1's after it (``<|image|><|begin_of_text|>`` the question). Each image is one
    selection of ``keep`` tokens (a fraction of its real tiles' tokens: 3 and 4 tiles of 4 slots, the padding
    tiles left out), its prompt the question, with or without a tokenizer (no warning: no unnamed marker)."""
    model, processor, tokenizer = _mllama()
    sizes = [[(16, 40)], [(40, 40)]]
    inputs = _inputs(processor, [f"{BEFORE} {IMAGE}", f"{IMAGE} {AFTER}"], sizes)
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == [BOS, *BEFORE.split(), f"{IMAGE}*1"]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == [f"{IMAGE}*1", BOS, *AFTER.split()]
    assert inputs["pixel_values"].shape[:3] == (2, 1, 4)  # a row's images, each padded to 4 tiles
    assert _seen_by(inputs, tokenizer, 0, 0) == [IMAGE] and _seen_by(inputs, tokenizer, 1, 0) == [
        IMAGE, BOS, *AFTER.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.image_index, s.n_tokens) for s in selections] == _images(inputs, tokenizer, sizes) == [
        (0, 0, 3 * PATCHES), (1, 0, 4 * PATCHES)]
    assert [s.order.numel() for s in selections] == [4, 4]
    assert prompts == untokenized == [BEFORE.split(), AFTER.split()]
    assert not warned
    with zspa_kernels.prune(model, keep=0.25, tokenizer=processor) as handle:
        model(**inputs)
    assert [s.order.numel() for s in handle.last_selection] == [keep_budget(0.25, s.n_tokens)
                                                                for s in handle.last_selection] == [13, 17]


@torch.no_grad()
def test_mllama_two_images_in_a_row_each_have_their_own_budget():
    """Two images a row: row 0's with words between them (the first seen by the words up to the second's token,
    the second by the rest of the row), row 1's back to back (both seen by the rest of the row, from their
    tokens on). Each image is a selection over its own real tiles (3 and 1, 3 and 4); both
    images of a row are ranked by the row's question, the text after its first image (README: "Where an image
    is", ``prompt="question"``), in generate() too."""
    model, processor, tokenizer = _mllama()
    sizes = [[(16, 40), (16, 16)], [(40, 16), (40, 40)]]
    inputs = _inputs(processor, [f"{IMAGE} {BETWEEN} {IMAGE} {AFTER}", f"{IMAGE}{IMAGE} {AFTER}"], sizes)
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == [f"{IMAGE}*1", BOS, *BETWEEN.split(), f"{IMAGE}*1",
                                                          *AFTER.split()]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == [f"{IMAGE}*2", BOS, *AFTER.split()]
    assert _seen_by(inputs, tokenizer, 0, 0) == [IMAGE, BOS, *BETWEEN.split()]
    assert _seen_by(inputs, tokenizer, 0, 1) == [IMAGE, *AFTER.split()]
    assert _seen_by(inputs, tokenizer, 1, 1) == [IMAGE, BOS, *AFTER.split()]
    assert _seen_by(inputs, tokenizer, 1, 0) == [IMAGE, *_seen_by(inputs, tokenizer, 1, 1)]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.image_index, s.n_tokens) for s in selections] == _images(inputs, tokenizer, sizes) == [
        (0, 0, 3 * PATCHES), (0, 1, PATCHES), (1, 0, 3 * PATCHES), (1, 1, 4 * PATCHES)]
    assert [s.order.numel() for s in selections] == [4] * 4
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == untokenized == [question, question, AFTER.split(), AFTER.split()]
    assert not warned
    unpatched = model(**inputs).logits
    with zspa_kernels.prune(model, keep=4, tokenizer=processor):
        assert not torch.allclose(model(**inputs).logits, unpatched, atol=1e-3)  # the dropped tokens were seen


@torch.no_grad()
def test_mllama_rows_of_other_image_and_tile_counts_pad_and_keep_the_question_of_the_chat_template():
    """A batch written by the chat template (``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n``
    the content ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``): row 0 the question, then an
    image of 3 tiles; row 1 an image of 4 tiles, words, an image of 1 tile, the question. Row 0 is padded with an
    image of one tile that no position sees (no selection), every image's tiles to 4. With ``tokenizer=`` the
    processor (which holds the template) each prompt is the question alone. Without one prune() does not warn
    (the processor wrote no marker the config does not name; ``<|eot_id|>`` is one of its eos ids), and the
    template's headers, role word and newline are question text: row 0's question, before its image, gives way
    to the generation prompt after it; row 1's keeps them after its own words."""
    model, processor, tokenizer = _mllama()
    processor.chat_template = LLAMA_TEMPLATE

    def text(*parts):
        content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [text(BEFORE, None), text(None, BETWEEN, None, AFTER)]
    user, assistant = [BOS, HEADERS[0], "user", HEADERS[1], "\n\n"], [HEADERS[0], "assistant", HEADERS[1], "\n\n"]
    assert texts[0] == f"{BOS}{HEADERS[0]}user{HEADERS[1]}\n\n{BEFORE}{IMAGE}{EOT}{HEADERS[0]}assistant{HEADERS[1]}\n\n"
    sizes = [[(16, 40)], [(40, 40), (16, 16)]]
    inputs = _inputs(processor, texts, sizes)
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == [*user, *BEFORE.split(), f"{IMAGE}*1", EOT, *assistant]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == [*user, f"{IMAGE}*1", *BETWEEN.split(), f"{IMAGE}*1",
                                                          *AFTER.split(), EOT, *assistant]
    assert inputs["pixel_values"].shape[:3] == (2, 2, 4) and inputs["aspect_ratio_ids"][0, 1] == 0
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.image_index, s.n_tokens) for s in selections] == _images(inputs, tokenizer, sizes) == [
        (0, 0, 3 * PATCHES), (1, 0, 4 * PATCHES), (1, 1, PATCHES)]
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [BEFORE.split(), question, question]
    assert not warned
    # <|eot_id|>: an eos id of the config, no question either way.
    assert untokenized == [assistant, question + assistant, question + assistant]
    # The tokenizer alone (no template): the role word of the generation prompt is plain text, and stays.
    with zspa_kernels.prune(model, keep=4, tokenizer=tokenizer) as handle:
        model(**inputs)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == [
        ["assistant"], question + ["assistant"], question + ["assistant"]]


@torch.no_grad()
def test_mllama_a_training_call_selects_as_generation():
    """With ``labels`` marking each row's answer (its words and eos, the rest -100, as a collator writes them),
    the answer is no prompt: each image keeps the tokens that the question alone gives; keep-all leaves the loss
    bit for bit."""
    model, processor, tokenizer = _mllama()
    sizes = [[(16, 40)], [(40, 40)]]
    answer = ["w9 w10 </s>", "w11 </s>"]
    prompt = _inputs(processor, [f"{BEFORE} {IMAGE}", f"{IMAGE} {AFTER}"], sizes)
    train = _inputs(processor, [f"{BEFORE} {IMAGE} {answer[0]}", f"{IMAGE} {AFTER} {answer[1]}"], sizes)
    labels = torch.full_like(train["input_ids"], -100)
    for r, a in enumerate(answer):
        n = len(a.split())
        labels[r, -n:] = train["input_ids"][r, -n:]
    unpatched = model(**train, labels=labels).loss
    with zspa_kernels.prune(model, keep=1.0, tokenizer=processor):
        assert torch.equal(model(**train, labels=labels).loss, unpatched)
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        pruned = model(**train, labels=labels).loss
        trained = handle.last_selection
        model(**prompt)
        asked = handle.last_selection
    assert [_prompt_words(tokenizer, train, s) for s in trained] == [BEFORE.split(), AFTER.split()]
    assert all(torch.equal(t.kept, s.kept) and torch.equal(t.order, s.order) for t, s in zip(trained, asked))
    assert torch.isfinite(pruned) and not torch.equal(pruned, unpatched)
