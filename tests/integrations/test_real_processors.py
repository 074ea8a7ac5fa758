"""prune() on the token layouts that transformers' own processors write, not the tiny builders'
imitations of them. The processors are the real classes, built offline around a word-level (or byte-level
BPE) tokenizer holding each family's markers; the models are tiny and random, with the tokenizer's ids in
their configs. Images: Gemma3 (newlines around every image; pan-and-scan crops and the sentences around them),
Emu3 and Apertus 1.5 (each image's grid size, text after its begin marker), Aya Vision (each tile's label, text),
Idefics3 (tiles in rows, each
row ended by a newline, then a global view), PaliGemma (a newline after the prompt; a suffix typed and
labelled as the answer), Llama 4 (tiles with separators between
begin/end markers the config names), Mistral3 (rows ended by a break marker, an end marker no config
names), Molmo2 (two views, each row of patches ended by a column token no config names), MiniCPM-V 4.6/4.7 (each
image's number before it, text between markers no config names), LFM2-VL (tiles and a thumbnail, each after a
marker no config names, or one run of them all without markers: told apart by their patch grids); LLaVA-NeXT and
LLaVA-OneVision (images, and OneVision's videos, of a count their size gives). Videos (their processors need
torchvision, which the test extra installs): Qwen2.5-VL (a video one selection), and the layouts that write
words between a video's frames, which must be no question text: timestamps (Qwen3-VL, Gemma 4, Muse Glimmer,
VideoLLaMA3, GLM-4.1V, Cosmos3-Edge, Cohere Compass, LFM3-VL, Molmo2's inside a video that is one selection)
and frame labels (InternVL, Kimi-K2.5, SmolVLM, Nemotron-H Omni's tubelets). More images: Idefics2 (crops back to
back, one marker between them), Cohere2 Vision (tiles each ended by a line break), Aria (crops in one run, no marker),
Gemma 3n (newlines around each image), Janus (begin/end markers no config names; a default system prompt). Chat
templates (Gemma 3's, LLaVA-1.5's): their text around the question, the generation prompt after it, is no question."""
from __future__ import annotations

import inspect
import re
import warnings
from itertools import groupby

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.spec import release  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]


def _tokenizer(specials: list[str], plain: list[str], bos: str = "<s>", cls=None, words: tuple = (),
               **extra) -> "transformers.PreTrainedTokenizerFast":
    """Words ``w0``..``w59`` and ``words``; ``plain`` tokens are ordinary text too (the newlines: base-vocabulary
    tokens of the real tokenizers, added here so that the whitespace pre-tokenizer keeps them, and found inside
    words); ``specials`` are added as special, as the processors and checkpoints add their markers."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", bos, "</s>", "<pad>", *WORDS, *words, *plain, *specials])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    words.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = (cls or transformers.PreTrainedTokenizerFast)(
        tokenizer_object=words, unk_token="<unk>", bos_token=bos, eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials, extra_special_tokens=extra, model_input_names=["input_ids", "attention_mask"])
    tokenizer.padding_side = "left"
    return tokenizer


def _image_processor(name: str, **kwargs):
    """transformers 5.x's PIL image processor (the default class needs torchvision), else 4.x's."""
    return (getattr(transformers, f"{name}Pil", None) or getattr(transformers, name))(**kwargs)


def _vision(**kwargs) -> dict:
    """A one-layer vision tower's config: the sizes the towers share, then each tower's own fields."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, **kwargs}


def _text(tokenizer, **kwargs) -> dict:
    """A two-layer language model's config over the tokenizer's vocabulary, then the family's own fields."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id, **kwargs}


def _photo(h: int, w: int, gen: torch.Generator):
    from PIL import Image

    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())


def _runs(ids: torch.Tensor, *tokens: int) -> list[tuple[int, int]]:
    """(row, length) of every run of one of ``tokens`` in ``ids``, in order."""
    return [(r, len(list(run))) for r, row in enumerate(ids.tolist()) for t, run in groupby(row) if t in tokens]


def _runs_of_both(inputs, model) -> list[tuple[int, int]]:
    """(row, length) of every run of image or video tokens, in order."""
    return _runs(inputs["input_ids"], model.config.image_token_id, model.config.video_token_id)


@torch.no_grad()
def _selections(model, inputs, processor, keep=4):
    """Keep-all logits equal the unpatched model's bit for bit; then one pruned forward's selections."""
    unpatched = model(**inputs).logits
    with zspa_kernels.prune(model, keep=1.0, tokenizer=processor):
        assert torch.equal(model(**inputs).logits, unpatched)
    with zspa_kernels.prune(model, keep=keep, tokenizer=processor) as handle:
        model(**inputs)
    return handle.last_selection


def _questions_around_images(processor, placeholder: str):
    """Two rows, left-padded: a question before its image, then an image before its question (random photos of
    different sizes); the inputs and each row's question words."""
    gen = torch.Generator().manual_seed(0)
    questions = ["w44 w39 w53 w0", "w43 w39 w7"]
    texts = [f"{questions[0]} {placeholder}", f"{placeholder} {questions[1]}"]
    inputs = processor(text=texts, images=[[_photo(48, 40, gen)], [_photo(40, 56, gen)]], padding=True,
                       return_tensors="pt")
    inputs.pop("token_type_ids", None)  # the models here take none
    return inputs, [q.split() for q in questions]


def _prompt_words(tokenizer, inputs, selection) -> list[str]:
    return tokenizer.convert_ids_to_tokens(inputs["input_ids"][selection.batch_row, selection.prompt_tokens].tolist())


@torch.no_grad()
def _video_prompts(model, inputs, processor, tokenizer):
    """:func:`_selections` with ``tokenizer=``, and the prompt words of each selection: with the tokenizer
    (generate()'s prefill selects with the same prompts, checked here), and without one."""
    selections = _selections(model, inputs, processor)
    prompts = [_prompt_words(tokenizer, inputs, s) for s in selections]
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == prompts
    with zspa_kernels.prune(model, keep=4) as handle:
        model(**inputs)
    return selections, prompts, [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection]


# The words of Gemma3's pan-and-scan sentences: "Here is the original image", "and here are some crops to help you see better".
PAN_AND_SCAN_WORDS = tuple("Here is the original image and here are some crops to help you see better".split())


def _gemma3(specials: list[str] = (), words: tuple = ()):
    """A tiny random Gemma3 with the real processor; ``specials``, ``words``: more of the tokenizer's tokens."""
    boi, eoi, image = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tokenizer = _tokenizer([boi, eoi, image, *specials], plain=["\n\n"], bos="<bos>", words=PAN_AND_SCAN_WORDS + words,
                           boi_token=boi,
                           eoi_token=eoi, image_token=image)
    processor = transformers.Gemma3Processor(
        image_processor=_image_processor("Gemma3ImageProcessor", size={"height": 16, "width": 16}),
        tokenizer=tokenizer, image_seq_length=16)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.Gemma3Config(
        vision_config=_vision(model_type="siglip_vision_model", image_size=16, patch_size=4),
        text_config=_text(tokenizer, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=512, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id),
        mm_tokens_per_image=16, image_token_id=ids(image), boi_token_id=ids(boi), eoi_token_id=ids(eoi),
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zeros: every image token would be the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=32 ** -0.5)
    return model, processor, tokenizer


def test_gemma3_prompts_hold_the_question_not_the_newlines_around_images():
    """Gemma3's processor writes ``"\\n\\n<start_of_image>...<end_of_image>\\n\\n"``: ordinary newline
    tokens after every image. A question before its image was then ranked by that newline alone (the
    fallback to the text before the image never ran); a question after it got the newline too."""
    model, processor, tokenizer = _gemma3()
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"{before} <start_of_image>", f"<start_of_image> {after}"],
                       images=[[_photo(30, 30, gen)], [_photo(40, 24, gen)]], padding=True, return_tensors="pt")
    inputs.pop("num_crops", None)
    selections = _selections(model, inputs, processor)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id)
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == [before.split(), after.split()]


def test_gemma3_pan_and_scan_crops_are_budgeted_apart():
    """With ``do_pan_and_scan`` the processor writes ``Here is the original image``, the whole view, ``and here
    are some crops to help you see better``, then each crop as an image of its own (``<start_of_image>`` and 16
    tokens each): every one is a selection with its own budget, so an image of ``n`` crops keeps
    ``(n + 1) * keep`` tokens (README, "Where an image is"). With a tokenizer the two sentences are the
    image's (decoded): a question written before the image was replaced by the second one."""
    model, processor, tokenizer = _gemma3()
    gen = torch.Generator().manual_seed(1)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"<start_of_image> {after}", f"{before} <start_of_image>"],
                       images=[[_photo(32, 80, gen)], [_photo(32, 80, gen)]], return_tensors="pt", padding=True,
                       do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=3)
    inputs.pop("num_crops", None)  # returned by some versions; the model takes none
    crops = inputs["pixel_values"].shape[0] // 2 - 1  # each image: the whole view, then the crops
    assert crops >= 2
    words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())
    assert all(w in words for w in PAN_AND_SCAN_WORDS)  # the sentences, as words
    selections = _selections(model, inputs, processor, keep=4)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == (
        [(0, 16, 4)] * (crops + 1) + [(1, 16, 4)] * (crops + 1))
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == (
        [after.split()] * (crops + 1) + [before.split()] * (crops + 1))
    with torch.no_grad(), zspa_kernels.prune(model, keep=4) as handle:
        model(**inputs)  # without a tokenizer the sentences are words of the question
    assert {"here", "crops"} <= set(_prompt_words(tokenizer, inputs, handle.last_selection[0]))


def _paligemma():
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes Gemma's tokenizer class only
    tokenizer = _tokenizer([], plain=["\n"], bos="<bos>", cls=transformers.GemmaTokenizerFast if v4 else None)
    image_processor = _image_processor("SiglipImageProcessor", size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16  # as PaliGemma checkpoints' image processor configs give it
    # The processor adds <image> (special) and its <locNNNN>/<segNNN> words to the tokenizer.
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = _retokenized("paligemma", tokenizer, dict(image_token_index="<image>", pad_token_id="<pad>"))
    return model, processor, tokenizer


@torch.no_grad()
def test_paligemma_prompts_hold_the_question_and_a_training_call_selects_as_generation():
    """PaliGemma's processor writes every image of a row ahead of it, then ``<bos>``, the prompt and ``"\\n"``
    (an ordinary token: no question with a tokenizer). With a suffix (fine-tuning) it appends the suffix and
    ``<eos>``, typed 1 in ``token_type_ids`` (causal, where the prefix attends both ways) and labelled in
    ``labels``: the answer, which is no prompt, so a training call keeps the tokens that generation keeps; so
    does a forward that scores the suffix without labels (its token types mark it)."""
    model, processor, tokenizer = _paligemma()
    gen = torch.Generator().manual_seed(0)
    images = [[_photo(16, 16, gen)], [_photo(16, 16, gen), _photo(24, 16, gen)]]
    text = ["<image>w1 w2 w3", "<image><image>w4 w5"]
    inputs = processor(text=text, images=images, padding=True, return_tensors="pt")
    inputs.pop("labels", None)  # all -100 without a suffix (transformers 5.x returns them anyway)
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16), (1, 16), (1, 16)]
    assert prompts == [["w1", "w2", "w3"], ["w4", "w5"], ["w4", "w5"]]
    assert untokenized == [p + ["\n"] for p in prompts]  # without a tokenizer the newline stays

    train = processor(text=text, images=images, suffix=["w7 w8", "w9"], padding=True, return_tensors="pt")
    answer = train["token_type_ids"].bool()
    assert torch.equal(answer, train["labels"] != -100) and answer.sum(1).tolist() == [3, 2]  # the suffix, <eos>
    trained = _selections(model, train, processor)  # keep-all: the unpatched logits, bit for bit
    assert [_prompt_words(tokenizer, train, s) for s in trained] == prompts
    assert all(torch.equal(t.kept, s.kept) and torch.equal(t.order, s.order) for t, s in zip(trained, selections))
    # The suffix without labels (a candidate answer scored by its log-likelihood): typed 1, no question either,
    # with or without a tokenizer.
    scored = {k: v for k, v in train.items() if k != "labels"}
    for tokenizer_arg in (processor, None):
        picks = []
        for given in (inputs, scored):
            with zspa_kernels.prune(model, keep=4, tokenizer=tokenizer_arg) as handle:
                model(**given)
            picks.append([s.order.tolist() for s in handle.last_selection])
        assert [_prompt_words(tokenizer, scored, s) for s in handle.last_selection] == (
            prompts if tokenizer_arg else untokenized)
        assert picks[1] == picks[0]
    unpatched = model(**train).loss
    with zspa_kernels.prune(model, keep=4, tokenizer=processor):
        pruned = model(**train).loss
    assert torch.isfinite(pruned) and not torch.equal(pruned, unpatched)  # the answer's loss, on fewer image tokens


LLAMA4_MARKERS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>"]


