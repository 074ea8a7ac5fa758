"""prune() on the layouts that transformers' own processors write for LLaVA-NeXT (``LlavaNextProcessor``, several
images in one message as the llava-v1.6 chat templates write them), Granite-Docling (``GraniteDoclingProcessor``,
Idefics3's page layout) and Granite 4 Vision (``Granite4VisionProcessor``, LLaVA-NeXT's any-resolution layout).
The processors are the real classes, built offline around a word-level tokenizer (LLaVA-NeXT: a byte-level BPE,
which splits the template's ``[INST]`` into pieces as the checkpoints' tokenizer does) holding each family's
markers (the helpers of ``test_real_processors.py``); the models are the tiny builders', rebuilt on that
tokenizer's ids. Each image (Granite-Docling: each tile and the thumbnail) gets the selections the family table
gives it, of the token counts the processor wrote; keep-all logits are the unpatched ones bit for bit; the
prompts are the question words only with ``tokenizer=`` (no marker, no newline, no template text), in generate()
too; without a tokenizer what stays is asserted as it is (and prune() warns where the family is flagged
``unnamed_markers``)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (  # noqa: E402
    _bpe_tokenizer,
    _image_processor,
    _photo,
    _prompts_and_warnings,
    _retokenized,
    _runs,
    _token_layout,
    _tokenizer,
)

# The llava-v1.6-mistral checkpoints' chat template (llava-hf's chat_template.json): a user message's images
# first, each as "<image>\n", then its text, between "[INST] " and " [/INST]" (the vicuna ones write "USER: "
# and " ASSISTANT:" around the same "<image>\n" per image).
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

QUESTION = "what is the color of the cat ?"


def _llava_next_templated():
    """A tiny random LLaVA-NeXT (the tiny builder's config: 16 px views of 4 px patches, its grid pinpoints; this
    tokenizer's ids) with the real processor, holding the llava-v1.6 chat template."""
    tokenizer = _bpe_tokenizer(["<image>"], [f"[INST] [/INST] {QUESTION} on the mat"])
    model = _retokenized("llava_next", tokenizer, dict(image_token_index="<image>", image_token_id="<image>",
                                                       pad_token_id="<pad>"))
    config = model.config
    images = _image_processor("LlavaNextImageProcessor", size={"shortest_edge": 16},
                              crop_size={"height": 16, "width": 16}, image_grid_pinpoints=config.image_grid_pinpoints)
    processor = transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=4, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=LLAVA_NEXT_TEMPLATE)
    return model, processor, tokenizer


def test_llava_next_chat_template_images_of_one_message_are_budgeted_apart():
    """The llava-v1.6 chat templates write a message's images first, each as ``<image>\\n``, then its text:
    ``[INST] <image>\\n<image>\\nquestion [/INST]``. The processor expands each ``<image>`` to one run of image
    tokens (base view, unpadded tiles, a newline feature a row: a count its size gives), so two images of a
    message are two runs with the ``\\n`` between them: prune() budgets each image apart (it refuses only runs
    back to back, which this template never writes). With ``tokenizer=`` (the processor, holding the template)
    the prompt of both images is the question alone: not the newlines, not ``[/INST]`` (the template's, in BPE
    pieces). Without one (LLaVA-NeXT writes no marker a config does not name: no warning) the newlines after
    the first image and ``[/INST]`` stay."""
    model, processor, tokenizer = _llava_next_templated()

    def text(n_images):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [text(2), text(1)]
    assert texts[0] == f"[INST] <image>\n<image>\n{QUESTION} [/INST]"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(20, 36, gen), _photo(36, 20, gen)], [_photo(30, 30, gen)]],
                       padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # 4.57's tokenizer returns them; its LLaVA-NeXT takes none
    image = "<image>"
    layout = _token_layout(tokenizer, inputs, 0, image)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert layout == ["[", "INST", "]", "Ġ", f"{image}*{runs[0][1]}", "Ċ", f"{image}*{runs[1][1]}", "Ċ",
                      *tokenizer.tokenize(QUESTION), "Ġ[/", "INST", "]"]
    assert [r for r, _ in runs] == [0, 0, 1] and len({n for _, n in runs}) == 3  # sizes give different counts
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert all(s.order.numel() == 4 for s in selections)  # each image its own budget
    decoded = [tokenizer.convert_tokens_to_string(p).strip() for p in prompts]
    assert decoded == [QUESTION] * 3
    assert not warned
    question = tokenizer.tokenize(QUESTION)
    assert untokenized == [["Ċ", "Ċ", *question, "Ġ[/", "INST", "]"]] * 2 + [["Ċ", *question, "Ġ[/", "INST", "]"]]


GRANITE_DOCLING_MARKERS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)]
BEFORE_IMAGE, AFTER_IMAGES = "w44 w39 w53 w0", "w43 w39 w7"


