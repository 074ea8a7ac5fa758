"""prune() on the token layouts that transformers' own ERNIE-4.5-VL and PaddleOCR-VL processors write (transformers
5.x only), built offline around a word-level (or byte-level BPE) tokenizer holding each family's markers; the models are
the tiny builders', rebuilt on the tokenizer's ids. ERNIE-4.5-VL: each image, and each video (its frames merged in pairs:
one run), between start/end markers its config names; its chat template labels each ``Picture N:`` / ``Video N:``.
PaddleOCR-VL: each image between vision start/end markers its config names; its chat template writes a message's images
back to back, then its text."""
from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from .test_real_processors import (  # noqa: E402
    _bpe_tokenizer, _image_processor, _photo, _prompts_and_warnings, _retokenized, _runs, _token_layout, _tokenizer,
    _video)

ERNIE_MARKERS = dict(image_start_token="<|IMAGE_START|>", image_end_token="<|IMAGE_END|>",
                     image_token="<|IMAGE_PLACEHOLDER|>", video_start_token="<|VIDEO_START|>",
                     video_end_token="<|VIDEO_END|>", video_token="<|VIDEO_PLACEHOLDER|>")
ERNIE_IMAGE = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
ERNIE_VIDEO = "<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"
BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
# The layout of ERNIE-4.5-VL's chat template (the checkpoint's, as transformers' conversion writes it; written anew
# here, its thinking part left out): "User: ", each text as it is, each image "Picture N:" and its markers, each video
# "Video N:" and its markers, then the generation prompt "\nAssistant: ".
ERNIE_TEMPLATE = (
    "{%- set count = namespace(image=0, video=0) -%}{{- bos_token -}}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{{- 'User: ' -}}"
    "{%- for item in message.content -%}{%- if item.type == 'text' -%}{{- item.text -}}"
    "{%- elif item.type == 'image' -%}{%- set count.image = count.image + 1 -%}"
    "Picture {{ count.image }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{%- elif item.type == 'video' -%}{%- set count.video = count.video + 1 -%}"
    "Video {{ count.video }}:<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAssistant: ' -}}{%- endif -%}")


def _skip_without(name: str, builder: str):
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, name) or builder not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