@torch.no_grad()
def test_llama4_tiles_are_budgeted_apart_and_their_separators_are_no_question():
    """Llama 4's processor writes an image of several tiles as ``<|image_start|>``, the tiles row by row (an x
    separator between the tiles of a row, a y separator after each row), ``<|image|>`` and the global view's
    tokens, ``<|image_end|>``: each tile and the view a selection. The config names the begin/end markers
    (``boi_token_index``, ``eoi_token_index``), so what stands between them is the image's with or without a
    tokenizer: without one, the separators after its first tile had stood for a question written before it."""

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "llama4" not in BUILDERS:  # no Llama 4, or prune() refuses it (transformers 5.24, whose model fails)
        pytest.skip(f"prune() takes no Llama 4 on transformers {transformers.__version__}")
    tokenizer = _tokenizer(LLAMA4_MARKERS, plain=[], bos="<|begin_of_text|>")
    images = getattr(transformers, "Llama4ImageProcessorFast", None) or transformers.Llama4ImageProcessor
    processor = transformers.Llama4Processor(  # 32 px tiles of 4 px patches, pixel-shuffled 2x2: 16 tokens
        image_processor=images(size={"height": 32, "width": 32}, max_patches=4, resize_to_max_canvas=False),
        tokenizer=tokenizer, patch_size=4, pixel_shuffle_ratio=0.5)
    model = _retokenized("llama4", tokenizer, dict(image_token_index="<|patch|>", boi_token_index="<|image_start|>",
                                                   eoi_token_index="<|image_end|>"))
    gen = torch.Generator().manual_seed(0)
    question = "w4 w5"
    inputs = processor(text=["<|image|>w1 w2 w3", f"{question} <|image|>"],
                       images=[[_photo(64, 64, gen)], [_photo(32, 64, gen)]], padding=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].float()  # its image processor returns bf16
    layout = re.sub(r"(<\|patch\|>)+", "<P>", tokenizer.decode(inputs["input_ids"][1]).replace(" ", ""))
    assert layout.endswith("w4w5<|image_start|><P><|tile_x_separator|><P><|tile_y_separator|><|image|><P><|image_end|>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no marker the config does not name reaches the question: nothing to warn of
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * 5 + [(1, 16)] * 3  # 2x2 and 1x2 tiles, views
    assert prompts == untokenized == [["w1", "w2", "w3"]] * 5 + [question.split()] * 3


def _idefics3():
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)]
    tokenizer = _tokenizer(markers, plain=["\n"])
    image_processor = _image_processor("Idefics3ImageProcessor", do_image_splitting=True,
                                       size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)
    config = transformers.Idefics3Config(
        vision_config=_vision(image_size=32, patch_size=4),
        text_config=_text(tokenizer, model_type="llama", max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id, scale_factor=2)
    torch.manual_seed(0)
    return transformers.Idefics3ForConditionalGeneration(config).eval(), processor, tokenizer


def test_idefics3_tiles_are_budgeted_apart_and_their_row_newlines_are_no_question():
    """Idefics3's processor splits an image into rows of tiles, each tile ``<fake_token_around_image>
    <row_i_col_j>`` and 16 image tokens, a newline after each row, two before the global view. Each tile
    and the global view is one selection; the newlines between tiles are no question text (they stood for
    the whole question of a row whose question came before its image)."""
    model, processor, tokenizer = _idefics3()
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"{before} <image>", f"<image> {after}"],
                       images=[[_photo(64, 40, gen)], [_photo(40, 64, gen)]], padding=True, return_tensors="pt")
    assert "\n" in tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())  # rows of tiles
    selections = _selections(model, inputs, processor)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs and len(runs) == 2 * 7  # 3x2 or 2x3 tiles + view
    assert {r: _prompt_words(tokenizer, inputs, s) for s in selections for r in [s.batch_row]} == {
        0: before.split(), 1: after.split()}


QWEN_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE, QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
# Qwen3-VL's frame timestamps, "<0.2 seconds>": ordinary words of the real tokenizer, here too.
TIMESTAMPS = [f"<{t / 10:.1f}" for t in range(100)] + ["seconds>"]


def _qwen(version: str, specials: list[str] = (), words: tuple = ()):
    """A tiny random Qwen2.5-VL or Qwen3-VL with the real processor classes (Qwen3-VL: 16 px patches);
    ``specials``, ``words``: more of the tokenizer's tokens."""
    import torchvision  # noqa: F401  (the video processors need it: an error here, not a skip)

    v4 = transformers.__version__.startswith("4.")  # 4.57's processors take Qwen's tokenizer class only
    tokenizer = _tokenizer(QWEN_MARKERS + list(specials), plain=TIMESTAMPS, bos="<|endoftext|>", words=words,
                           cls=transformers.Qwen2TokenizerFast if v4 else None)
    patch = 14 if version == "2.5" else 16
    pixels = dict(min_pixels=(2 * patch) ** 2 * 4, max_pixels=(2 * patch) ** 2 * 16)
    images = _image_processor("Qwen2VLImageProcessor", patch_size=patch, **pixels)
    ids = tokenizer.convert_tokens_to_ids
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text = _text(tokenizer, max_position_embeddings=4096)
    if version == "2.5":
        videos = transformers.Qwen2VLVideoProcessor(**pixels)
        processor = transformers.Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos)
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               window_size=56, fullatt_block_indexes=[0]),
            text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}), **tokens)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        videos = transformers.Qwen3VLVideoProcessor(size={"shortest_edge": pixels["min_pixels"],
                                                          "longest_edge": pixels["max_pixels"]})
        processor = transformers.Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos)
        config = transformers.Qwen3VLConfig(
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=16, deepstack_visual_indexes=[0]),
            text_config=dict(text, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                             "mrope_interleaved": True}), **tokens)
        model_class = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    return model_class(config).eval(), processor, tokenizer


def _video_inputs(processor, video, photos, image=None, video_token=None, fps=2, types=False, **videos_kwargs):
    """Row 0: a question before its image; row 1: an image, words, ``video`` (``(frames, h, w, 3)`` uint8, at
    ``fps`` frames a second; None: no metadata), the question. The images are random photos of the ``(h, w)``
    sizes ``photos``; ``image``, ``video_token``: the placeholders (the processor's by default); ``types``: ask
    for ``mm_token_type_ids``. Returns the inputs, each row's question words, and row 1's tokens."""
    from transformers.video_utils import VideoMetadata

    gen = torch.Generator().manual_seed(0)
    before, between, after = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"
    image, video_token = image or processor.image_token, video_token or processor.video_token
    if fps is not None:
        videos_kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(video), fps=fps,
                                                         frames_indices=list(range(len(video))))]
    inputs = processor(text=[f"{before} {image}", f"{image} {between} {video_token} {after}"],
                       images=[[_photo(*photos[0], gen)], [_photo(*photos[1], gen)]], videos=[video], padding=True,
                       return_tensors="pt", videos_kwargs=videos_kwargs,
                       **({"return_mm_token_type_ids": True} if types else {}))
    words = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())
    return inputs, [before.split(), (between + " " + after).split()], words


