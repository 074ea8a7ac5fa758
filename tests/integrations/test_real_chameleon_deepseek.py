"""prune() on the token layouts that transformers' own Chameleon and DeepSeek-VL (and DeepSeek-VL-Hybrid)
processors write, built offline (see test_real_processors.py): Chameleon's begin/end-of-image markers, which
no config names, around each image's placeholders and a separator token after every prompt (its chat mode);
DeepSeek-VL's bare runs of image placeholders, back to back where images are, inside its chat template's
system prompt, ``User:`` and ``Assistant:``."""
from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from .test_real_processors import (  # noqa: E402
    _bpe_tokenizer,
    _image_processor,
    _photo,
    _prompt_words,
    _prompts_and_warnings,
    _retokenized,
    _runs,
    _token_layout,
    _tokenizer,
)

import zspa_kernels  # noqa: E402

# Chameleon's tokenizer's markers: its processor's fixed begin/end-of-image tokens, the image placeholder, and
# the separator (its sep_token) that the processor appends to every prompt in chat mode.
CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE, CHAMELEON_SEP = "<racm3:break>", "<eoss>", "<image>", "<reserved08706>"
BEFORE_IMAGE, AFTER_IMAGES = "w44 w39 w53 w0", "w43 w39 w7"


def _chameleon():
    """The real ChameleonProcessor (8 px images, 16 placeholders an image) and the tiny builder's model on this
    tokenizer's ids: its VQ-VAE turns an 8 px image into a 4x4 grid of codes, which are words of the
    vocabulary (``IMGIMG<digits as letters>Z``, as Chameleon's tokenizer names them) that its config's
    ``vocabulary_map`` names with the image placeholder."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS, VQ_CODES

    digits = lambda i: "".join(chr(ord("A") + int(d)) for d in str(i))  # noqa: E731
    codes = tuple(f"IMGIMG{digits(i)}Z" for i in range(VQ_CODES))
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes Llama's tokenizer class only
    tokenizer = _tokenizer([CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE, CHAMELEON_SEP], plain=[], words=codes,
                           cls=transformers.LlamaTokenizerFast if v4 else None)
    tokenizer.sep_token = CHAMELEON_SEP
    processor = transformers.ChameleonProcessor(
        image_processor=_image_processor("ChameleonImageProcessor", size={"shortest_edge": 8},
                                         crop_size={"height": 8, "width": 8}),
        tokenizer=tokenizer, image_seq_length=16)
    tiny = BUILDERS["chameleon"]()
    ids = tokenizer.convert_tokens_to_ids
    config = tiny.model.config.to_dict()
    config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, image_token_id=ids(CHAMELEON_IMAGE),
                  vocabulary_map={t: ids(t) for t in (CHAMELEON_IMAGE, *codes)})
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    # As the tiny builder: a codebook of its encoder's scale (codes would repeat more)
    torch.nn.init.normal_(model.model.vqmodel.quantize.embedding.weight, std=0.01)
    return model, processor, tokenizer


def test_chameleon_images_are_budgeted_apart_and_its_markers_and_separator_are_no_question():
    """Chameleon's processor writes every image as ``<racm3:break>``, 16 ``<image>`` placeholders (its
    ``image_seq_length``; the model writes the image's VQ codes over them), ``<eoss>``, and in chat mode
    appends ``<reserved08706>`` (its ``sep_token``) to every prompt. The config names the placeholder alone
    (from its ``vocabulary_map``), so the family is flagged ``unnamed_markers``. Each image is one selection
    (a row's two, back to back between their markers, two); with ``tokenizer=`` the prompts are exactly the
    question words, before the image or after (keep-all logits bit for bit, generate() the same prompts).
    Without one prune() warns, and rightly: the end marker and the separator are question text, and a
    question written before its image is ranked by them alone."""
    model, processor, tokenizer = _chameleon()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {CHAMELEON_IMAGE}", f"{CHAMELEON_IMAGE} {CHAMELEON_IMAGE} {AFTER_IMAGES}"],
                       images=[[_photo(30, 30, gen)], [_photo(40, 24, gen), _photo(24, 40, gen)]], padding=True,
                       return_tensors="pt")
    around, bos = [CHAMELEON_BOI, f"{CHAMELEON_IMAGE}*16", CHAMELEON_EOI], tokenizer.bos_token  # 4.57's adds <s>
    layout = [[t for t in _token_layout(tokenizer, inputs, r, CHAMELEON_IMAGE) if t != bos] for r in range(2)]
    assert layout == [BEFORE_IMAGE.split() + around + [CHAMELEON_SEP],
                      around * 2 + AFTER_IMAGES.split() + [CHAMELEON_SEP]]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16), (1, 16), (1, 16)]
    assert prompts == [BEFORE_IMAGE.split(), AFTER_IMAGES.split(), AFTER_IMAGES.split()]
    assert len(warned) == 1 and "Chameleon" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: the end marker and the separator after the image; the second image's markers too.
    markers = [CHAMELEON_EOI, CHAMELEON_BOI, CHAMELEON_EOI]
    assert untokenized == [[CHAMELEON_EOI, CHAMELEON_SEP]] + [markers + AFTER_IMAGES.split() + [CHAMELEON_SEP]] * 2


# DeepSeek-VL's chat template (transformers' conversion script's, after deepseek-ai's conversation format):
# a default system prompt, "User: ", the message, "\n\n", then "Assistant:".
DEEPSEEK_VL_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}"
    "{% set i = 0 %}"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}"
    "User: "
    "{% elif message['role']|lower == 'assistant' %}"
    "Assistant:{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}"
    "{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<image_placeholder>"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}"
    "{{ text }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}"
    "{% else %}"
    "{{ seps[1] }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEEPSEEK_VL_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                      "that the user provides, and assist the user with a variety of tasks using natural language.")
DEEPSEEK_VL_IMAGE = "<image_placeholder>"
QUESTION_BEFORE, QUESTION_AFTER = "What is in the picture?", "Describe it in one sentence."


def _deepseek_vl(hybrid: bool):
    """The real DeepseekVLProcessor or DeepseekVLHybridProcessor (16 px images, and 64 px copies for the Hybrid's
    high-resolution tower; 16 placeholders an image) with its chat template, on a byte-level BPE (``Assistant:``
    two tokens, as the real tokenizer writes it), and the tiny builder's model on this tokenizer's ids."""
    name = "DeepseekVLHybrid" if hybrid else "DeepseekVL"
    tokenizer = _bpe_tokenizer([DEEPSEEK_VL_IMAGE], [f"{DEEPSEEK_VL_SYSTEM}\n\nUser: {QUESTION_BEFORE} {QUESTION_AFTER}"
                                                     "\n\nAssistant:"])
    tokenizer.image_token = DEEPSEEK_VL_IMAGE  # as the checkpoints' tokenizer names it
    sizes = dict(high_res_size={"height": 64, "width": 64}) if hybrid else {}
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=_image_processor(f"{name}ImageProcessor", size={"height": 16, "width": 16}, min_size=4, **sizes),
        tokenizer=tokenizer, num_image_tokens=16, chat_template=DEEPSEEK_VL_TEMPLATE)
    model = _retokenized("deepseek_vl_hybrid" if hybrid else "deepseek_vl", tokenizer,
                         dict(image_token_id=DEEPSEEK_VL_IMAGE))
    return model, processor, tokenizer


@pytest.mark.parametrize("hybrid", [False, True], ids=["deepseek_vl", "deepseek_vl_hybrid"])
def test_deepseek_vl_images_back_to_back_are_budgeted_apart_and_its_template_is_no_question(hybrid):
    """DeepSeek-VL's (and DeepSeek-VL-Hybrid's) processor writes every image as 16 ``<image_placeholder>``
    (its ``num_image_tokens``), nothing around it, so a row's two images back to back are one run of 32: each
    image is one selection of 16 (the tower's count). Its chat template writes a default system prompt,
    ``User: ``, the message, ``\\n\\n`` and ``Assistant:``: with ``tokenizer=`` (the processor, which holds the
    template) none of it is question text, so the prompts are the question's tokens, written before the image
    or after (keep-all logits bit for bit, generate() the same prompts). No marker that no config names: no
    warning. Without a tokenizer (or without the template) ``Assistant:`` stays, and a question written before
    its image is ranked by it alone (README: plain-text template words stay)."""
    model, processor, tokenizer = _deepseek_vl(hybrid)
    texts = [processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
             for parts in ([{"type": "text", "text": QUESTION_BEFORE}, {"type": "image"}],
                           [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION_AFTER}])]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(30, 30, gen)], [_photo(40, 24, gen), _photo(24, 40, gen)]],
                       padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # transformers 4.57's tokenizer output, which its model does not take
    assert ("high_res_pixel_values" in inputs) == hybrid

    def layout(row):
        text = tokenizer.decode(inputs["input_ids"][row][inputs["attention_mask"][row].bool()])
        return re.sub(f"({re.escape(DEEPSEEK_VL_IMAGE)})+", lambda m: f"<{len(m.group(0)) // len(DEEPSEEK_VL_IMAGE)}>",
                      text)

    system = f"{DEEPSEEK_VL_SYSTEM}\n\nUser: "
    assert [layout(0), layout(1)] == [f"{system}{QUESTION_BEFORE}<16>\n\nAssistant:",
                                      f"{system}<32>{QUESTION_AFTER}\n\nAssistant:"]
    image = model.config.image_token_id
    assert _runs(inputs["input_ids"], image) == [(0, 16), (1, 32)]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16), (1, 16), (1, 16)]
    text = tokenizer.convert_tokens_to_string
    assert [text(p).strip() for p in prompts] == [QUESTION_BEFORE, QUESTION_AFTER, QUESTION_AFTER]
    assert not warned
    # Without a tokenizer: the template's text after the image ("\n\n", then "Assistant:").
    assert [text(p) for p in untokenized] == ["\n\nAssistant:"] + [f"{QUESTION_AFTER}\n\nAssistant:"] * 2
    processor.chat_template = None  # the tokenizer alone: the blanks go, "Assistant:" stays
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model(**inputs)
    assert [text(_prompt_words(tokenizer, inputs, s)) for s in handle.last_selection] == [
        "Assistant:"] + [f"{QUESTION_AFTER}Assistant:"] * 2
