"""prune() on the layouts that transformers' own processors write for the LLaVA-layout families that read each
image's token count from their vision tower (``Family(..., image_token_counts=_tower_counts)``): LLaVA-1.5 on a
Pixtral tower with the real ``PixtralProcessor`` (Pixtral-12B), LightOnOCR with the real ``LightOnOcrProcessor``,
VipLLaVA and FastVLM with the real ``LlavaProcessor``. The processors are the real classes, built offline around
a word-level tokenizer holding each family's markers (the helpers of ``test_real_processors.py``); the models
are the tiny builders', rebuilt on that tokenizer's ids. A batch of two rows: row 0 holds the question, then two
images of different sizes back to back; row 1 an image, then the question. Each image is one selection (a
Pixtral image's rows, the row breaks between them, one budget), of the tokens the processor wrote for it alone;
keep-all is bit for bit, the prompts the question words, in generate() too."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (_image_processor, _photo, _prompts_and_warnings, _retokenized,  # noqa: E402
                                   _runs, _token_layout, _tokenizer)

BEFORE, AFTER = "w44 w39 w53 w0", "w43 w39 w7"
# (h, w) of the photos: row 0's two, back to back, then row 1's one.
PHOTOS = [(16, 12), (8, 16), (12, 16)]


def _inputs(processor, texts: list[str], **kwargs):
    gen = torch.Generator().manual_seed(0)
    photos = [_photo(h, w, gen) for h, w in PHOTOS]
    inputs = processor(text=texts, images=[photos[:2], photos[2:]], padding=True, return_tensors="pt", **kwargs)
    inputs.pop("token_type_ids", None)  # 4.57's tokenizer returns them; these models take none
    return inputs, photos


@torch.no_grad()
def _generated(model, inputs, processor, tokenizer) -> list[tuple[int, int]]:
    """generate()'s prefill selections, ``(batch_row, n_tokens)`` (5.24+ hands it the images it encoded)."""
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [(s.batch_row, s.n_tokens) for s in handle.last_selection]


def _alone(processor, placeholder: str, photo, image_id: int) -> int:
    """The image tokens the processor writes for ``photo`` alone in a row."""
    return int((processor(text=[placeholder], images=[[photo]], return_tensors="pt")["input_ids"] == image_id).sum())


PIXTRAL_MARKERS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]