def _video(frames: int, h: int, w: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def test_qwen2_5_vl_budgets_each_image_and_each_video_whole():
    """Qwen2.5-VL's processor writes a video as one run of tokens between its markers: one selection,
    after the images; the prompts hold the question words (and the words between an image and a video)."""
    model, processor, tokenizer = _qwen("2.5")
    inputs, questions, words = _video_inputs(processor, _video(6, 56, 56), [(56, 84), (84, 56)], QWEN_IMAGE, QWEN_VIDEO,
                                             do_sample_frames=False)
    selections = _selections(model, inputs, processor)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert len(selections) == 3 and selections[2].n_tokens == int(inputs["video_grid_thw"][0].prod()) // 4
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == [questions[0], questions[1], questions[1]]


def _llava_any_resolution(family: str):
    """A tiny random LLaVA-NeXT or LLaVA-OneVision (the tiny builders' configs, this tokenizer's ids) with the
    real processor classes: 16 px views of 4 px patches, the builders' grid pinpoints."""
    tokenizer = _tokenizer(["<image>", "<video>"], plain=["\n"])
    ids = dict(image_token_index="<image>", image_token_id="<image>", pad_token_id="<pad>")
    if family == "llava_onevision":
        ids.update(video_token_index="<video>", video_token_id="<video>")
    model = _retokenized(family, tokenizer, ids)
    config = model.config
    views = dict(crop_size={"height": 16, "width": 16}, image_grid_pinpoints=config.image_grid_pinpoints)
    strategy = dict(vision_feature_select_strategy=config.vision_feature_select_strategy)
    if family == "llava_next":
        processor = transformers.LlavaNextProcessor(
            image_processor=_image_processor("LlavaNextImageProcessor", size={"shortest_edge": 16}, **views),
            tokenizer=tokenizer, patch_size=4, num_additional_image_tokens=1, **strategy)
    else:
        import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

        processor = transformers.LlavaOnevisionProcessor(
            image_processor=_image_processor("LlavaOnevisionImageProcessor", size={"height": 16, "width": 16}, **views),
            video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": 16, "width": 16}),
            tokenizer=tokenizer, num_image_tokens=16, vision_aspect_ratio=config.vision_aspect_ratio,
            image_token="<image>", video_token="<video>", **strategy)
    return model, processor, tokenizer


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_any_resolution_images_and_videos_are_budgeted_whole(family):
    """LLaVA-NeXT's and LLaVA-OneVision's processors write an image as one run of tokens (its base view, its
    unpadded tiles and a newline feature a row, of a count that depends on its size), a OneVision video as one
    run (its frames pooled, a newline feature after them): a selection each; keep-all bit for bit, the prompts
    the question words (a video's: the words around it), also in generate(). Without a tokenizer the newline
    the prompt holds after an image stays (README: tokens that decode to whitespace)."""
    model, processor, tokenizer = _llava_any_resolution(family)
    image = model.config.image_token_id
    if family == "llava_next":
        gen = torch.Generator().manual_seed(0)
        before, after = "w44 w39 w53 w0", "w43 w39 w7"
        inputs = processor(text=[f"{before} <image>", f"<image>\n{after}"], images=[[_photo(20, 36, gen)], [_photo(36, 20, gen)]],
                           padding=True, return_tensors="pt")
        questions, runs = [before.split(), after.split()], _runs(inputs["input_ids"], image)
        untokenized = [questions[0], ["\n", *questions[1]]]
    else:
        inputs, questions, _ = _video_inputs(processor, _video(4, 16, 16), [(20, 36), (36, 20)], "<image>", "<video>",
                                             fps=None, do_sample_frames=False)
        questions, runs = questions + questions[1:], _runs_of_both(inputs, model)
        untokenized = questions
    assert len(runs) == len(questions) and len({n for _, n in runs}) == len(runs)  # sizes give different counts
    selections, prompts, without = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == questions and without == untokenized


def test_qwen3_vl_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """Qwen3-VL's processor writes each frame (temporal patch) as ``<t seconds>`` and its own run of
    tokens: every frame is a selection, and the timestamps, ordinary words of its vocabulary, are no
    question text (they would outnumber the question in a long video). Also in generate()."""
    model, processor, tokenizer = _qwen("3")
    inputs, questions, words = _video_inputs(processor, _video(6, 56, 56), [(56, 84), (84, 56)], QWEN_IMAGE, QWEN_VIDEO,
                                             do_sample_frames=False)
    assert "seconds>" in words and "<0.2" in words  # the timestamps are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    frames = int(inputs["video_grid_thw"][0, 0])
    assert frames == 3 and [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert prompts == [questions[0]] + [questions[1]] * (1 + frames)
    # Without a tokenizer the markers alone tell the video's span: where the processor writes no start
    # marker ahead of the first timestamp (4.57, 5.25; 5.24 keeps the prompt's), that one stays.
    marked = "<|vision_start|> <0.2" in " ".join(words)
    assert marked == (release("transformers")[0] == 5 and release("transformers") < (5, 25))
    first = [] if marked else ["<0.2", "seconds>"]
    row_1 = questions[1][:2] + first + questions[1][2:]
    assert untokenized == [questions[0]] + [row_1] * (1 + frames)


GEMMA4_MARKERS = ["<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>"]
# Gemma 4's frame timestamps, "00:01": ordinary text of the real tokenizer, here too.
MINUTES = [f"00:{s:02d}" for s in range(10)]


def _gemma4(unified: bool = False):
    """A tiny random Gemma 4 (``unified``: Gemma 4 Unified) with the real processor classes: Gemma 4's 4 px patches
    pooled 3x3, Gemma 4 Unified's 2 px patches merged 2x2; at most 70 soft tokens an image or frame."""
    import torchvision  # noqa: F401  (the video processor needs it: an error here, not a skip)

    prefix = "Gemma4Unified" if unified else "Gemma4"
    if not hasattr(transformers, f"{prefix}Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}Processor")
    boi, eoi, image, boa, eoa, audio = GEMMA4_MARKERS
    tokenizer = _tokenizer(GEMMA4_MARKERS, plain=MINUTES, bos="<bos>", boi_token=boi, eoi_token=eoi, image_token=image,
                           boa_token=boa, eoa_token=eoa, audio_token=audio)
    sizes = dict(patch_size=2 if unified else 4, pooling_kernel_size=2 if unified else 3, max_soft_tokens=70)
    processor = getattr(transformers, f"{prefix}Processor")(
        feature_extractor=getattr(transformers, f"{prefix}AudioFeatureExtractor")(),
        image_processor=_image_processor(f"{prefix}ImageProcessor", **sizes),
        video_processor=getattr(transformers, f"{prefix}VideoProcessor")(**sizes), tokenizer=tokenizer,
        image_seq_length=70)
    ids = tokenizer.convert_tokens_to_ids
    if unified:
        vision, per_layer = dict(patch_size=2, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=64,
                                 output_proj_dims=32), {}
    else:
        vision = _vision(num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                         position_embedding_size=64)
        per_layer = dict(vocab_size_per_layer_input=len(tokenizer), hidden_size_per_layer_input=8)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision,
        text_config=_text(tokenizer, head_dim=8, global_head_dim=8, max_position_embeddings=2048,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                          use_bidirectional_attention="vision", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **per_layer),
        image_token_id=ids(image), boi_token_id=ids(boi), eoi_token_id=ids(eoi), video_token_id=processor.video_token_id,
        audio_token_id=ids(audio), boa_token_id=ids(boa), eoa_token_index=ids(eoa), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval(), processor, tokenizer


def test_gemma4_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """Gemma 4's processor writes a video as ``MM:SS`` and each frame between image markers, joined by
    spaces: every frame is a selection, and the timestamps are no question text, with a tokenizer; without
    one, the first (nothing marks where the video starts) stays. Also in generate()."""
    model, processor, tokenizer = _gemma4()
    frames = 4
    inputs, (before, question), words = _video_inputs(processor, _video(frames, 48, 64), [(48, 40), (40, 56)], fps=1,
                                                      do_sample_frames=False)
    assert all(t in words for t in MINUTES[:frames])  # the timestamps are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    runs = _runs_of_both(inputs, model)
    assert len(runs) == 2 + frames and [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == [before] + [question] * (1 + frames)
    row_1 = question[:2] + [MINUTES[0]] + question[2:]
    assert untokenized == [before] + [row_1] * (1 + frames)


MUSE_MARKERS = ["<|patch|>", "<|image_start|>", "<|image_end|>", "<|video|>", "<|vid_start|>", "<|vid_end|>",
                "<|vid_frame_separator|>"]
# Muse Glimmer's frame timestamps, "Time: 0.5s" (its video processor's frame_timestamp_format): text.
TIMES = ["Time:"] + [f"{t / 2:.1f}s" for t in range(20)]


def _muse_glimmer():
    """A tiny random Muse Glimmer with the real processor classes (2 px patches of 2 frames, 2x2 merged)."""
    import torchvision  # noqa: F401  (its image and video processors need it: an error here, not a skip)
    from zspa_kernels.integrations.transformers.tiny import MUSE_TEXT

    if not hasattr(transformers, "MuseGlimmerProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Muse Glimmer")
    tokenizer = _tokenizer(MUSE_MARKERS, plain=TIMES, bos="<|begin_of_text|>")
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = transformers.MuseGlimmerProcessor(
        image_processor=transformers.MuseGlimmerImageProcessor(max_image_tokens=16, **sizes),
        video_processor=transformers.MuseGlimmerVideoProcessor(max_video_frame_tokens=16, **sizes), tokenizer=tokenizer)
    vision = dict(patch_size=2, pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16, num_attention_heads=2,
                  num_hidden_layers=2, hidden_size=32, intermediate_size=64, layer_types=["window_attention", "full_attention"])
    config = transformers.MuseGlimmerConfig(
        text_config=dict(MUSE_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=vision, image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        out_hidden_size=4 * 32, projector_hidden_size=64)
    torch.manual_seed(0)
    return transformers.MuseGlimmerForConditionalGeneration(config).eval(), processor, tokenizer


def test_muse_glimmer_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """Muse Glimmer's processor writes a video as ``<|vid_start|>Time: 0.0s`` its first frame's tokens, then
    ``<|vid_frame_separator|>Time: 1.0s`` and each next one's: every frame (temporal group) is a selection, and
    the timestamps are no question text, with a tokenizer; without one, the first stays. Also in generate()."""
    model, processor, tokenizer = _muse_glimmer()
    frames = 6
    inputs, (before, question), words = _video_inputs(processor, _video(frames, 16, 24), [(16, 12), (12, 20)],
                                                      do_sample_frames=False, return_metadata=True)
    assert "Time:" in words and "1.0s" in words  # the timestamps are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    groups = int(inputs["video_grid_thw"][0, 0])
    assert groups == frames // 2 and [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert prompts == [before] + [question] * (1 + groups)
    # Without a tokenizer, the markers no config names are text too (README: pass tokenizer=); of the
    # timestamps, the first stays.
    row_1 = question[:2] + ["Time:", "0.0s"] + question[2:]
    assert [[w for w in prompt if w not in MUSE_MARKERS]
            for prompt in untokenized[1:]] == [row_1] * (1 + groups)


# VideoLLaMA3's frame timestamps, "Time 0.5s:" (after a comma from the second frame on): text.
VIDEO_LLAMA3_TIMES = ["Time", ",Time"] + [f"{t / 2:.1f}s:" for t in range(20)]


def _video_llama3():
    """A tiny random VideoLLaMA3 with the real processor classes (2 px patches; a video's 2x2 merged)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    if not hasattr(transformers, "VideoLlama3Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no VideoLLaMA3")
    tokenizer = _tokenizer(["<|image_pad|>", "<|video_pad|>"], plain=VIDEO_LLAMA3_TIMES, bos="<|endoftext|>")
    images = _image_processor("VideoLlama3ImageProcessor", patch_size=2, size={"shortest_edge": 8 * 8,
                                                                               "longest_edge": 16 * 16})
    videos = transformers.VideoLlama3VideoProcessor(patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 16 * 16})
    processor = transformers.VideoLlama3Processor(image_processor=images, video_processor=videos, tokenizer=tokenizer)
    config = transformers.VideoLlama3Config(
        text_config=_text(tokenizer, model_type="qwen2"), vision_config=_vision(patch_size=2),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id)
    torch.manual_seed(0)
    return transformers.VideoLlama3ForConditionalGeneration(config).eval(), processor, tokenizer


def test_video_llama3_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """VideoLLaMA3's processor writes a video as ``Time 0.0s:`` its first frame's tokens, then ``,Time 0.5s:``
    and each next one's, fewer where its compression drops tokens that did not change (a still frame keeps
    one): every frame is a selection, and the timestamps are no question text, with a tokenizer; without one,
    the first stays. Also in generate()."""
    model, processor, tokenizer = _video_llama3()
    frames, video = 5, _video(5, 16, 12)
    video[2] = video[1]  # a still frame: one token kept
    inputs, (before, question), words = _video_inputs(processor, video, [(16, 12), (12, 16)])
    assert "Time" in words and ",Time" in words and "1.0s:" in words  # the timestamps are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    runs = _runs_of_both(inputs, model)
    assert len(runs) == 2 + frames and runs[4] == (1, 1) and [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == [before] + [question] * (1 + frames)
    row_1 = question[:2] + ["Time", "0.0s:"] + question[2:]
    assert untokenized == [before] + [row_1] * (1 + frames)


INTERNVL_MARKERS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
FRAME_LABELS = [f"Frame{i}:" for i in range(1, 10)]  # text, as in the real tokenizer


def _internvl(crops: bool = False):
    """A tiny random InternVL with the real processor classes (a 32 px image, crop or frame: 16 tokens);
    ``crops``: images split into crops (``crop_to_patches``, up to 6 and a thumbnail), and ``"\n"`` an
    ordinary token (the real chat template writes one after each image)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    start, end, context, video = INTERNVL_MARKERS
    tokenizer = _tokenizer(INTERNVL_MARKERS, plain=["\n"] * crops + FRAME_LABELS, bos="<|endoftext|>",
                           start_image_token=start, end_image_token=end, context_image_token=context, video_token=video)
    size = {"height": 32, "width": 32}
    processor = transformers.InternVLProcessor(
        image_processor=_image_processor("GotOcr2ImageProcessor", size=size, crop_to_patches=crops,
                                         **({"max_patches": 6} if crops else {})),
        video_processor=transformers.InternVLVideoProcessor(size=size), tokenizer=tokenizer, image_seq_length=16)
    config = transformers.InternVLConfig(
        vision_config=_vision(image_size=32, patch_size=4), text_config=_text(tokenizer, model_type="qwen2"),
        image_token_id=processor.image_token_id, image_seq_length=16, downsample_ratio=0.5,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return transformers.InternVLForConditionalGeneration(config).eval(), processor, tokenizer


def test_internvl_frame_labels_are_no_question():
    """InternVL's processor writes a video as its frames, each an image after its ``FrameN:`` label: every
    frame is a selection (of image tokens: nothing in the inputs tells frames from images), and with a
    tokenizer the labels are no question text (decoded); without one they stay, as they must."""
    model, processor, tokenizer = _internvl()
    frames = 4
    inputs, (before, question), words = _video_inputs(processor, _video(frames, 32, 32), [(32, 32), (32, 32)], fps=None)
    assert FRAME_LABELS[:frames] == [w for w in words if w.startswith("Frame")]  # the labels are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] + [(1, 16)] * (1 + frames)
    assert prompts == [before] + [question] * (1 + frames)
    # Without a tokenizer (its markers, in no config, are text too: README), the labels stay.
    row_1 = [w for w in words if w in question or w in FRAME_LABELS]
    assert [[w for w in prompt if w not in INTERNVL_MARKERS]
            for prompt in untokenized[1:]] == [row_1] * (1 + frames)


KIMI_MARKERS = ["<|media_pad|>", "<|kimi_k25_video_placeholder|>", "<|media_begin|>", "<|media_content|>", "<|media_end|>"]
# Kimi-K2.5's chunk timestamps, "00:00:01.000", and the word before each chunk's (and image's) tokens: text.
CHUNK_TIMES = [f"00:00:0{t // 2}.{t % 2 * 500:03d}" for t in range(20)] + ["video", "image"]


def _kimi_k25():
    """A tiny random Kimi-K2.5 with the real processor classes (2 px patches, 2x2 merged, two frames a chunk;
    one on transformers 5.17, which splits a chunk's features as if each frame had its own: the tiny
    builder's note), and its frames a chunk."""
    import torchvision  # noqa: F401  (its image and video processors need it: an error here, not a skip)

    if not hasattr(transformers, "Kimi_K25Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Kimi-K2.5")
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25Model

    from zspa_kernels.integrations.transformers.tiny import kimi_k25

    frames = 2 if "image_grid_thw[:, 1:]" in inspect.getsource(Kimi_K25Model.get_image_features) else 1

    tokenizer = _tokenizer(KIMI_MARKERS, plain=CHUNK_TIMES, bos="<|begin_of_text|>")
    sizes = dict(patch_size=2, merge_size=2, max_patches=64)
    processor = transformers.Kimi_K25Processor(
        image_processor=transformers.Kimi_K25ImageProcessor(**sizes),
        video_processor=transformers.Kimi_K25VideoProcessor(temporal_patch_size=frames, **sizes), tokenizer=tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = kimi_k25().model.config.to_dict()  # the tiny builder's, with this tokenizer's ids
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.update(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                  vision_start_token_id=ids("<|media_begin|>"), vision_end_token_id=ids("<|media_end|>"))
    torch.manual_seed(0)
    model = transformers.Kimi_K25ForConditionalGeneration(transformers.Kimi_K25Config(**config)).eval()
    return model, processor, tokenizer, frames


def test_kimi_k25_chunk_labels_are_no_question():
    """Kimi-K2.5's processor writes each chunk of a video's frames after its timestamp, as
    ``<|media_begin|>video<|media_content|>`` its tokens ``<|media_end|>``, and its chat template an image as
    ``<|media_begin|>image<|media_content|>`` its tokens ``<|media_end|>``: every chunk is a selection; what
    stands between the begin marker and the tokens (``<|media_content|>``, in no config, and the word) is no
    question text, with or without a tokenizer (a question before its image was ranked by them too), and
    with a tokenizer neither is a chunk's timestamp (decoded; nothing in the inputs groups the chunks into
    videos); without one the timestamps stay."""
    model, processor, tokenizer, frames = _kimi_k25()
    chunks, image = 3, f"<|media_begin|>image<|media_content|>{processor.image_token}<|media_end|>"  # as its template
    inputs, (before, question), words = _video_inputs(processor, _video(chunks * frames, 16, 12), [(16, 12), (12, 16)],
                                                      image, do_sample_frames=False)
    assert words.count("video") == chunks and "00:00:01.000" in words  # the labels are there, as words
    assert words.count("<|media_content|>") == 1 + chunks
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert len(selections) == 2 + chunks
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model)
    assert prompts == [before] + [question] * (1 + chunks)
    row_1 = [w for w in words if w in question or w in CHUNK_TIMES[:-2]]
    assert untokenized == [before] + [row_1] * (1 + chunks)


GLM_MARKERS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"]
GLM_VIDEO = "<|begin_of_video|><|video|><|end_of_video|>"  # as its chat template writes a video


def _glm4v():
    """A tiny random GLM-4.1V with the real processor classes (2 px patches of 2 frames, 2x2 merged)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)
    from zspa_kernels.integrations.transformers.tiny import GLM_TEXT

    tokenizer = _tokenizer(GLM_MARKERS, plain=[], words=[str(t) for t in range(10)], bos="[gMASK]")
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = transformers.Glm4vProcessor(
        image_processor=_image_processor("Glm4vImageProcessor", **sizes),
        video_processor=transformers.Glm4vVideoProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 16 * 16 * 8},
                                                         **sizes), tokenizer=tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.Glm4vConfig(
        text_config=dict(GLM_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           image_size=16, patch_size=2, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"), image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"), video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"))
    torch.manual_seed(0)
    return transformers.Glm4vForConditionalGeneration(config).eval(), processor, tokenizer


def test_glm4v_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """GLM-4.1V's processor writes each frame of a video as an image followed by its time in seconds, between
    the begin/end-of-video markers its template writes: every frame is a selection, and the times are no
    question text, with a tokenizer or without (the markers are in its config). Videos only: the model
    cannot take images and videos in one call."""
    from transformers.video_utils import VideoMetadata

    model, processor, tokenizer = _glm4v()
    before, after, frames = "w44 w39 w53 w0", "w43 w39 w7", 8
    metadata = [VideoMetadata(total_num_frames=frames, fps=1, frames_indices=list(range(frames)))] * 2
    inputs = processor(text=[f"{before} {GLM_VIDEO}", f"{GLM_VIDEO} {after}"], videos=[_video(frames, 16, 16)] * 2,
                       padding=True, return_tensors="pt", videos_kwargs=dict(do_sample_frames=False, video_metadata=metadata))
    words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())
    assert "<|end_of_image|> 2" in " ".join(words)  # the times are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    groups = int(inputs["video_grid_thw"][0, 0])
    assert groups == frames // 2 and [(s.batch_row, s.n_tokens) for s in selections] == _runs(
        inputs["input_ids"], model.config.image_token_id)
    assert prompts == untokenized == [before.split()] * groups + [after.split()] * groups


def _retokenized(builder: str, tokenizer, ids: dict, text: dict = None):
    """The tiny ``builder``'s model (zspa_kernels.integrations.transformers.tiny), rebuilt with ``tokenizer``'s
    vocabulary and the config ids ``ids`` (of its tokens)."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    tiny = BUILDERS[builder]()
    config = tiny.model.config.to_dict()
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **(text or {}))
    config.update({name: tokenizer.convert_tokens_to_ids(token) for name, token in ids.items()})
    torch.manual_seed(0)
    return type(tiny.model)(type(tiny.model.config)(**config)).eval()


# (tiny builder, processor, image and video processor classes, the vision start/end, image and video
# tokens, whether the processor leaves the template's start marker before the first timestamp)
TIMED_PROCESSORS = [
    ("cosmos3_edge", "Cosmos3EdgeProcessor", "Cosmos3EdgeImageProcessor", "Cosmos3EdgeVideoProcessor", QWEN_MARKERS,
     False),
    ("cohere_compass", "CohereCompassProcessor", "CohereCompassImageProcessor", "CohereCompassVideoProcessor",
     ["<|VISION_START|>", "<|VISION_END|>", "<|IMAGE_PAD|>", "<|VIDEO_PAD|>"], True),
    # LFM3-VL: no image or video processor of its own; its processor reads Qwen's merge and temporal sizes.
    ("lfm3_vl", "Lfm3VlProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor", QWEN_MARKERS, True),
]


@pytest.mark.parametrize("builder, processor_class, images_class, videos_class, markers, outer", TIMED_PROCESSORS,
                         ids=[p[0] for p in TIMED_PROCESSORS])
def test_timed_frames_are_budgeted_apart_and_their_timestamps_are_no_question(builder, processor_class, images_class,
                                                                             videos_class, markers, outer):
    """Cosmos3-Edge's, Cohere Compass's and LFM3-VL's processors write each frame as ``<t seconds>`` and its own
    tokens between vision markers, as Qwen3-VL's: every frame is a selection, and the timestamps are no question
    text with a tokenizer. Without one, the first goes where the processor leaves the template's start marker
    before it (Cohere Compass, LFM3-VL) and stays where it replaces the template's whole wrapper (Cosmos3-Edge)."""
    import torchvision  # noqa: F401  (their video processors need it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, processor_class) or builder not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {processor_class}")
    start, end, image, video = markers
    tokenizer = _tokenizer(markers, plain=TIMESTAMPS, bos="<|endoftext|>")
    model = _retokenized(builder, tokenizer, dict(image_token_id=image, video_token_id=video,
                                                  vision_start_token_id=start, vision_end_token_id=end))
    vision = model.config.vision_config
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 size={"shortest_edge": 4 * vision.patch_size ** 2, "longest_edge": 64 * vision.patch_size ** 2})
    processor = getattr(transformers, processor_class)(
        image_processor=_image_processor(images_class, **sizes),
        video_processor=getattr(transformers, videos_class)(**sizes), tokenizer=tokenizer)
    frames = 4 * (vision.temporal_patch_size or 1)
    side = 8 * vision.patch_size
    inputs, (before, question), words = _video_inputs(
        processor, _video(frames, side, side), [(side, side * 3 // 4), (side * 3 // 4, side)], start + image + end,
        start + video + end, types="mm_token_type_ids" in inspect.signature(model.forward).parameters,
        do_sample_frames=False, return_metadata=True)
    first = next(n for n, w in enumerate(words) if w in TIMESTAMPS)  # the first timestamp's first word
    assert (words[first - 1] == start) == outer and words[first + 1] == "seconds>"
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    runs = _runs_of_both(inputs, model)
    assert len(runs) == 2 + 4 and [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == [before] + [question] * (1 + 4)
    row_1 = question[:2] + ([] if outer else words[first:first + 2]) + question[2:]
    assert untokenized == [before] + [row_1] * (1 + 4)


def test_smolvlm_frame_labels_are_no_question():
    """SmolVLM's processor writes a video as a sentence ("You are provided the following series of four
    frames ...", processor text that stays, as template words do), then each frame as an image after its
    ``Frame from 00:01:`` label: every frame is a selection, and with a tokenizer the labels are no question
    text (decoded; the frames are images to the model); without one they stay. Videos only: images and
    videos share ``pixel_values``."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    if not hasattr(transformers, "SmolVLMProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no SmolVLM")
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>"]
    labels = ["Frame", "from"] + [f"00:{t:02d}:" for t in range(10)]
    intro = "You are provided the following series of four frames from a 0:00:03 [H:MM:SS] video.".split()
    tokenizer = _tokenizer(markers, plain=["\n"], words=labels + intro)
    sizes = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(image_processor=_image_processor("SmolVLMImageProcessor", **sizes),
                                              video_processor=transformers.SmolVLMVideoProcessor(**sizes),
                                              tokenizer=tokenizer, image_seq_len=16)
    config = transformers.SmolVLMConfig(
        vision_config=_vision(image_size=32, patch_size=4), text_config=_text(tokenizer, model_type="llama"),
        image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id, scale_factor=2)
    torch.manual_seed(0)
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    from transformers.video_utils import VideoMetadata

    before, after, frames = "w44 w39 w53 w0", "w43 w39 w7", 4
    metadata = [VideoMetadata(total_num_frames=frames, fps=1, frames_indices=list(range(frames)))] * 2
    inputs = processor(text=[f"{before} <video>", f"<video> {after}"], videos=[[_video(frames, 32, 32)]] * 2,
                       padding=True, return_tensors="pt", videos_kwargs=dict(video_metadata=metadata))
    words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())
    assert words.count("Frame") == frames and "00:01:" in words  # the labels are there, as words
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * frames + [(1, 16)] * frames
    assert prompts == [before.split() + intro] * frames + [after.split()] * frames
    # Without a tokenizer, row 1's prompt is all its text after the first frame: labels, newlines, question.
    labelled = [w for w in words[words.index("<image>"):] if w not in markers]
    assert labelled.count("Frame") == frames - 1
    assert [[w for w in prompt if w not in markers] for prompt in untokenized[frames:]] == [labelled] * frames


def _bpe_tokenizer(specials: list[str], corpus: list[str]) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE trained on ``corpus`` (digits, dots and words split as a checkpoint's BPE splits
    them, and decoded back to the exact text), ``specials`` added as special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", *specials], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", additional_special_tokens=specials)
    tokenizer.padding_side = "left"
    return tokenizer


def _nemotron_omni_processor(tokenizer, **image):
    """The real Nemotron-H Omni processor around ``tokenizer``: 4 px patches (``image``: more of its image
    processor's arguments), 64 patches a video frame, Parakeet's feature extractor for audio."""
    module = transformers.models.nemotron_h_omni
    return transformers.NemotronH_Omni_Reasoning_V3Processor(
        image_processor=module.NemotronH_Omni_Reasoning_V3ImageProcessor(patch_size=4, **image),
        video_processor=module.NemotronH_Omni_Reasoning_V3VideoProcessor(
            patch_size=4, video_target_num_patches=64, norm_mean=[0.5] * 3, norm_std=[0.5] * 3),
        feature_extractor=transformers.ParakeetFeatureExtractor(), tokenizer=tokenizer)


def test_nemotron_h_omni_tubelet_labels_are_no_question():
    """Nemotron-H Omni's processor writes a video as its tubelets (two frames each), each an image (the image
    token, though its config names a video token) after a label naming its frames and their times, one a line:
    every tubelet is a selection, and with a tokenizer the labels (more tokens than other labels: a wider
    decode) are no question text; without one they stay. Videos alone: its model counts a video's tokens
    and an image's as one modality, so it cannot take both in one call (upstream)."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    if not hasattr(transformers, "NemotronH_Omni_Reasoning_V3Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Nemotron-H Omni")
    from transformers.video_utils import VideoMetadata

    from zspa_kernels.integrations.transformers.tiny import nemotron_h_omni

    before, after, frames = "What is in the picture?", " Describe the video in one sentence.", 4
    label = "Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: "
    markers = ["<image>", "<img>", "</img>", "<video>", "<so_embedding>"]
    tokenizer = _bpe_tokenizer(markers, [before + after, label])
    assert len(tokenizer(label)["input_ids"]) > 16  # beyond the other labels' decode window
    processor = _nemotron_omni_processor(tokenizer)
    config = nemotron_h_omni().model.config.to_dict()  # the tiny builder's, with this tokenizer's ids
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config["vision_config"].update(summary_idxs=[0])  # its one class token (the video path reads them)
    config.update(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id)
    torch.manual_seed(0)
    model = transformers.NemotronH_Omni_Reasoning_V3(transformers.NemotronH_Omni_Reasoning_V3_Config(**config)).eval()
    metadata = [VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))]
    inputs = processor(text=[f"{before} <video>{after}"], videos=[_video(frames, 32, 32)], return_tensors="pt",
                       videos_kwargs=dict(video_metadata=metadata))
    assert label in tokenizer.decode(inputs["input_ids"][0])  # the labels are there, as text
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * (frames // 2)
    assert [tokenizer.convert_tokens_to_string(p) for p in prompts] == [after] * (frames // 2)
    # Without a tokenizer, the prompt is all text after the first tubelet: the second's label stays.
    text = tokenizer.decode(inputs["input_ids"][0])
    stays = text[text.index("</img>"):].replace("<image>", "")
    assert [tokenizer.convert_tokens_to_string(p) for p in untokenized] == [stays] * (frames // 2)


def test_mistral3_image_rows_are_one_budget_and_without_a_tokenizer_prune_warns_of_its_end_marker():
    """Pixtral's processor (Mistral3's, Pixtral-12B's) writes an image as rows of ``[IMG]`` tokens, each row
    ended by ``[IMG_BREAK]`` and the last by ``[IMG_END]``, neither named by the config: an image is one
    selection, its row breaks inside it. Without a tokenizer the end marker counts as question text: a
    question written before its image gave way to it (and to the template's ``[/INST]``), so prune() warns."""
    markers = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]
    tokenizer = _tokenizer(markers, plain=[])
    processor = transformers.PixtralProcessor(
        image_processor=_image_processor("PixtralImageProcessor", size={"longest_edge": 16}, patch_size=2),
        tokenizer=tokenizer, patch_size=2, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]")
    model = _retokenized("mistral3", tokenizer, dict(image_token_index="[IMG]", image_token_id="[IMG]",
                                                     pad_token_id="<pad>"))
    image = model.config.image_token_id
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"[INST]{before} [IMG][/INST]", f"[INST][IMG] {after}[/INST]"],
                       images=[[_photo(20, 28, gen)], [_photo(28, 16, gen)]], padding=True, return_tensors="pt")
    words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert "[IMG_BREAK]" in words and words[-2:] == ["[IMG_END]", "[/INST]"]
    selections = _selections(model, inputs, processor)
    rows = inputs["input_ids"]
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(r, int((rows[r] == image).sum())) for r in range(2)]
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == [before.split(), after.split()]
    with pytest.warns(UserWarning, match=r"Mistral3 processors write image markers .*tokenizer=processor"):
        handle = zspa_kernels.prune(model, keep=4)
    with torch.no_grad(), handle:
        model(**inputs)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == [
        ["[IMG_END]", "[/INST]"], ["[IMG_END]", *after.split(), "[/INST]"]]


MINICPM_TOKENS = dict(image_start_token="<image>", image_end_token="</image>", slice_start_token="<slice>",
                     slice_end_token="</slice>", image_id_start_token="<image_id>", image_id_end_token="</image_id>",
                     image_token="<unk_image>", video_token="<unk_video>")


@pytest.mark.parametrize("version", ["4_6", "4_7"])
def test_minicpm_v_crops_are_budgeted_apart_and_image_numbers_are_no_question(version):
    """MiniCPM-V's processor writes each image as ``<image_id>N</image_id>`` (its number in its row), its
    thumbnail between image markers, then its slices between slice markers, a newline between rows of them:
    each crop is a selection. The number is the image's, no question text: with a tokenizer (which alone
    names the ``<image_id>`` markers) it goes with them, in a question after a first image (the second
    image's number) and in one before its image (its own). Without a tokenizer it stays, and prune() warns."""
    if not hasattr(transformers, f"MiniCPMV{version}Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniCPM-V {version.replace('_', '.')}")
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(list(MINICPM_TOKENS.values()), plain=["\n"], words=tuple("0123456789"), **MINICPM_TOKENS)
    sizes = dict(scale_resolution=32, patch_size=2)  # 32 px crops of 2 px patches: 16 tokens each ("16x")
    processor = getattr(transformers, f"MiniCPMV{version}Processor")(
        image_processor=_image_processor("MiniCPMV4_6ImageProcessor", max_slice_nums=4, **sizes),
        video_processor=transformers.MiniCPMV4_6VideoProcessor(**sizes), tokenizer=tokenizer)
    ids = dict(image_token_id="<unk_image>", video_token_id="<unk_video>")
    if version == "4_7":  # its canvas M-RoPE places the markers its config names
        ids.update(image_start_id="<image>", image_end_id="</image>", slice_start_id="<slice>",
                   slice_end_id="</slice>", newline_id="\n")
    model = _retokenized(f"minicpmv{version}", tokenizer, ids)
    gen = torch.Generator().manual_seed(0)
    # Crops of one size: transformers 5.17's window merger reads the first crop's for all of them.
    after, between, before = "w3 w4", "w5 w6", "w7 w8"
    inputs = processor(text=[f"w1 w2 <unk_image> {after} <unk_image> {between}", f"{before} <unk_image>"],
                       images=[[_photo(32, 32, gen), _photo(64, 64, gen)], [_photo(64, 64, gen)]],
                       padding=True, return_tensors="pt")
    words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert ["<image_id>", "1", "</image_id>", "<image>"] == words[words.index("w4") + 1:][:4]  # the number, as text
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], tokenizer.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * 6 + [(1, 16)] * 5  # thumbnails, 2x2 slices
    assert prompts == [f"{after} {between}".split()] * 6 + [before.split()] * 5
    assert "1" in untokenized[0]  # without a tokenizer, the number stays (4.6's question is all markers in row 1)
    with pytest.warns(UserWarning, match=r"MiniCPM-V .* processors write image markers .*tokenizer=processor"):
        zspa_kernels.prune(model, keep=4).remove()


# Emu3's and Apertus 1.5's grid sizes, "3*4", as their processors write them before an image's codes: text.
GRID_SIZES = [f"{h}*{w}" for h in range(1, 9) for w in range(1, 9)]


def _emu3(words: str):
    """A tiny random Emu3 with the real processor around a byte-level BPE trained on ``words`` and the grid sizes:
    each image ``<|image start|>`` its grid size ``<|image token|>`` its placeholders ``<|extra_201|><|image end|>``."""
    if not hasattr(transformers, "Emu3Processor") or release("transformers") < (5, 0):
        pytest.skip(f"transformers {transformers.__version__}: the family needs 5.x")
    from zspa_kernels.integrations.transformers.tiny import BUILDERS, VQ_CODES

    visual = [f"<|visual token {i:06d}|>" for i in range(VQ_CODES)]
    marks = dict(boi_token="<|image start|>", eoi_token="<|image end|>", image_wrapper_token="<|image token|>",
                 eof_token="<|extra_201|>", image_token="<image>")
    tokenizer = _bpe_tokenizer([*marks.values(), "<|extra_200|>", *visual], [words] + GRID_SIZES)
    for name, token in marks.items():  # as Emu3's tokenizer names them
        setattr(tokenizer, name, token)
    tokenizer.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    # Its processor downsamples by 8: the tiny VQ-VAE (2 px cells) with two levels more.
    processor = transformers.Emu3Processor(
        image_processor=_image_processor("Emu3ImageProcessor", min_pixels=16 * 16, max_pixels=32 * 32), tokenizer=tokenizer)
    tiny = BUILDERS["emu3"]()
    config = tiny.model.config.to_dict()
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config["vq_config"].update(channel_multiplier=[1, 1, 1, 1])
    config.update(image_token_id=tokenizer.image_token_id, vocabulary_map={
        t: tokenizer.convert_tokens_to_ids(t) for t in ["<image>", "<|extra_200|>", *visual]})
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    return model, processor, tokenizer


def _apertus1p5(words: str):
    """A tiny random Apertus 1.5 with the real processor around a byte-level BPE trained on ``words`` and the grid
    sizes: each image ``<|image_start|>`` its grid size ``<|image_wrapper|>`` its rows of codes joined by
    ``<|eol|>``, ``<|image_end|>``; 2 px a code, as the tiny image tokenizer's cells."""
    if not hasattr(transformers, "Apertus1p5Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Apertus 1.5")
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    marks = dict(image_token="<|image|>", audio_token="<|audio|>", boi_token="<|image_start|>",
                 eoi_token="<|image_end|>", image_wrapper_token="<|image_wrapper|>", eol_token="<|eol|>",
                 boa_token="<|boa|>", eoa_token="<|eoa|>")
    tokenizer = _bpe_tokenizer(list(marks.values()), [words] + GRID_SIZES)
    for name, token in marks.items():  # as Apertus 1.5's tokenizer names them
        setattr(tokenizer, name, token)
    processor = transformers.Apertus1p5Processor(  # 2 px a code, as the tiny image tokenizer's cells
        image_processor=transformers.Apertus1p5ImageProcessor(spatial_factor=2, size={"min_pixels": 16, "max_pixels": 64}),
        feature_extractor=transformers.WavTokenizerFeatureExtractor(), tokenizer=tokenizer)
    tiny, n = BUILDERS["apertus1p5"](), len(tokenizer)
    config = tiny.model.config.to_dict()  # the image and audio codes after this tokenizer's ids
    config["text_config"].update(vocab_size=n + 1024 + 8, output_vocab_size=n, pad_token_id=tokenizer.pad_token_id)
    config.update(image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_token_offset=n,
                  audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"), audio_token_offset=n + 1024)
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    return model, processor, tokenizer


def test_emu3_grid_sizes_are_no_question():
    """Emu3's processor writes each image as ``<|image start|>`` its grid size (``2*3``, text) ``<|image token|>``
    its placeholders ``<|extra_201|><|image end|>``: each image is a selection, and with a tokenizer the size is
    the image's (decoded), in a question after a first image (the second's) and in one before its image (its
    own); without one it stays, and prune() warns (its markers are in no config either)."""
    before, after, between = "What is in the picture?", " Describe it.", " And here?"
    model, processor, tokenizer = _emu3(before + after + between)
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"<image>{after}<image>{between}", f"{before}<image>"], padding=True, return_tensors="pt",
                       images=[[_photo(16, 24, gen), _photo(24, 16, gen)], [_photo(16, 16, gen)]])
    assert f"{after}<|image start|>3*2<|image token|>" in tokenizer.decode(inputs["input_ids"][0])  # the size, as text
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 2 * 4), (0, 3 * 3), (1, 2 * 3)]  # h * (w + 1)

    def text(words):  # the prompt's text, spaces aside (a tokenizer drops the blank tokens)
        return "".join(tokenizer.convert_tokens_to_string(words).split())

    assert [text(p) for p in prompts] == [text([after + between])] * 2 + [text([before])]
    assert "3*2" in text(untokenized[0])