@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "fine"])
def test_granite_docling_tiles_are_budgeted_apart_and_their_markers_are_no_question(fine):
    """Granite-Docling's processor writes a page split into tiles as each tile ``<fake_token_around_image>
    <row_i_col_j>`` and its tokens (16 a tile, 64 on the fine path: ``fine_route=True``), a newline after each row
    of tiles, then ``\\n<fake_token_around_image><global-img>`` the thumbnail's tokens ``<fake_token_around_image>``;
    a page of one tile is that tile alone (``<row_1_col_1>``, its tokens, a newline: no thumbnail, no closing
    marker). Each tile and the thumbnail is one selection of its own budget (the family table: a run each). With
    ``tokenizer=`` the prompts are the question words (a word between two images of a row is the question's, as
    text after the first image); without one prune() warns (``unnamed_markers``) and the markers and newlines after
    a row's first tile are question text: the question written before its page gives way to them."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "GraniteDoclingProcessor") or "granite_docling" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Granite-Docling")
    tokenizer = _tokenizer(GRANITE_DOCLING_MARKERS, plain=["\n"])
    model = _retokenized("granite_docling_fine" if fine else "granite_docling", tokenizer,
                         dict(image_token_id="<image>", pad_token_id="<pad>"))
    processor = transformers.GraniteDoclingProcessor(  # 32 px tiles of 4 px patches, shuffled 2x2: 16 tokens
        image_processor=_image_processor("GraniteDoclingImageProcessor", size={"height": 32, "width": 32},
                                         max_patches=6),
        tokenizer=tokenizer, image_seq_len=16)
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} <image>", f"<image> w1 <image> {AFTER_IMAGES}"],
                       images=[[_photo(64, 40, gen)], [_photo(30, 30, gen), _photo(40, 90, gen)]], padding=True,
                       return_tensors="pt", **({"fine_route": True} if fine else {}))
    assert ("tile_fine_mask" in inputs) == fine
    n = 64 if fine else 16
    fake, tile = "<fake_token_around_image>", f"<image>*{n}"
    thumbnail = ["\n", fake, "<global-img>", tile, fake]
    page = [fake, "<row_1_col_1>", tile, fake, "<row_1_col_2>", tile, "\n", fake, "<row_2_col_1>", tile, fake,
            "<row_2_col_2>", tile, "\n", fake, "<row_3_col_1>", tile, fake, "<row_3_col_2>", tile, "\n", *thumbnail]
    one_tile = [fake, "<row_1_col_1>", tile, "\n"]
    wide = [fake, "<row_1_col_1>", tile, fake, "<row_1_col_2>", tile, "\n", *thumbnail]
    assert _token_layout(tokenizer, inputs, 0, "<image>") == BEFORE_IMAGE.split() + page
    assert _token_layout(tokenizer, inputs, 1, "<image>") == one_tile + ["w1"] + wide + AFTER_IMAGES.split()
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    # A 3x2 page and its thumbnail; a page of one tile, a 1x2 page and its thumbnail.
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, n)] * 7 + [(1, n)] * 4
    assert all(s.order.numel() == 4 for s in selections)  # each tile its own budget
    assert prompts == [BEFORE_IMAGE.split()] * 7 + [["w1", *AFTER_IMAGES.split()]] * 4
    assert len(warned) == 1 and "Granite-Docling" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: every row's text after its first tile, markers and newlines included.
    rows = (page, one_tile + ["w1"] + wide)
    after_first = [[w for w in layout[layout.index(tile) + 1:] if w != tile] for layout in rows]
    assert after_first[0][:2] == [fake, "<row_1_col_2>"] and after_first[1][:2] == ["\n", "w1"]
    assert untokenized == [after_first[0]] * 7 + [after_first[1] + AFTER_IMAGES.split()] * 4


def test_granite4_vision_images_are_budgeted_whole_and_back_to_back_ones_refused():
    """Granite 4 Vision's processor writes an image as LLaVA-NeXT's: one run of image tokens (base view, unpadded
    tiles, a newline feature a row, each tile's patches downsampled by ``downsample_rate``), of a count its size
    gives, nothing else around it. Each image is one selection (its features added inside the language model:
    selected by those of the earliest deepstack layer); keep-all bit for bit; the prompts are the question words
    with ``tokenizer=`` (the newlines after images go), in generate() too; without one (no marker the config does
    not name: no warning) the newlines stay. Two images back to back are one run of two counts: refused."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "Granite4VisionProcessor") or "granite4_vision" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Granite 4 Vision")
    tokenizer = _tokenizer(["<image>"], plain=["\n"])
    model = _retokenized("granite4_vision", tokenizer, dict(image_token_id="<image>", pad_token_id="<pad>"))
    config = model.config
    processor = transformers.Granite4VisionProcessor(  # 16 px tiles of 2 px patches, downsampled to 4x4 tokens
        image_processor=_image_processor("LlavaNextImageProcessor", size={"shortest_edge": 16},
                                         crop_size={"height": 16, "width": 16},
                                         image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer, patch_size=2, vision_feature_select_strategy=config.vision_feature_select_strategy,
        downsample_rate=config.downsample_rate, num_additional_image_tokens=1)
    gen = torch.Generator().manual_seed(0)
    photos = [[_photo(20, 36, gen)], [_photo(36, 20, gen), _photo(30, 30, gen)]]
    inputs = processor(text=[f"{BEFORE_IMAGE} <image>", f"<image>\n w1 <image>\n{AFTER_IMAGES}"], images=photos,
                       padding=True, return_tensors="pt")
    runs = _runs(inputs["input_ids"], config.image_token_id)
    assert [r for r, _ in runs] == [0, 1, 1] and len({n for _, n in runs}) == 3  # sizes give different counts
    assert _token_layout(tokenizer, inputs, 1, "<image>") == [f"<image>*{runs[1][1]}", "\n", "w1",
                                                              f"<image>*{runs[2][1]}", "\n", *AFTER_IMAGES.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert all(s.order.numel() == 4 for s in selections)  # each image its own budget
    assert prompts == [BEFORE_IMAGE.split()] + [["w1", *AFTER_IMAGES.split()]] * 2
    assert not warned
    assert untokenized == [BEFORE_IMAGE.split()] + [["\n", "w1", "\n", *AFTER_IMAGES.split()]] * 2

    adjacent = processor(text=[f"<image><image> {AFTER_IMAGES}"], images=[photos[1]], return_tensors="pt")
    assert len(_runs(adjacent["input_ids"], config.image_token_id)) == 1
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor):
        with pytest.raises(ValueError, match="back to back"):
            model(**adjacent)