def test_llava_pixtral_images_are_budgeted_apart_and_their_break_and_end_markers_are_no_question():
    """Pixtral-12B (LLaVA on a Pixtral tower) with the real ``PixtralProcessor``: each image is ``h/p`` rows of
    ``w/p`` ``[IMG]`` tokens, each row ended by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` (markers no config
    names), so two images back to back are ``...[IMG_END][IMG]...[IMG_END]``. Each image is one selection of its
    ``(h/p)*(w/p)`` tokens (``image_sizes``), its row breaks inside it. With ``tokenizer=`` the prompts are the
    question words alone; without one the family is flagged ``unnamed_markers`` (a Pixtral tower), prune()
    warns, and the ``[IMG_END]`` markers and the template's ``[/INST]`` count as question text: the question
    written before its images gives way to them, as the README says."""
    tokenizer = _tokenizer(PIXTRAL_MARKERS, plain=[])
    processor = transformers.PixtralProcessor(  # 4 px patches, no merge: Pixtral-12B's layout, tiny
        image_processor=_image_processor("PixtralImageProcessor", size={"longest_edge": 16}, patch_size=4),
        tokenizer=tokenizer, patch_size=4, spatial_merge_size=1, image_token="[IMG]", image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]")
    model = _retokenized("llava_pixtral", tokenizer, dict(image_token_index="[IMG]", image_token_id="[IMG]",
                                                          pad_token_id="<pad>"))
    assert model.config.vision_config.model_type == "pixtral"
    image = model.config.image_token_id
    inputs, photos = _inputs(processor, [f"[INST]{BEFORE} [IMG][IMG][/INST]", f"[INST][IMG] {AFTER}[/INST]"])
    assert _token_layout(tokenizer, inputs, 0, "[IMG]") == [
        "[INST]", *BEFORE.split(), *["[IMG]*3", "[IMG_BREAK]"] * 3, "[IMG]*3", "[IMG_END]",
        "[IMG]*4", "[IMG_BREAK]", "[IMG]*4", "[IMG_END]", "[/INST]"]
    assert _token_layout(tokenizer, inputs, 1, "[IMG]") == [
        "[INST]", *["[IMG]*4", "[IMG_BREAK]"] * 2, "[IMG]*4", "[IMG_END]", *AFTER.split(), "[/INST]"]
    counts = [_alone(processor, "[IMG]", p, image) for p in photos]
    assert counts == [(h // 4) * (w // 4) for h, w in inputs["image_sizes"].tolist()] == [12, 8, 12]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 12), (0, 8), (1, 12)]
    assert _generated(model, inputs, processor, tokenizer) == [(0, 12), (0, 8), (1, 12)]
    assert sum(n for _, n in _runs(inputs["input_ids"], image)) == sum(counts)  # rows of 3 and 4 tokens
    assert prompts == [BEFORE.split()] * 2 + [AFTER.split()]
    assert len(warned) == 1 and "LLaVA-1.5 processors write image markers" in warned[0]
    assert "tokenizer=processor" in warned[0]
    assert untokenized == [["[IMG_END]", "[IMG_END]", "[/INST]"]] * 2 + [["[IMG_END]", *AFTER.split(), "[/INST]"]]


LIGHTON_MARKERS = dict(image_token="<|image_pad|>", image_break_token="<|vision_pad|>",
                       image_end_token="<|vision_end|>")


def test_lighton_ocr_images_back_to_back_are_budgeted_apart():
    """LightOnOCR with the real ``LightOnOcrProcessor``: it reads its markers from the tokenizer (``image_token``,
    ``image_break_token``, ``image_end_token``), but writes an image as its ``(h/p)*(w/p)`` image tokens alone
    (``p`` the patch times the 2x2 merge), no row breaks and no end marker, so two images back to back are one
    run of tokens. The counts from ``image_sizes`` cut it: each image one selection, of the tokens the processor
    writes for it alone. No marker stands in the text (the family is not flagged ``unnamed_markers``: nothing to
    warn of), so the prompts are the question words with or without a tokenizer."""
    if not hasattr(transformers, "LightOnOcrProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no LightOnOCR")
    image = LIGHTON_MARKERS["image_token"]
    tokenizer = _tokenizer(list(LIGHTON_MARKERS.values()), plain=[], bos="<|endoftext|>", **LIGHTON_MARKERS)
    processor = transformers.LightOnOcrProcessor(  # 2 px patches merged 2x2: a token per 4x4 pixels
        image_processor=_image_processor("PixtralImageProcessor", size={"longest_edge": 16}, patch_size=4),
        tokenizer=tokenizer, patch_size=2, spatial_merge_size=2)
    model = _retokenized("lighton_ocr", tokenizer, dict(image_token_id=image, pad_token_id="<pad>"))
    image_id = model.config.image_token_id
    inputs, photos = _inputs(processor, [f"{BEFORE} {image}{image}", f"{image} {AFTER}"])
    assert _token_layout(tokenizer, inputs, 0, image) == [*BEFORE.split(), f"{image}*20"]
    assert _token_layout(tokenizer, inputs, 1, image) == [f"{image}*12", *AFTER.split()]
    counts = [_alone(processor, image, p, image_id) for p in photos]
    assert counts == [(h // 4) * (w // 4) for h, w in inputs["image_sizes"].tolist()] == [12, 8, 12]
    assert _runs(inputs["input_ids"], image_id) == [(0, 20), (1, 12)]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 12), (0, 8), (1, 12)]
    assert _generated(model, inputs, processor, tokenizer) == [(0, 12), (0, 8), (1, 12)]
    assert warned == [] and prompts == untokenized == [BEFORE.split()] * 2 + [AFTER.split()]


@pytest.mark.parametrize("family", ["vipllava", "fast_vlm"])
def test_llava_processor_images_back_to_back_are_budgeted_apart(family):
    """VipLLaVA (a CLIP tower whose class token it drops: the ``default`` strategy, one more token counted and
    one taken off) and FastVLM (a convolutional tower, its feature map's cells: the ``full`` strategy) with the
    real ``LlavaProcessor``: every image is resized to the tower's square, so every image has the same count
    (16), and two images back to back are one run of 32 ``<image>`` tokens, which the family's counts (one image
    a ``pixel_values`` entry, the tokens shared out) cut in two. The ``\\n`` after row 1's image (an ordinary
    token) is no question with a tokenizer and stays without one (README: tokens that decode to whitespace);
    these families write no marker, so prune() warns of none."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if family not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    tokenizer = _tokenizer(["<image>"], plain=["\n"])
    # VipLLaVA: llava-hf's processor config (CLIP's patches, a class token, "default"); FastVLM: apple's (its
    # tower's 64 px cells, here 8 px, no class token, "full").
    side, patch, extra, strategy = (16, 4, 1, "default") if family == "vipllava" else (32, 8, 0, "full")
    images = _image_processor("CLIPImageProcessor", size={"shortest_edge": side},
                              crop_size={"height": side, "width": side})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                                            vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                                            image_token="<image>")
    model = _retokenized(family, tokenizer, dict(image_token_index="<image>", image_token_id="<image>",
                                                 pad_token_id="<pad>"))
    image = tokenizer.convert_tokens_to_ids("<image>")
    inputs, photos = _inputs(processor, [f"{BEFORE} <image><image>", f"<image>\n{AFTER}"])
    assert _token_layout(tokenizer, inputs, 0, "<image>") == [*BEFORE.split(), "<image>*32"]
    assert _token_layout(tokenizer, inputs, 1, "<image>") == ["<image>*16", "\n", *AFTER.split()]
    assert [_alone(processor, "<image>", p, image) for p in photos] == [16] * 3
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16), (0, 16), (1, 16)]
    assert _generated(model, inputs, processor, tokenizer) == [(0, 16), (0, 16), (1, 16)]
    assert warned == [] and prompts == [BEFORE.split()] * 2 + [AFTER.split()]
    assert untokenized == [BEFORE.split()] * 2 + [["\n", *AFTER.split()]]