def test_apertus1p5_grid_sizes_are_no_question():
    """Apertus 1.5's processor writes each image as ``<|image_start|>`` its grid size (``3*4``, text)
    ``<|image_wrapper|>`` its rows of codes joined by ``<|eol|>``, then ``<|image_end|>``: each image is a
    selection, and with a tokenizer the size is the image's (decoded), as Emu3's; without one it stays."""
    before, after, between = "What is in the picture?", " Describe it.", " And here?"
    model, processor, tokenizer = _apertus1p5(before + after + between)
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"<|image|>{after}<|image|>{between}", f"{before}<|image|>"], padding=True,
                       return_tensors="pt", images=[[_photo(6, 8, gen), _photo(8, 4, gen)], [_photo(4, 4, gen)]])
    assert f"{after}<|image_start|>4*2<|image_wrapper|>" in tokenizer.decode(inputs["input_ids"][0])  # the size, as text
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 3 * 4), (0, 4 * 2), (1, 2 * 2)]
    text = tokenizer.convert_tokens_to_string
    assert [text(p) for p in prompts] == [after + between] * 2 + [before]
    assert "4*2" in text(untokenized[0])


@pytest.mark.parametrize("special_tiles", [False, True], ids=["tile-words", "tile-tokens"])
def test_aya_vision_tile_labels_are_no_question(special_tiles):
    """Aya Vision's processor writes an image as ``<|START_OF_IMG|>``, then each tile after its label (``TILE_1``,
    ``TILE_2``, ..., ``TILE_GLOBAL`` before the whole view; text, or ``TILE`` and ``TILE_GLOBAL`` added as special
    tokens with ``_2`` text), ``<|END_OF_IMG|>``: each tile is a selection, and with a tokenizer the labels are
    the tiles' (decoded). They had stood for the question written before its image (the text after its first
    tile), with or without a tokenizer; without one they still do, and prune() warns."""

    if not hasattr(transformers, "AyaVisionProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Aya Vision")
    markers = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "<image>"]
    before, after = "What is in the picture?", " Describe it."
    tokenizer = _bpe_tokenizer(markers + ["TILE_GLOBAL", "TILE"] * special_tiles,
                               [before + after] + [f"TILE_{i}" for i in range(1, 13)] + ["TILE_GLOBAL"])
    processor = transformers.AyaVisionProcessor(  # 32 px tiles of 4 px patches, pixel-shuffled 2x2: 16 tokens
        image_processor=_image_processor("GotOcr2ImageProcessor", size={"height": 32, "width": 32}, crop_to_patches=True,
                                         max_patches=4),
        tokenizer=tokenizer, patch_size=4, img_size=32, downsample_factor=2, image_token="<image>")
    model = _retokenized("aya_vision", tokenizer, dict(image_token_id="<|IMG_PATCH|>"))
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"<image>{after}", f"{before}<image>"], images=[[_photo(32, 64, gen)], [_photo(64, 32, gen)]],
                       padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # transformers 4.57's tokenizer output, which its model does not take
    layout = re.sub(r"(<\|IMG_PATCH\|>)+", "<P>", tokenizer.decode(inputs["input_ids"][1]))
    assert layout.endswith(f"{before}<|START_OF_IMG|>TILE_1<P>TILE_2<P>TILE_GLOBAL<P><|END_OF_IMG|>")
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * 3 + [(1, 16)] * 3  # 2 tiles and the view
    text = tokenizer.convert_tokens_to_string
    assert [text(p) for p in prompts] == [after] * 3 + [before] * 3
    assert "_GLOBAL" in text(untokenized[-1])  # without a tokenizer, the labels after its first tile


