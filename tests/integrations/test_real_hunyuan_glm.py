"""prune() on the token layouts that HunYuan-VL's, GLM-OCR's and GLM-4.6V's real processor classes write
(transformers 5.x; 4.57 has none of them): built offline around a word-level tokenizer holding each family's
markers, the models tiny and random with the tokenizer's ids in their configs (the tiny builders' configs,
:func:`_retokenized`). HunYuan-VL: an image is the template's begin/end markers (``im_start_id``/``im_end_id``
in the config) around one run of image tokens (its rows, a newline feature a row, and a begin and an end
feature, all on the image token). GLM-OCR (whose checkpoint names GLM-4.6V's processor), GLM-4.6V and
GLM-5-Next (its own processor class, the same layout): an
image is ``<|begin_of_image|>`` its tokens ``<|end_of_image|>``; a GLM-4.6V video is each frame as an image
followed by its time (``0.5 seconds``, words), all between the begin/end-of-video markers its template
writes (GLM-5-Next's likewise). Every marker is named by the configs, so none of these families warns without a tokenizer."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from .test_real_processors import (  # noqa: E402
    BEFORE_IMAGE, AFTER_IMAGES, GLM_MARKERS, GLM_VIDEO, _image_processor, _photo, _prompts_and_warnings, _retokenized,
    _runs, _token_layout, _tokenizer, _video)

# HunyuanOCR's tokenizer names its image markers so (its ``extra_special_tokens``).
HUNYUAN_MARKERS = dict(image_token="<｜hy_place▁holder▁no▁102｜>", image_start_token="<｜hy_place▁holder▁no▁100｜>",
                       image_end_token="<｜hy_place▁holder▁no▁101｜>")
HUNYUAN_IMAGE = "".join(HUNYUAN_MARKERS[k] for k in ("image_start_token", "image_token", "image_end_token"))
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"  # as its chat template writes an image
# GLM-4.6V's frame times, "0.5 seconds": ordinary words of the real tokenizer, here too.
GLM_TIMES = tuple(f"{t / 2:.1f}" for t in range(40)) + ("seconds",)
BETWEEN = "w5 w6"


def _builder(name: str):
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if name not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no {name} (the family needs 5.x)")


def _hunyuan_vl():
    """A tiny random HunYuan-VL with the real processor (2 px patches merged 2x2, 64 to 256 pixels an image)."""
    from zspa_kernels.integrations.transformers.families import special_token_ids

    _builder("hunyuan_vl")
    tokenizer = _tokenizer(list(HUNYUAN_MARKERS.values()), plain=[], bos="<｜hy_begin▁of▁sentence｜>",
                           **HUNYUAN_MARKERS)
    processor = transformers.HunYuanVLProcessor(
        image_processor=_image_processor("HunYuanVLImageProcessor", patch_size=2, merge_size=2, min_pixels=8 * 8,
                                         max_pixels=16 * 16), tokenizer=tokenizer)
    model = _retokenized("hunyuan_vl", tokenizer, dict(image_token_id=HUNYUAN_MARKERS["image_token"],
                                                       im_start_id=HUNYUAN_MARKERS["image_start_token"],
                                                       im_end_id=HUNYUAN_MARKERS["image_end_token"]),
                         # Its text config's defaults name ids 1-4 (bos, eos, eod, sep): here ``w0`` is 4.
                         text=dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   eod_token_id=tokenizer.eos_token_id, sep_token_id=None))
    assert tokenizer.convert_tokens_to_ids("w0") not in special_token_ids(model.config)
    return model, processor, tokenizer


def test_hunyuan_vl_images_are_budgeted_apart_and_their_markers_are_no_question():
    """HunYuan-VL's processor writes each ``<start><image><end>`` placeholder (its template's) as the markers
    around one run of ``h * (w + 1) + 2`` image tokens (an ``h x w`` merged grid, a newline feature a row, a
    begin and an end feature): each image is one selection, two images back to back too (the markers stand
    between them). Its config names the markers (``im_start_id``, ``im_end_id``), so with a tokenizer or
    without the prompts are the question words, written before two images or around them; prune() does not
    warn. Keep-all logits bit for bit, generate() the same prompts."""
    model, processor, tokenizer = _hunyuan_vl()
    start, image, end = (HUNYUAN_MARKERS[k] for k in ("image_start_token", "image_token", "image_end_token"))
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {HUNYUAN_IMAGE}{HUNYUAN_IMAGE}",
                             f"{HUNYUAN_IMAGE} {BETWEEN} {HUNYUAN_IMAGE} {AFTER_IMAGES}"],
                       images=[[_photo(16, 12, gen), _photo(12, 16, gen)], [_photo(16, 16, gen), _photo(8, 16, gen)]],
                       padding=True, return_tensors="pt")
    grids = inputs["image_grid_thw"].tolist()
    counts = [h // 2 * (w // 2 + 1) + 2 for _, h, w in grids]
    assert counts == [18, 17, 22, 12]  # 4x3, 3x4, 4x4, 2x4 merged grids
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE_IMAGE.split() + [
        start, f"{image}*18", end, start, f"{image}*17", end]
    assert _token_layout(tokenizer, inputs, 1, image) == [
        start, f"{image}*22", end, *BETWEEN.split(), start, f"{image}*12", end, *AFTER_IMAGES.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 18), (0, 17), (1, 22), (1, 12)]
    question = (BETWEEN + " " + AFTER_IMAGES).split()
    assert prompts == untokenized == [BEFORE_IMAGE.split()] * 2 + [question] * 2
    assert not warned


# The processor class of each GLM builder's checkpoints: GLM-OCR's names GLM-4.6V's; GLM-5-Next has its own
# (the same layout).
GLM_PROCESSORS = dict(glm_ocr="Glm46V", glm46v="Glm46V", glm5_next="Glm5Next")


def _glm(builder: str):
    """The tiny ``builder``'s model (GLM-OCR, GLM-4.6V: GLM-4.1V's model classes; GLM-5-Next) on the ids of its
    checkpoints' real processor (:data:`GLM_PROCESSORS`): 2 px patches of 2 frames, 2x2 merged."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    prefix = GLM_PROCESSORS[builder]
    if not hasattr(transformers, f"{prefix}Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}Processor (5.x)")
    _builder(builder)
    tokenizer = _tokenizer(GLM_MARKERS, plain=[], words=GLM_TIMES, bos="[gMASK]")
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=_image_processor(f"{prefix}ImageProcessor", size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32},
                                         **sizes),
        video_processor=getattr(transformers, f"{prefix}VideoProcessor")(
            size={"shortest_edge": 8 * 8, "longest_edge": 16 * 16 * 8}, **sizes), tokenizer=tokenizer)
    model = _retokenized(builder, tokenizer, dict(
        image_token_id="<|image|>", video_token_id="<|video|>", image_start_token_id="<|begin_of_image|>",
        image_end_token_id="<|end_of_image|>", video_start_token_id="<|begin_of_video|>",
        video_end_token_id="<|end_of_video|>"))
    return model, processor, tokenizer