def _named(tokenizer, markers: dict):
    """The tokenizer with the processor's markers named as the checkpoints' tokenizers name them (``image_token``,
    ``image_token_id``, ...): the processors read them there."""
    for name, token in markers.items():
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def _ernie(tokenizer, chat_template=None):
    """The real Ernie4_5_VLMoeProcessor (its image and video processors: 2 px patches merged 2x2, a video's frames
    in pairs; 64 to 256 pixels; no timestamps drawn on the frames, which needs a font file) and the tiny builder's
    model on this tokenizer's ids."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    _skip_without("Ernie4_5_VLMoeProcessor", "ernie4_5_vl_moe")
    sizes = dict(patch_size=2, merge_size=2, size={"shortest_edge": 4 * 4 * 4, "longest_edge": 16 * 16})
    processor = transformers.Ernie4_5_VLMoeProcessor(
        image_processor=_image_processor("Ernie4_5_VLMoeImageProcessor", **sizes),
        video_processor=transformers.Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False, **sizes),
        tokenizer=_named(tokenizer, ERNIE_MARKERS), chat_template=chat_template)
    ids = {f"{name}_id": token for name, token in ERNIE_MARKERS.items()}
    return _retokenized("ernie4_5_vl_moe", tokenizer, ids), processor


def _ernie_inputs(processor, text: list[str]):
    """Row 0: one image (12 tokens); row 1: two images (12 and 4 tokens) and a video of 4 frames (2 pairs of 8x8
    patches merged 2x2: 32 tokens)."""
    gen = torch.Generator().manual_seed(0)
    return processor(text=text, images=[[_photo(12, 16, gen)], [_photo(16, 12, gen), _photo(8, 8, gen)]],
                     videos=[_video(4, 16, 16)], padding=True, return_tensors="pt",
                     videos_kwargs=dict(do_sample_frames=False))


def test_ernie_images_and_videos_are_budgeted_as_its_family_says_and_their_markers_are_no_question():
    """Ernie4_5_VLMoeProcessor writes each image placeholder as ``h*w/4`` image tokens and each video placeholder as
    ``t*h*w/8`` video tokens (its frames merged in pairs, one run), inside the start/end markers the prompt (its chat
    template) writes around them, all named by its config: each image is one selection, each video one (README,
    "Where an image is"), their counts the runs the processor wrote; the prompts are the question words (and the
    words between an image and a video), with or without a tokenizer (no marker reaches them: no warning, the family
    is not flagged ``unnamed_markers``); keep-all bit for bit; generate() selects with the same prompts."""
    tokenizer = _tokenizer(list(ERNIE_MARKERS.values()), plain=["\n"])
    model, processor = _ernie(tokenizer)
    inputs = _ernie_inputs(processor, [f"{BEFORE} {ERNIE_IMAGE}",
                                       f"{ERNIE_IMAGE} {BETWEEN} {ERNIE_IMAGE} {ERNIE_VIDEO} {AFTER}"])
    assert [t for t in _token_layout(tokenizer, inputs, 1, "<|VIDEO_PLACEHOLDER|>") if "IMAGE_PLACEHOLDER" not in t] == [
        "<|IMAGE_START|>", "<|IMAGE_END|>", *BETWEEN.split(), "<|IMAGE_START|>", "<|IMAGE_END|>", "<|VIDEO_START|>",
        "<|VIDEO_PLACEHOLDER|>*32", "<|VIDEO_END|>", *AFTER.split()]
    # The MoE layers' token types: the markers go to the vision experts with their tokens.
    assert inputs["moe_mm_token_type_ids"][1].tolist() == [
        {"<|IMAGE_START|>": 1, "<|IMAGE_END|>": 1, "<|IMAGE_PLACEHOLDER|>": 1, "<|VIDEO_START|>": 2,
         "<|VIDEO_END|>": 2, "<|VIDEO_PLACEHOLDER|>": 2}.get(t, 0)
        for t in tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id, model.config.video_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, 12), (1, 12), (1, 4), (1, 32)]
    assert int(inputs["video_grid_thw"][0].prod()) // 8 == 32  # one video, one run, one selection
    questions = [BEFORE.split()] + [(BETWEEN + " " + AFTER).split()] * 3
    assert prompts == untokenized == questions and not warned


def test_ernie_chat_template_labels_are_no_question():
    """ERNIE-4.5-VL's chat template writes ``Picture N:`` before each image's start marker and ``Video N:`` before
    each video's, numbered in the conversation: plain text of its vocabulary, the image's or video's label, no
    question text. With ``tokenizer=`` (decoded) the labels go, as MiniCPM-V's image numbers do: a question after
    the first image is the prompt, not the question and the labels of the images and videos after it, and a question
    written before its image is not followed by ``Picture 1:``. Without a tokenizer the labels stay, and the
    generation prompt (``\\nAssistant: ``) stands for a question written before its image (README)."""
    before, between, after = "What is in the picture?", " Compare them. ", " Describe the video in one sentence."
    tokenizer = _bpe_tokenizer(list(ERNIE_MARKERS.values()),
                               [f"User: Picture 1: Picture 2: Video 1:\nAssistant: {before}{between}{after}"])
    model, processor = _ernie(tokenizer, chat_template=ERNIE_TEMPLATE)

    def text(*parts):
        content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in parts]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [text(before + " ", "image"), text("image", between, "image", " ", "video", after)]
    assert texts[1] == (f"<s>User: Picture 1:{ERNIE_IMAGE}{between}Picture 2:{ERNIE_IMAGE} Video 1:{ERNIE_VIDEO}{after}"
                        "\nAssistant: ")
    inputs = _ernie_inputs(processor, texts)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(
        inputs["input_ids"], model.config.image_token_id, model.config.video_token_id) == [(0, 12), (1, 12), (1, 4),
                                                                                            (1, 32)]
    decoded = [tokenizer.convert_tokens_to_string(p) for p in prompts]
    assert decoded == [" " + before] + [between + after.lstrip()] * 3
    assert [tokenizer.convert_tokens_to_string(p) for p in untokenized] == (
        ["\nAssistant: "] + [f"{between}Picture 2: Video 1:{after}\nAssistant: "] * 3)
    assert not warned


PADDLE_MARKERS = dict(image_token="<|IMAGE_PLACEHOLDER|>")
PADDLE_IMAGE = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
# The layout of PaddleOCR-VL's chat template (the checkpoint's; written anew here): "User: ", every image of the
# message (its markers) back to back, then its text, then the generation prompt "\nAssistant:\n".
PADDLE_TEMPLATE = (
    "{{- bos_token -}}{%- for message in messages -%}{%- if message.role == 'user' -%}{{- 'User: ' -}}"
    "{%- for item in message.content -%}{%- if item.type == 'image' -%}"
    "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{%- endif -%}{%- endfor -%}"
    "{%- for item in message.content -%}{%- if item.type == 'text' -%}{{- item.text -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '\\nAssistant:\\n' -}}{%- endif -%}")


def _paddleocr_vl(tokenizer, chat_template=None):
    """The real PaddleOCRVLProcessor (its image processor: 2 px patches merged 2x2, 64 to 256 pixels) and the tiny
    builder's model on this tokenizer's ids."""
    _skip_without("PaddleOCRVLProcessor", "paddleocr_vl")
    processor = transformers.PaddleOCRVLProcessor(
        image_processor=_image_processor("PaddleOCRVLImageProcessor", patch_size=2, merge_size=2,
                                         size={"shortest_edge": 4 * 4 * 4, "longest_edge": 16 * 16}),
        tokenizer=_named(tokenizer, PADDLE_MARKERS), chat_template=chat_template)
    model = _retokenized("paddleocr_vl", tokenizer, dict(
        image_token_id="<|IMAGE_PLACEHOLDER|>", vision_start_token_id="<|IMAGE_START|>",
        vision_end_token_id="<|IMAGE_END|>", video_token_id="<|video_pad|>"))
    return model, processor


def _paddle_inputs(processor, text: list[str]):
    """Row 0: one image (12 tokens); row 1: two (12 and 16 tokens)."""
    gen = torch.Generator().manual_seed(0)
    return processor(text=text, images=[[_photo(12, 16, gen)], [_photo(16, 12, gen), _photo(16, 16, gen)]],
                     padding=True, return_tensors="pt")


def test_paddleocr_vl_images_are_budgeted_apart_and_their_markers_are_no_question():
    """PaddleOCRVLProcessor writes each image placeholder as ``h*w/4`` image tokens, inside the vision start/end
    markers the prompt writes around it, named by its config: each image is one selection (two in a row, back to
    back as its chat template writes them, are two: the markers stand between their runs), its count the run the
    processor wrote; the prompts are the question words with or without a tokenizer (no warning); keep-all bit for
    bit; generate() selects with the same prompts."""
    tokenizer = _tokenizer(["<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>", "<|video_pad|>"], plain=["\n"])
    model, processor = _paddleocr_vl(tokenizer)
    inputs = _paddle_inputs(processor, [f"{BEFORE} {PADDLE_IMAGE}", f"{PADDLE_IMAGE}{PADDLE_IMAGE} {AFTER}"])
    image = "<|IMAGE_PLACEHOLDER|>"
    assert _token_layout(tokenizer, inputs, 1, image) == [
        "<|IMAGE_START|>", f"{image}*12", "<|IMAGE_END|>", "<|IMAGE_START|>", f"{image}*16", "<|IMAGE_END|>",
        *AFTER.split()]
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == model.config.image_token_id).long())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(
        inputs["input_ids"], model.config.image_token_id) == [(0, 12), (1, 12), (1, 16)]
    assert prompts == untokenized == [BEFORE.split(), AFTER.split(), AFTER.split()] and not warned


def test_paddleocr_vl_chat_template_text_is_no_question():
    """With its chat template (``User: ``, the images back to back, the text, ``\\nAssistant:\\n``) and
    ``tokenizer=`` (the processor, holding it), the template's text is no question: each image's prompt is the
    message's text alone. Without a tokenizer the generation prompt stays (README: template words)."""
    question = "OCR: what is the table's title?"
    tokenizer = _bpe_tokenizer(list(re.findall(r"<\|[^|]+\|>", PADDLE_IMAGE)) + ["<|video_pad|>"],
                               [f"User: \nAssistant:\n{question}"])
    model, processor = _paddleocr_vl(tokenizer, chat_template=PADDLE_TEMPLATE)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n + [
        {"type": "text", "text": question}]}], add_generation_prompt=True) for n in (1, 2)]
    assert texts[1] == f"<s>User: {PADDLE_IMAGE}{PADDLE_IMAGE}{question}\nAssistant:\n"
    inputs = _paddle_inputs(processor, texts)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 12), (1, 12), (1, 16)]
    text = tokenizer.convert_tokens_to_string
    assert [text(p) for p in prompts] == [question] * 3
    assert [text(p) for p in untokenized] == [question + "\nAssistant:\n"] * 3
    assert not warned  # no marker the config does not name: nothing to warn of