MOLMO2_MARKERS = ["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
                  "<frame_end>", "<im_low>", "<|image|>", "<|video|>"]


def _molmo2(corpus: list[str]):
    """A tiny random Molmo2 (the tiny builder's config, this tokenizer's ids) with the real processor classes:
    16 px crops of 4 px patches, pooled 2x2; a byte-level BPE trained on ``corpus`` and frame times."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    if not hasattr(transformers, "Molmo2Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Molmo2")
    tokenizer = _bpe_tokenizer(MOLMO2_MARKERS, corpus + [f"{t / 2:.1f} " for t in range(20)])
    tokenizer.image_token, tokenizer.video_token = "<|image|>", "<|video|>"
    module, sizes = transformers.models.molmo2, dict(size={"height": 16, "width": 16}, patch_size=4, pooling_size=[2, 2])
    processor = transformers.Molmo2Processor(
        image_processor=module.Molmo2ImageProcessor(max_crops=4, overlap_margins=[1, 1], **sizes),
        video_processor=module.Molmo2VideoProcessor(do_rescale=True, do_normalize=True, **sizes), tokenizer=tokenizer)
    model = _retokenized("molmo2", tokenizer, dict(
        image_start_token_id="<im_start>", low_res_image_start_token_id="<low_res_im_start>", image_end_token_id="<im_end>",
        image_patch_id="<im_patch>", frame_start_token_id="<frame_start>", frame_end_token_id="<frame_end>"),
        text=dict(additional_vocab_size=0))
    return model, processor, tokenizer


def test_molmo2_images_are_one_budget_and_their_column_tokens_are_no_question():
    """Molmo2's processor writes an image as its low-res view, then its high-res one, each row of patches
    ended by a column token that no config names: each image (both views) is a selection, and the column
    token after its last row is no question text, with or without a tokenizer (the processor's token types
    mark it). Without them, a question before its image gave way to that one token: inputs without the types
    (and no tokenizer) warn."""
    before, after = "What is in the picture?", " Describe the image in one sentence."
    model, processor, tokenizer = _molmo2([before + after])
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{before} <|image|>", f"<|image|>{after}"], images=[[_photo(30, 40, gen)], [_photo(40, 24, gen)]],
                       padding=True, return_tensors="pt")
    grids = inputs["image_grids"]
    selections = _selections(model, inputs, processor)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [
        (r, int(g[0] * g[1] + g[2] * g[3])) for r, g in enumerate(grids)]
    prompts = [tokenizer.convert_tokens_to_string(_prompt_words(tokenizer, inputs, s)) for s in selections]
    assert prompts == [before, after]
    for run in (model, lambda **x: model.generate(**x, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)):
        with torch.no_grad(), zspa_kernels.prune(model, keep=4) as handle:
            run(**inputs)  # generate() passes the token types at its prefill too
        untokenized = [tokenizer.convert_tokens_to_string(_prompt_words(tokenizer, inputs, s)) for s in handle.last_selection]
        assert untokenized == [f"<s>{before} ", after]  # no marker; its bos and the blank, which a tokenizer tells
    # Without the token types (and a tokenizer), the column token after the last row is question text: it warns.
    untyped = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad(), zspa_kernels.prune(model, keep=4) as handle:
        with pytest.warns(UserWarning, match=r"Molmo2 inputs without mm_token_type_ids.*tokenizer=processor"):
            model(**untyped)
    assert "<im_col>" in _prompt_words(tokenizer, inputs, handle.last_selection[1])
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle, warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**untyped)
    assert [tokenizer.convert_tokens_to_string(_prompt_words(tokenizer, inputs, s)) for s in handle.last_selection] == prompts


def test_molmo2_videos_are_one_budget_and_their_frame_times_are_no_question():
    """Molmo2's processor writes a video as each frame's time, ``0.5 ``, then ``<frame_start>`` its patch tokens
    ``<frame_end>``: a video is one selection, its inner times inside it, and with a tokenizer its first time is
    no question text either (a question before the video was ranked by it); without one it stays."""
    from transformers.video_utils import VideoMetadata

    before, after, frames = "What is in the picture?", " Describe the video in one sentence.", 4
    model, processor, tokenizer = _molmo2([before + after])
    metadata = [VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))] * 2
    inputs = processor(text=[f"{before} <|video|>", f"<|video|>{after}"], videos=[_video(frames, 32, 32)] * 2,
                       padding=True, return_tensors="pt", videos_kwargs=dict(video_metadata=metadata, do_sample_frames=False))
    text = tokenizer.decode(inputs["input_ids"][0])
    assert f"{before} 0.0 <frame_start>" in text and "<frame_end> 1.5 <frame_start>" in text  # the times, as text
    selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(r, int(g.prod())) for r, g in enumerate(inputs["video_grids"])]
    assert [tokenizer.convert_tokens_to_string(p) for p in prompts] == [before, after]
    assert [tokenizer.convert_tokens_to_string(p) for p in untokenized] == [f"<s>{before} 0.0 ", after]


def test_the_label_search_finds_the_fewest_tokens_that_decode_to_each_label():
    """The decode search (bisection on the decoded length, then a check) gives what decoding suffix after
    suffix gives: the fewest last tokens that decode to the whole timestamp or label (from the first
    character of the one the window's text ends with: ``14.5``, not ``4.5``), markers after it counted in;
    where no suffix decodes to just that, the fewest that decode to a label; or 0. Random labels of every
    processor's format, after random words, on a byte-level BPE."""
    import random

    from zspa_kernels.integrations.transformers import families

    rng = random.Random(0)
    labels = {
        families.TUBELET_LABEL: lambda t: f"Frame {t} sampled at {t / 2:.2f} seconds and frame {t + 1} sampled at "
                                          f"{t / 2 + 0.5:.2f} seconds: ",
        families.TIMESTAMP: lambda t: f"<{t / 2:.1f} seconds>", families.MINUTES_SECONDS: lambda t: f"{t // 60:02d}:{t % 60:02d} ",
        families.TIME_SECONDS: lambda t: f"Time: {t / 2:.1f}s", families.TIME_SECONDS_COLON: lambda t: f",Time {t}.0s:",
        families.FRAME_LABEL: lambda t: f"Frame{t}:", families.FRAME_FROM: lambda t: f"Frame from {t * 7:02d}:{t:02d}: <img>",
        families.CHUNK_LABEL: lambda t: f"00:00:{t:02d}.500<img>video", families.FRAME_TIME: lambda t: f"{t / 2:.1f} <img>",
        families.PAN_AND_SCAN: lambda t: ("Here is the original image" if t % 2 else
                                          "and here are some crops to help you see better") + " \n\n<img>",
        families.GRID_SIZE: lambda t: f"<img>{t + 8}*{t * 2 + 8}</img>",
        families.TILE_LABEL: lambda t: f"<img>TILE_{t + 1}" if t % 3 else "<img>TILE_GLOBAL",
        families.MEDIA_LABEL: lambda t: f"{'Picture' if t % 2 else 'Video'} {t + 1}:"}
    words = "What is in the picture frame? Describe the video at 10 seconds: in one sentence, 2.50 from".split()
    corpus = [" ".join(words)] + [label(t) for label in labels.values() for t in range(0, 40, 3)]
    tokenizer = _bpe_tokenizer(["<img>", "</img>"], corpus)

    def every_suffix(ids, stamp, window):
        ids = ids[-window:]
        decoded = [tokenizer.decode(ids[-n:], skip_special_tokens=True) for n in range(len(ids) + 1)]
        found = re.search(f"(?:{stamp.pattern})\\s*$", decoded[-1])
        if not found:
            return 0
        whole = next(n for n in range(1, len(ids) + 1) if len(decoded[n]) >= len(decoded[-1]) - found.start())
        if stamp.fullmatch(decoded[whole].strip()):
            return whole
        return next((n for n in range(1, len(ids) + 1) if stamp.fullmatch(decoded[n].strip())), 0)

    found = 0
    for _ in range(400):
        stamp = rng.choice(list(labels))
        text = "</img>" + " ".join(rng.choices(words, k=rng.randrange(0, 8)))
        if rng.random() < 0.7:
            text += rng.choice(["", " ", "\n"]) + labels[stamp](rng.randrange(40))
        ids = tokenizer(text + rng.choice(["", "<img>"]))["input_ids"]
        window = rng.choice([16, families.TUBELET_WINDOW])
        n = families._timestamp_before(tokenizer, ids, stamp, window)
        assert n == every_suffix(ids, stamp, window), (stamp.pattern, text)
        found += n > 0
    assert found > 150  # most labels fit their window and are found
    for stamp, label in labels.items():  # each format is found, whatever its numbers (SmolVLM's minutes past 99)
        window = families.TUBELET_WINDOW if stamp is families.TUBELET_LABEL else 16
        assert all(families._timestamp_before(tokenizer, tokenizer(f"What {label(t)}")["input_ids"], stamp, window)
                   for t in range(0, 40, 3)), stamp.pattern


# Its checkpoints' tokenizer adds these as special tokens: the image's begin/end markers, the thumbnail's,
# each tile's row/column marker, and the image token (the one the config names).
LFM2_VL_MARKERS = ["<|image_start|>", "<|image_end|>", "<|img_thumbnail|>", "<image>"] + [
    f"<|img_row_{i}_col_{j}|>" for i in range(1, 4) for j in range(1, 4)]


def _lfm2_vl():
    """A tiny random LFM2-VL with the real processor classes: 32 px tiles of 4 px patches, pixel-unshuffled
    2x2 (16 tokens a tile); an image of more than twice 16 tokens' pixels is split into 2 to 4 tiles and a
    thumbnail of at most 16 tokens; a smaller one is resized whole (at least 4 tokens)."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "lfm2_vl" not in BUILDERS:  # transformers 4.57: its model keeps a cache of its own (families.py)
        pytest.skip(f"prune() takes LFM2-VL from transformers 5.0 only, not {transformers.__version__}")
    import torchvision  # noqa: F401  (its image processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(LFM2_VL_MARKERS, plain=[], bos="<|startoftext|>")
    processor = transformers.Lfm2VlProcessor(
        image_processor=_image_processor("Lfm2VlImageProcessor", encoder_patch_size=4, tile_size=32,
                                         downsample_factor=2, min_image_tokens=4, max_image_tokens=16, min_tiles=2,
                                         max_tiles=4),
        tokenizer=tokenizer)
    model = _retokenized("lfm2_vl", tokenizer, dict(image_token_id="<image>"))
    return model, processor, tokenizer


def _layout(tokenizer, ids) -> str:
    """The row's text without blanks or padding, each run of image tokens as ``<I*n>``."""
    text = tokenizer.decode(ids).replace(" ", "").replace("<pad>", "")
    return re.sub(r"(?:<image>)+", lambda m: f"<I*{len(m.group(0)) // len('<image>')}>", text)


# Row 0: a question before a 64x64 image (2x2 tiles and a 32x32 thumbnail). Row 1: a 40x24 image (unsplit:
# 5x3 tokens), a question, a 32x96 image (1x3 tiles and a 16x48 thumbnail: 2x6 tokens), more words.
LFM2_BEFORE, LFM2_AFTER, LFM2_BETWEEN = "w44 w39 w53 w0", "w43 w39 w7", "w5 w6"
LFM2_SIZES = [[(64, 64)], [(40, 24), (32, 96)]]
LFM2_CROPS = [(0, 16)] * 5 + [(1, 15)] + [(1, 16)] * 3 + [(1, 12)]


def test_lfm2_vl_tiles_and_thumbnails_are_budgeted_apart_and_their_markers_are_no_question():
    """LFM2-VL's processor writes a split image as ``<|image_start|>``, each tile after its
    ``<|img_row_i_col_j|>`` marker, ``<|img_thumbnail|>`` and the thumbnail's tokens, ``<|image_end|>``; an
    unsplit image as its tokens between the begin/end markers; nothing else (no newline, no text, no bos).
    Each tile, thumbnail and unsplit image is a selection; with a tokenizer (which alone names the markers)
    the prompts are the question words exactly, a question before its image included, also in generate().
    Without one (the family is flagged ``unnamed_markers``: prune() warns) the markers after an image's
    first tile are question text: a question written before its image gives way to them."""
    model, processor, tokenizer = _lfm2_vl()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{LFM2_BEFORE} <image>", f"<image> {LFM2_AFTER} <image> {LFM2_BETWEEN}"], padding=True,
                       return_tensors="pt", images=[[_photo(*s, gen) for s in row] for row in LFM2_SIZES])
    assert _layout(tokenizer, inputs["input_ids"][0]) == (
        "w44w39w53w0<|image_start|><|img_row_1_col_1|><I*16><|img_row_1_col_2|><I*16><|img_row_2_col_1|><I*16>"
        "<|img_row_2_col_2|><I*16><|img_thumbnail|><I*16><|image_end|>")
    assert _layout(tokenizer, inputs["input_ids"][1]) == (
        "<|image_start|><I*15><|image_end|>w43w39w7<|image_start|><|img_row_1_col_1|><I*16><|img_row_1_col_2|>"
        "<I*16><|img_row_1_col_3|><I*16><|img_thumbnail|><I*12><|image_end|>w5w6")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the processor as tokenizer: nothing to warn of
        zspa_kernels.prune(model, keep=4, tokenizer=processor).remove()
    with pytest.warns(UserWarning, match=r"LFM2-VL processors write image markers .*tokenizer=processor"):
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == LFM2_CROPS  # 2x2 tiles + thumbnail; unsplit; 1x3 + thumbnail
    assert prompts == [LFM2_BEFORE.split()] * 5 + [(LFM2_AFTER + " " + LFM2_BETWEEN).split()] * 5
    # Without a tokenizer: each row's text after its first tile, markers and all; row 0's question is gone.
    tiles_0 = ["<|img_row_1_col_2|>", "<|img_row_2_col_1|>", "<|img_row_2_col_2|>", "<|img_thumbnail|>", "<|image_end|>"]
    row_1 = ["<|image_end|>", *LFM2_AFTER.split(), "<|image_start|>", "<|img_row_1_col_1|>", "<|img_row_1_col_2|>",
             "<|img_row_1_col_3|>", "<|img_thumbnail|>", "<|image_end|>", *LFM2_BETWEEN.split()]
    assert untokenized == [tiles_0] * 5 + [row_1] * 5