@pytest.mark.parametrize("builder", list(GLM_PROCESSORS))
def test_glm_images_are_budgeted_apart_and_their_markers_are_no_question(builder):
    """GLM-OCR's, GLM-4.6V's and GLM-5-Next's processors (GLM-4.6V's; GLM-5-Next's) write each image as ``<|begin_of_image|>``, ``h * w / 4``
    image tokens, ``<|end_of_image|>`` (typed 1 in ``mm_token_type_ids``): each image is one selection, two back
    to back too. The config names the markers, so with a tokenizer or without the prompts are the question
    words, written before two images or around them; prune() does not warn. Keep-all logits bit for bit,
    generate() the same prompts."""
    model, processor, tokenizer = _glm(builder)
    image = "<|image|>"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {GLM_IMAGE}{GLM_IMAGE}", f"{GLM_IMAGE} {BETWEEN} {GLM_IMAGE} {AFTER_IMAGES}"],
                       images=[[_photo(16, 24, gen), _photo(24, 16, gen)], [_photo(16, 16, gen), _photo(8, 24, gen)]],
                       padding=True, return_tensors="pt")
    counts = [t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    small = counts[3]  # an 8x24 photo: GLM-5-Next's image processor resizes it otherwise
    assert counts == [24, 24, 16, 21 if builder == "glm5_next" else 12]
    around = lambda n: ["<|begin_of_image|>", f"{image}*{n}", "<|end_of_image|>"]  # noqa: E731
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE_IMAGE.split() + around(24) + around(24)
    assert _token_layout(tokenizer, inputs, 1, image) == around(16) + BETWEEN.split() + around(small) + AFTER_IMAGES.split()
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == model.config.image_token_id)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 24), (0, 24), (1, 16), (1, small)]
    question = (BETWEEN + " " + AFTER_IMAGES).split()
    assert prompts == untokenized == [BEFORE_IMAGE.split()] * 2 + [question] * 2
    assert not warned