def test_lfm2_vl_crops_without_markers_are_budgeted_apart():
    """With ``use_image_special_tokens=False`` the processor writes no marker at all: a split image's tiles and
    thumbnail, and images back to back, are one run of image tokens. Each crop (tile, thumbnail, unsplit image)
    is still a selection, told apart by its patch grid (``spatial_shapes``: ``(h // 2) * (w // 2)`` tokens), as
    with the markers; they had been one budget, two images and all. Nothing but the question is text here,
    with or without a tokenizer."""
    model, processor, tokenizer = _lfm2_vl()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{LFM2_BEFORE} <image>", f"<image><image> {LFM2_AFTER}"], padding=True, return_tensors="pt",
                       images=[[_photo(*s, gen) for s in row] for row in LFM2_SIZES], use_image_special_tokens=False)
    assert _layout(tokenizer, inputs["input_ids"][0]) == "w44w39w53w0<I*80>"
    assert _layout(tokenizer, inputs["input_ids"][1]) == "<I*75>w43w39w7"  # two images, one run
    with pytest.warns(UserWarning, match=r"LFM2-VL processors write image markers .*tokenizer=processor"):
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == LFM2_CROPS
    assert prompts == untokenized == [LFM2_BEFORE.split()] * 5 + [LFM2_AFTER.split()] * 5


# Gemma 3's chat template as its checkpoints ship it (whitespace control trimmed): a system message goes
# before the first user message's content, then two newlines.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def test_gemma3_chat_template_text_is_no_question():
    """Gemma 3's chat template writes ``<start_of_turn>user``, the message, ``<end_of_turn>``, then
    ``<start_of_turn>model``: with ``tokenizer=`` (the processor, which holds the template) its text is no
    question, so a question written before its image is the prompt, not the word ``model`` after it (as it
    was); a system message's text, which the template writes into the user's turn, is no question either.
    Without the template the role word stays, and stands alone for a question written before its image."""
    model, processor, tokenizer = _gemma3(["<start_of_turn>", "<end_of_turn>"], ("user", "model"))
    processor.chat_template = GEMMA3_TEMPLATE
    gen = torch.Generator().manual_seed(0)
    question, system = "w4 w5 w6", "w20 w21"

    def text(*parts, system_prompt=None):
        messages = [{"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                                 for p in parts]}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    texts = [text(question, None), text(None, question), text(None, question, system_prompt=system)]
    assert texts[0].endswith(f"{question}<start_of_image><end_of_turn>\n<start_of_turn>model\n")
    inputs = processor(text=texts, images=[[_photo(16, 16, gen)] for _ in texts], padding=True, return_tensors="pt")
    selections, prompts, _ = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16), (1, 16), (2, 16)]
    assert prompts == [question.split()] * 3
    processor.chat_template = None
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model(**inputs)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == [
        ["model"], [*question.split(), "model"], [*question.split(), "model"]]


# LLaVA-1.5's chat template (llava-hf's): "USER: <image>\n{question} ASSISTANT:".
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
                  "{% elif item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_llava_chat_template_text_is_no_question_where_merged_into_its_words():
    """LLaVA-1.5's template writes ``USER:`` before and ``ASSISTANT:`` after the message; a byte-level BPE
    merges the space before each word into it (``ĠASSISTANT``), so the template's runs are read as the
    tokenizer writes them in context. With ``tokenizer=`` the prompt is the question's tokens alone."""
    tokenizer = _bpe_tokenizer(["<image>"], ["USER: ASSISTANT: what is the color of the cat on the mat ?"])
    images = _image_processor("CLIPImageProcessor", size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            image_token="<image>", chat_template=LLAVA_TEMPLATE)
    model = _retokenized("llava", tokenizer, dict(image_token_id="<image>", image_token_index="<image>"))
    question = "what is the color of the cat ?"
    texts = [processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
             for parts in ([{"type": "image"}, {"type": "text", "text": question}],
                           [{"type": "text", "text": question}, {"type": "image"}])]
    assert texts[0] == f"USER: <image>\n{question} ASSISTANT:"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(16, 16, gen)], [_photo(16, 16, gen)]], padding=True,
                       return_tensors="pt")
    inputs.pop("token_type_ids", None)  # 4.57's tokenizer returns them; its LLaVA takes none
    selections = _video_prompts(model, inputs, processor, tokenizer)[0]
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16), (1, 16)]
    decoded = [tokenizer.decode(inputs["input_ids"][s.batch_row, s.prompt_tokens]).strip() for s in selections]
    assert decoded == [question, question]


IDEFICS2_FAKE, IDEFICS2_IMAGE, IDEFICS2_END = "<fake_token_around_image>", "<image>", "<end_of_utterance>"


def _idefics2_layout(tokenizer, row: torch.Tensor) -> str:
    """The row's tokens, each run of image tokens written ``<image>*n``, left padding dropped."""
    words = [t for t in tokenizer.convert_ids_to_tokens(row.tolist()) if t != tokenizer.pad_token]
    return " ".join(f"{t}*{len(list(run))}" if t == IDEFICS2_IMAGE else " ".join(run) for t, run in groupby(words))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_idefics2_crops_are_budgeted_apart_and_their_markers_are_no_question(split):
    """Idefics2's processor writes each image as ``<fake_token_around_image>``, 16 ``<image>`` tokens (the
    perceiver's latents), ``<fake_token_around_image>``; with ``do_image_splitting`` (read from its image
    processor, not the call) five of them back to back, one ``<fake_token_around_image>`` between: the four
    crops, then the whole image. Each crop (and the whole image) is one selection of 16 tokens. The chat
    template's ``<end_of_utterance>`` and the markers (added as special by the processor, named by no config)
    are no question text with a tokenizer: each row's prompt is its question, written before its image in one
    row and after it in the other. Without a tokenizer (``unnamed_markers``: prune() warns) they count as
    question text: the question written before its image gives way to the markers after its first crop."""
    tokenizer = _tokenizer([IDEFICS2_FAKE, IDEFICS2_IMAGE, IDEFICS2_END], plain=[])
    image_processor = _image_processor("Idefics2ImageProcessor", do_image_splitting=split,
                                       size={"shortest_edge": 32, "longest_edge": 32})
    processor = transformers.Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)
    model = _retokenized("idefics2", tokenizer, dict(image_token_id=IDEFICS2_IMAGE, pad_token_id="<pad>"))
    assert model.config.perceiver_config.resampler_n_latents == 16
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"{before}{IDEFICS2_IMAGE}{IDEFICS2_END}", f"{IDEFICS2_IMAGE}{after}{IDEFICS2_END}"],
                       images=[[_photo(64, 40, gen)], [_photo(40, 64, gen)]], padding=True, return_tensors="pt")
    crops = 5 if split else 1
    assert inputs["pixel_values"].shape[:2] == (2, crops)
    image = f"{IDEFICS2_FAKE} " + f"{IDEFICS2_IMAGE}*16 {IDEFICS2_FAKE} " * crops
    assert [_idefics2_layout(tokenizer, row) for row in inputs["input_ids"]] == [
        f"{before} {image}{IDEFICS2_END}", f"{image}{after} {IDEFICS2_END}"]

    with pytest.warns(UserWarning, match=r"Idefics2 processors write image markers .*tokenizer=processor"):
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, 16)] * crops + [(1, 16)] * crops
    assert all(s.order.numel() == 4 for s in selections)  # each crop its own budget
    assert prompts == [before.split()] * crops + [after.split()] * crops
    # Without a tokenizer: the markers after each row's first crop (those between the crops, the closing one)
    # and <end_of_utterance> are question text; the question before its image is lost.
    assert untokenized == [[IDEFICS2_FAKE] * crops + [IDEFICS2_END]] * crops + [[IDEFICS2_FAKE] * crops + after.split() + [IDEFICS2_END]] * crops


COHERE2_MARKERS = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"]


def _cohere2_vision():
    """A tiny random Cohere2 Vision (the tiny builder's config, this tokenizer's ids) with the real processor
    classes: 32 px tiles of 4 px patches, pixel-shuffled 2x2 (16 tokens: the image processor's ``patch_size`` is
    the tokens a tile's side), at most 4 tiles and a thumbnail."""
    import torchvision  # noqa: F401  (its image processor needs it: an error here, not a skip)

    if not hasattr(transformers, "Cohere2VisionProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Cohere2 Vision")
    boi, eoi, image, line_break = COHERE2_MARKERS
    tokenizer = _tokenizer(COHERE2_MARKERS, plain=[], bos="<BOS_TOKEN>", boi_token=boi, eoi_token=eoi,
                           image_token=image, img_line_break_token=line_break)
    images = getattr(transformers, "Cohere2VisionImageProcessor", None) or transformers.Cohere2VisionImageProcessorFast
    processor = transformers.Cohere2VisionProcessor(
        image_processor=images(size={"height": 32, "width": 32}, patch_size=4, crop_to_patches=True, max_patches=4),
        tokenizer=tokenizer)
    model = _retokenized("cohere2_vision", tokenizer, dict(image_token_id=image))
    return model, processor, tokenizer


def test_cohere2_vision_tiles_are_budgeted_apart_and_their_line_breaks_are_no_question():
    """Cohere2 Vision's processor writes an image as ``<|START_OF_IMG|>``, then each tile (the thumbnail last,
    where there are several) as its 16 ``<|IMG_PATCH|>`` tokens and an ``<|IMG_LINE_BREAK|>``, then
    ``<|END_OF_IMG|>``: every tile is a run of its own and a selection of its own (``_tower_counts``: one per
    ``pixel_values`` entry, which are the tiles), keep-all bit for bit. With a tokenizer the markers are no
    question text: the prompts are the question words, written before the image or after it (also in
    generate()). Without one no config names them: the line breaks and the end marker stand for a question
    written before its image and come before one written after it, and prune() warns."""
    model, processor, tokenizer = _cohere2_vision()
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    image = processor.image_token
    inputs = processor(text=[f"{before} {image}", f"{image} {after}"],
                       images=[[_photo(32, 64, gen)], [_photo(96, 32, gen)]], padding=True, return_tensors="pt")
    tiles = [2 + 1, 3 + 1]  # 1x2 and 3x1 tiles, and each image's thumbnail
    assert inputs["pixel_values"].shape[0] == sum(tiles)
    layout = re.sub(r"(<\|IMG_PATCH\|>)+", "<P>", tokenizer.decode(inputs["input_ids"][0]).replace(" ", ""))
    assert layout.endswith("w44w39w53w0<|START_OF_IMG|>" + "<P><|IMG_LINE_BREAK|>" * tiles[0] + "<|END_OF_IMG|>")
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert runs == [(0, 16)] * tiles[0] + [(1, 16)] * tiles[1]

    with pytest.warns(UserWarning, match=r"Cohere2 Vision processors write image markers .*tokenizer=processor"):
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == [before.split()] * tiles[0] + [after.split()] * tiles[1]
    marks = [["<|IMG_LINE_BREAK|>"] * n + ["<|END_OF_IMG|>"] for n in tiles]  # the breaks, after the first tile on
    assert untokenized == [marks[0]] * tiles[0] + [marks[1] + after.split()] * tiles[1]


ARIA_MARKERS = ["<fim_prefix>", "<fim_suffix>", "<|img|>"]
ARIA_IMAGE = "<fim_prefix><|img|><fim_suffix>"  # as its chat template writes an image