@pytest.mark.parametrize("builder", ["glm46v", "glm5_next"])
def test_glm_frames_are_budgeted_apart_and_their_timestamps_are_no_question(builder):
    """GLM-4.6V's and GLM-5-Next's processors write each frame (temporal group) of a video as an image followed by its time,
    ``0.0 seconds`` (words; GLM-4.1V's writes ``0``), between the begin/end-of-video markers its template writes,
    every frame's tokens typed 2: every frame is a selection, and the times are no question text, with a
    tokenizer or without (the video markers are in its config); prune() does not warn. Videos only: the
    model, as GLM-4.1V's, cannot take images and videos in one call (it places both by the image token)."""
    from transformers.video_utils import VideoMetadata

    model, processor, tokenizer = _glm(builder)
    image, frames = "<|image|>", 8
    metadata = [VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))] * 2
    inputs = processor(text=[f"{BEFORE_IMAGE} {GLM_VIDEO}", f"{GLM_VIDEO} {AFTER_IMAGES}"], videos=[_video(frames, 16, 16)] * 2,
                       padding=True, return_tensors="pt", videos_kwargs=dict(do_sample_frames=False, video_metadata=metadata))
    groups = int(inputs["video_grid_thw"][0, 0])
    assert groups == frames // 2
    video = ["<|begin_of_video|>"] + sum((["<|begin_of_image|>", f"{image}*16", "<|end_of_image|>", f"{t:.1f}", "seconds"]
                                          for t in range(groups)), []) + ["<|end_of_video|>"]
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE_IMAGE.split() + video
    assert _token_layout(tokenizer, inputs, 1, image) == video + AFTER_IMAGES.split()
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == model.config.image_token_id)
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16)] * groups + [(1, 16)] * groups
    assert prompts == untokenized == [BEFORE_IMAGE.split()] * groups + [AFTER_IMAGES.split()] * groups
    assert not warned


# GLM-OCR's chat template as it renders a user turn (images, text) and the generation prompt without thinking
# (its template's shape, images only): ``[gMASK]<sop><|user|>\n`` ... ``<|assistant|>\n<think></think>\n``.
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n<think></think>\n{% endif %}")


GLM_THINKING = ["<think>", "</think>"]


def _glm_ocr_chat(words: tuple = ()):
    """A tiny GLM-OCR with the real processor and GLM's chat template: its role markers special in the tokenizer,
    ``<think>``/``</think>`` added as ordinary tokens, the newlines ordinary text; ``words``: more of its tokens."""
    _builder("glm_ocr")
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    roles = ["<sop>", "<|user|>", "<|assistant|>"]
    tokenizer = _tokenizer(GLM_MARKERS + roles, plain=["\n", *GLM_THINKING], words=words, bos="[gMASK]")
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = transformers.Glm46VProcessor(
        image_processor=_image_processor("Glm46VImageProcessor", size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32},
                                         **sizes),
        video_processor=transformers.Glm46VVideoProcessor(**sizes), tokenizer=tokenizer, chat_template=GLM_TEMPLATE)
    model = _retokenized("glm_ocr", tokenizer, dict(
        image_token_id="<|image|>", video_token_id="<|video|>", image_start_token_id="<|begin_of_image|>",
        image_end_token_id="<|end_of_image|>", video_start_token_id="<|begin_of_video|>",
        video_end_token_id="<|end_of_video|>"))
    return model, processor, tokenizer


def test_glm_ocr_chat_template_text_is_no_question_with_a_tokenizer():
    """GLM-OCR's chat template writes ``[gMASK]<sop><|user|>\\n``, the image and the question (``Text
    Recognition:``, after the image, or a question before it), then ``<|assistant|>\\n<think></think>\\n``: with
    ``tokenizer=`` (its role markers special, ``<think>``/``</think>`` added as ordinary tokens, the newlines
    ordinary text) the prompts are the question words alone, also in generate(). Without one the template's
    text is question text (README: its special tokens are named by the tokenizer alone), and a question written
    before its image is ranked by the generation prompt alone; no processor marker is involved, so no warning."""
    model, processor, tokenizer = _glm_ocr_chat(words=("Text", "Recognition:"))
    after, before = "Text Recognition:", "w4 w5"
    texts = [processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
             for parts in ([{"type": "image"}, {"type": "text", "text": after}],
                           [{"type": "text", "text": before}, {"type": "image"}])]
    assert texts[1] == f"[gMASK]<sop><|user|>\n{before}{GLM_IMAGE}<|assistant|>\n<think></think>\n"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(16, 16, gen)], [_photo(16, 24, gen)]], padding=True,
                       return_tensors="pt")
    generation = ["<|assistant|>", "\n", *GLM_THINKING, "\n"]
    assert _token_layout(tokenizer, inputs, 1, "<|image|>") == [
        "[gMASK]", "<sop>", "<|user|>", "\n", *before.split(), "<|begin_of_image|>", "<|image|>*24", "<|end_of_image|>",
        *generation]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16), (1, 24)]
    assert prompts == [after.split(), before.split()]
    assert untokenized == [after.split() + generation, generation]
    assert not warned