def _aria():
    """A tiny random Aria (the tiny builder's MoE text model and projector, this tokenizer's ids) with the real
    processor classes: its crops are 490 px (the smaller of the two sizes its processor takes), here of 70 px
    patches (7x7), which the projector turns into 16 queries (``size_conversion``: 16 tokens a crop)."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "AriaProcessor") or "aria" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Aria")
    tokenizer = _tokenizer(ARIA_MARKERS, plain=[], bos="<|im_start|>", image_token="<|img|>")
    images = getattr(transformers, "AriaImageProcessorPil", None) or transformers.AriaImageProcessor
    processor = transformers.AriaProcessor(image_processor=images(max_image_size=490, min_image_size=70),
                                           tokenizer=tokenizer, size_conversion={490: 16})
    tiny = BUILDERS["aria"]()
    config = tiny.model.config.to_dict()
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config["vision_config"].update(image_size=490, patch_size=70)
    config.update(image_token_index=tokenizer.convert_tokens_to_ids("<|img|>"), projector_patch_to_query_dict={49: 16},
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    projector = model.model.multi_modal_projector  # distinct queries and keys, as the tiny builder's
    with torch.no_grad():
        for weight in (projector.query, projector.cross_attn.q_proj.weight, projector.cross_attn.k_proj.weight):
            torch.nn.init.normal_(weight, std=1.0)
    return model, processor, tokenizer


def test_aria_split_image_crops_are_budgeted_apart_and_its_template_markers_are_no_question():
    """Aria's processor (``split_image=True``) writes an image as one run of image tokens, 16 for each of its
    crops, with no marker or separator between them; its chat template writes ``<fim_prefix>`` and
    ``<fim_suffix>`` around it, which no config names. Every crop is a selection (``_tower_counts``: one per
    ``pixel_values`` entry), keep-all bit for bit. With a tokenizer the markers are no question text: the
    prompts are the question words, before the image or after it (also in generate()). Without one,
    ``<fim_suffix>`` alone stands for a question written before its image, and prune() warns."""
    model, processor, tokenizer = _aria()
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"{before} {ARIA_IMAGE}", f"{ARIA_IMAGE} {after}"],
                       images=[[_photo(60, 120, gen)], [_photo(120, 60, gen)]], padding=True, return_tensors="pt",
                       images_kwargs=dict(max_image_size=490, split_image=True))  # 4.57 takes them only so
    inputs.pop("num_crops", None)  # returned by 4.57; the model takes none
    crops = 2  # each image fits 490x980 or 980x490: two crops (a batch's images must have as many: the
    assert inputs["pixel_values"].shape[0] == 2 * crops  # processor writes its largest count for each)
    layout = re.sub(r"(<\|img\|>)+", lambda m: f"<{len(m.group(0)) // len('<|img|>')}>",
                    tokenizer.decode(inputs["input_ids"][0]).replace(" ", ""))
    assert layout == "w44w39w53w0<fim_prefix><32><fim_suffix>"
    image = model.config.image_token_index
    assert _runs(inputs["input_ids"], image) == [(0, 16 * crops), (1, 16 * crops)]

    with pytest.warns(UserWarning, match=r"Aria processors write image markers .*tokenizer=processor"):
        selections, prompts, untokenized = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, 16)] * crops + [(1, 16)] * crops
    assert prompts == [before.split()] * crops + [after.split()] * crops
    assert untokenized == [["<fim_suffix>"]] * crops + [["<fim_suffix>", *after.split()]] * crops
    assert all(s.order.numel() == 4 for s in selections)  # each crop its own budget


BEFORE_IMAGE, AFTER_IMAGES = "w44 w39 w53 w0", "w43 w39 w7"


def _token_layout(tokenizer, inputs, row: int, *visual: str, bos: bool = True) -> list[str]:
    """Row ``row``'s tokens, padding aside (and a leading BOS, with ``bos=False``: 4.57's Llama tokenizer
    writes one), each run of one of the ``visual`` tokens written ``token*n``."""
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist())
    if not bos and tokens[:1] == [tokenizer.bos_token]:
        tokens = tokens[1:]
    layout = []
    for token, run in groupby(tokens):
        n = len(list(run))
        layout += [f"{token}*{n}"] if token in visual else [token] * n
    return layout


def _prompts_and_warnings(model, inputs, processor, tokenizer):
    """:func:`_video_prompts` (selections; prompt words with ``tokenizer=``, generate()'s the same; without
    one), and the warnings prune() gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _video_prompts(model, inputs, processor, tokenizer)
    return (*out, [str(w.message) for w in caught if str(w.message).startswith("prune()")])


GEMMA3N_MARKERS = dict(boi_token="<start_of_image>", boa_token="<start_of_audio>", eoi_token="<end_of_image>",
                       image_token="<image_soft_token>", eoa_token="<end_of_audio>", audio_token="<audio_soft_token>")


def _gemma3n():
    """The real Gemma3nProcessor (SigLIP's image processor, 32 px; 16 soft tokens an image; Gemma 3n's audio
    feature extractor, unused) and the tiny builder's model rebuilt on this tokenizer's ids: as in the real
    vocabulary, the end-of-image marker and the image token come after the text vocabulary (the ids the vision
    embedder's table holds, from its ``vocab_offset``), then the audio ones, and per-layer inputs cover the
    text ids only. Its vision tower is the builder's stand-in for timm's MobileNetV5 (no timm, no download)."""
    from unittest import mock

    from transformers.models.gemma3n import modeling_gemma3n

    from zspa_kernels.integrations.transformers.tiny import BUILDERS, _FeatureMapTower

    tokenizer = _tokenizer(list(GEMMA3N_MARKERS.values()), plain=["\n\n"], bos="<bos>", **GEMMA3N_MARKERS)
    processor = transformers.Gemma3nProcessor(
        feature_extractor=transformers.Gemma3nAudioFeatureExtractor(),
        image_processor=_image_processor("SiglipImageProcessor", size={"height": 32, "width": 32}),
        tokenizer=tokenizer, image_seq_length=16, audio_seq_length=8)
    ids = {name[:-len("_token")] + "_token_id": tokenizer.convert_tokens_to_ids(token)
           for name, token in GEMMA3N_MARKERS.items()}
    vision, audio = ids["eoi_token_id"], ids["eoa_token_id"]
    assert ids["image_token_id"] == vision + 1 and audio == vision + 2 and ids["audio_token_id"] == len(tokenizer) - 1
    tiny = BUILDERS["gemma3n"]()
    config = tiny.model.config.to_dict()
    config["text_config"].update(vocab_size=len(tokenizer), vocab_size_per_layer_input=vision,
                                 pad_token_id=tokenizer.pad_token_id)
    config["vision_config"].update(vocab_offset=vision, vocab_size=audio - vision)
    config["audio_config"].update(vocab_offset=audio, vocab_size=len(tokenizer) - audio)
    config.update(ids, pad_token_id=tokenizer.pad_token_id)

    class Auto:  # as the tiny builder: the stand-in for the timm tower, every other tower as it is
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type == "gemma3n_vision":
                return _FeatureMapTower(config)
            return transformers.AutoModel.from_config(config, **kwargs)

    torch.manual_seed(0)
    with mock.patch.object(modeling_gemma3n, "AutoModel", Auto):
        model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    return model, processor, tokenizer


def test_gemma3n_prompts_hold_the_question_not_the_newlines_around_images():
    """Gemma 3n's processor writes every image as ``"\\n\\n<start_of_image>"``, 16 ``<image_soft_token>``,
    ``"<end_of_image>\\n\\n"`` (as Gemma3's): the markers are named by the config (``boi_token_id``,
    ``eoi_token_id``), the newlines are ordinary tokens. Each image is one selection (a row's two images, two);
    with ``tokenizer=`` the prompts are exactly the question words, written before the image or after (keep-all
    logits bit for bit, generate() the same prompts). Without one prune() does not warn (no marker the config
    does not name) and the newlines are question text: the question written before its image is ranked by the
    newline after it alone, and newlines between and after a row's images join the question after them."""
    model, processor, tokenizer = _gemma3n()
    image = GEMMA3N_MARKERS["image_token"]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {image}", f"{image} {image} {AFTER_IMAGES}"],
                       images=[[_photo(30, 30, gen)], [_photo(40, 24, gen), _photo(24, 40, gen)]], padding=True,
                       return_tensors="pt")
    around = ["\n\n", "<start_of_image>", f"{image}*16", "<end_of_image>", "\n\n"]
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE_IMAGE.split() + around
    assert _token_layout(tokenizer, inputs, 1, image) == around * 2 + AFTER_IMAGES.split()
    assert (inputs["token_type_ids"] == 1).sum().item() == 3 * 16  # the image tokens, typed (the model takes them)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16), (1, 16), (1, 16)]
    assert prompts == [BEFORE_IMAGE.split(), AFTER_IMAGES.split(), AFTER_IMAGES.split()]
    assert not warned
    # Without a tokenizer: the newline after the image, and those between two images and after them.
    assert untokenized == [["\n\n"]] + [["\n\n"] * 3 + AFTER_IMAGES.split()] * 2


def _janus(system_prompt: bool = False):
    """The real JanusProcessor (Janus's image processor, 16 px; 16 image tokens an image: 4.57's processor
    fixes 576, its attribute is set) and the tiny builder's model on this tokenizer's ids."""
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    boi, eoi, image = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
    system = tuple(dict.fromkeys(DEFAULT_SYSTEM_PROMPT.split()))  # its words, in the vocabulary
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes Llama's tokenizer class only
    tokenizer = _tokenizer([boi, eoi, image], plain=["\n\n"], bos="<｜begin▁of▁sentence｜>", words=system,
                           cls=transformers.LlamaTokenizerFast if v4 else None, boi_token=boi, eoi_token=eoi,
                           image_token=image)
    processor = transformers.JanusProcessor(
        image_processor=_image_processor("JanusImageProcessor", size={"height": 16, "width": 16}, min_size=4),
        tokenizer=tokenizer, num_image_tokens=16, use_default_system_prompt=system_prompt)
    processor.num_image_tokens = 16  # 4.57's takes no num_image_tokens= (576)
    return _retokenized("janus", tokenizer, dict(image_token_id=image)), processor, tokenizer


@pytest.mark.parametrize("system_prompt", [False, True], ids=["plain", "system_prompt"])
def test_janus_prompts_hold_the_question_and_without_a_tokenizer_prune_warns_of_its_end_marker(system_prompt):
    """Janus's processor writes every image as ``<begin_of_image>``, 16 ``<image_placeholder>``,
    ``<end_of_image>``, nothing else around it; its config names the image token only, so the family is flagged
    ``unnamed_markers``. Each image is one selection; with ``tokenizer=`` the prompts are exactly the question
    words. Without one prune() warns, and rightly: ``<end_of_image>`` is question text, and a question written
    before its image is ranked by it alone. With ``use_default_system_prompt`` the processor writes its system
    prompt in words and ``"\\n\\n"`` ahead of each row: plain template text, which stays in a prompt taken from the
    text before the image (the newline goes, with ``tokenizer=``); a prompt after the image holds the question."""
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    model, processor, tokenizer = _janus(system_prompt)
    image = "<image_placeholder>"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {image}", f"{image} {image} {AFTER_IMAGES}"],
                       images=[[_photo(30, 30, gen)], [_photo(40, 24, gen), _photo(24, 40, gen)]], padding=True,
                       return_tensors="pt")
    system = tokenizer.tokenize(DEFAULT_SYSTEM_PROMPT) if system_prompt else []  # its words, then "\n\n"
    around, bos = ["<begin_of_image>", f"{image}*16", "<end_of_image>"], tokenizer.bos_token  # 4.57's adds <bos>
    assert [t for t in _token_layout(tokenizer, inputs, 0, image) if t != bos] == system + BEFORE_IMAGE.split() + around
    assert [t for t in _token_layout(tokenizer, inputs, 1, image) if t != bos] == system + around * 2 + AFTER_IMAGES.split()
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16), (1, 16), (1, 16)]
    question = [w for w in system if w != "\n\n"] + BEFORE_IMAGE.split()  # the system prompt's words, no newline
    assert prompts == [question, AFTER_IMAGES.split(), AFTER_IMAGES.split()]
    assert len(warned) == 1 and "Janus" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: the end marker after the image, and the second image's markers after the first.
    markers = ["<end_of_image>", "<begin_of_image>", "<end_of_image>"]
    assert untokenized == [["<end_of_image>"]] + [markers + AFTER_IMAGES.split()] * 2


def test_template_runs_are_the_same_from_a_tokenizer_without_offsets(monkeypatch):
    """A tokenizer that gives no offsets (a slow one) has the template's pieces between the messages
    tokenized alone: the same runs here, the image token ending a run and the blanks at their ends trimmed."""
    from zspa_kernels.integrations.transformers.families import template_token_runs

    tokenizer = _bpe_tokenizer(["<image>"], ["USER: ASSISTANT: what is the color of the cat on the mat ?"])
    processor = transformers.LlavaProcessor(
        image_processor=_image_processor("CLIPImageProcessor"), tokenizer=tokenizer, image_token="<image>",
        chat_template=LLAVA_TEMPLATE)
    image = {tokenizer.convert_tokens_to_ids("<image>")}
    runs = template_token_runs(processor, image)
    assert sorted(tokenizer.decode(list(r)) for r in runs) == [" ASSISTANT:", "ASSISTANT:", "USER:"]
    call = type(tokenizer).__call__

    def without_offsets(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", without_offsets)
    assert template_token_runs(processor, image) == runs
    assert template_token_runs(tokenizer, image) == []  # the template is the processor's


# Qwen2-VL's and Qwen2.5-VL's chat template (its image part; no videos, no tools): a default system prompt
# where the conversation has none.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_qwen_chat_template_default_system_prompt_is_no_question():
    """Qwen2.5-VL's chat template writes a default system prompt in words (``You are a helpful assistant.``)
    where the conversation has none, then the user's turn, then ``<|im_start|>assistant``: with ``tokenizer=``
    none of it is question text, so a question written before its image is the prompt alone (it had been the
    word ``assistant``; falling back to the text before the image, the system prompt's words and ``user``)."""
    words = tuple("system You are a helpful assistant. user assistant".split())
    model, processor, tokenizer = _qwen("2.5", ["<|im_start|>", "<|im_end|>"], words)
    processor.chat_template = QWEN_TEMPLATE
    gen = torch.Generator().manual_seed(0)
    question = "w4 w5 w6"
    texts = [processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
             for parts in ([{"type": "text", "text": question}, {"type": "image"}],
                           [{"type": "image"}, {"type": "text", "text": question}])]
    assert texts[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    inputs = processor(text=texts, images=[[_photo(56, 56, gen)], [_photo(56, 56, gen)]], padding=True,
                       return_tensors="pt")
    selections, prompts, _ = _video_prompts(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id)
    assert prompts == [question.split()] * 2
    processor.chat_template = None
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model(**inputs)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == [
        ["assistant"], [*question.split(), "assistant"]]
