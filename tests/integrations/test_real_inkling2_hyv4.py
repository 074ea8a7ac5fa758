"""prune() on the token layouts that transformers' own Inkling2 and HY-V4-VL processors write (the real
``Inkling2Processor`` and ``HYV4VLProcessor`` classes, built offline around a word-level tokenizer holding the
families' markers; the tiny builders' models rebuilt on its ids). Inkling2's processor writes each image as a run
of ``t*h*w`` image tokens of its grid (``image_grid_thw``, counted in language model tokens), no marker around it,
so a row's images may stand back to back: ``image_grid_thw`` tells them apart, as the model splits its features.
HY-V4-VL's writes each image as ``h/2 * (w/2 + 1)`` image tokens (a newline feature after each merged row) and
each video as ``t`` times that of video tokens, in place of the chat template's placeholder, which the template
wraps in begin/end markers no config names (``unnamed_markers``)."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (_photo, _prompts_and_warnings, _retokenized, _runs, _token_layout, _tokenizer,
                                   _video)

transformers = pytest.importorskip("transformers")

BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"

INKLING2_IMAGE = "<|unused_200054|>"  # the processor's default image token (the checkpoints' id 200054)


def _inkling2(builder: str):
    """The real Inkling2Processor (its image processor cuts 4 px patches: one image token each, the tiny
    tower's 2 px patches merged 2x2) and the tiny builder's model on this tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if builder not in BUILDERS or not hasattr(transformers, "Inkling2Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no {builder} (Inkling2Processor: 5.24+)")
    import torchvision  # noqa: F401  (its image processor is torchvision's: an error here, not a skip)

    tokenizer = _tokenizer([INKLING2_IMAGE], plain=[])
    processor = transformers.Inkling2Processor(
        image_processor=transformers.Inkling2ImageProcessor(size={"height": 4, "width": 4}), tokenizer=tokenizer)
    model = _retokenized(builder, tokenizer, dict(image_token_id=INKLING2_IMAGE),
                         text=dict(unpadded_vocab_size=len(tokenizer)))
    return model, processor, tokenizer


@pytest.mark.parametrize("builder", ["inkling2", "inkling2_loop"])
def test_inkling2_images_are_budgeted_by_their_grids_also_back_to_back(builder):
    """Inkling2's processor writes an image as ``rows*columns`` image tokens of its grid of 4 px patches (the image
    padded up to it), nothing around it: a row's two images back to back are one run of tokens. Each image is one
    selection of exactly its grid's tokens, as the model splits its features (``image_grid_thw.prod(-1)``), the
    back-to-back run split 4 + 3; its budget ``min(keep, n)``. No marker: with or without a tokenizer the prompts
    are exactly the question words (a question before its image, the text before it; after the first image, the
    row's text after it, the words between two images too), and prune() does not warn; keep-all logits bit for
    bit, generate() the same prompts."""
    model, processor, tokenizer = _inkling2(builder)
    image = INKLING2_IMAGE
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {image}", f"{image}{image} {AFTER}", f"{image} {BETWEEN} {image} {AFTER}"],
                       images=[[_photo(10, 14, gen)], [_photo(8, 8, gen), _photo(12, 4, gen)],
                               [_photo(8, 12, gen), _photo(16, 8, gen)]], padding=True, return_tensors="pt")
    grids = inputs["image_grid_thw"].tolist()
    assert grids == [[1, 3, 4], [1, 2, 2], [1, 3, 1], [1, 2, 3], [1, 4, 2]]  # ceil(h / 4), ceil(w / 4)
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE.split() + [f"{image}*12"]
    assert _token_layout(tokenizer, inputs, 1, image) == [f"{image}*7"] + AFTER.split()  # 4 + 3, back to back
    assert _token_layout(tokenizer, inputs, 2, image) == [f"{image}*6", *BETWEEN.split(), f"{image}*8", *AFTER.split()]
    with torch.no_grad():  # the model's own split of its features: the grids' token counts
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    counts = [len(f) for f in features]
    assert counts == [12, 4, 3, 6, 8]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert _runs(inputs["input_ids"], model.config.image_token_id) == [(0, 12), (1, 7), (2, 6), (2, 8)]
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [
        (0, 12, 4), (1, 4, 4), (1, 3, 3), (2, 6, 4), (2, 8, 4)]
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == untokenized == [BEFORE.split(), AFTER.split(), AFTER.split(), question, question]
    assert not warned


HY_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# As a chat template writes an image and a video: the processor's placeholder between begin/end markers.
HY_IMAGE, HY_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def _hy_v4_vl():
    """The real HYV4VLProcessor (its PIL image processor and its video processor: 2 px patches merged 2x2, 64 to 256
    pixels a frame) and the tiny builder's model on this tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "hy_v4_vl" not in BUILDERS or not hasattr(transformers, "HYV4VLProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no HY-V4-VL (5.24+)")
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(HY_MARKERS, plain=[])
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=1, size={"shortest_edge": 64, "longest_edge": 256})
    processor = transformers.HYV4VLProcessor(
        image_processor=(getattr(transformers, "HYV4VLImageProcessorPil", None) or transformers.HYV4VLImageProcessor)(
            **sizes),
        video_processor=transformers.HYV4VLVideoProcessor(**sizes), tokenizer=tokenizer)
    model = _retokenized("hy_v4_vl", tokenizer, dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>"))
    return model, processor, tokenizer


def _hy_tokens(grid) -> int:
    """An image's or video's tokens: ``t * h/2 * (w/2 + 1)`` of its grid (a newline feature a merged row)."""
    t, h, w = grid
    return t * (h // 2) * (w // 2 + 1)


def test_hy_v4_vl_images_are_budgeted_whole_and_without_a_tokenizer_prune_warns_of_its_markers():
    """HY-V4-VL's processor writes an image as ``h/2 * (w/2 + 1)`` ``<|image_pad|>`` (each merged row's newline
    feature among them) in place of the template's placeholder, between ``<|vision_start|>`` and
    ``<|vision_end|>``, markers no config names. Each image is one selection of exactly its run (a row's two images
    back to back, as a template writes a message's images, apart by their markers). With ``tokenizer=`` the prompts
    are exactly the question words; keep-all logits bit for bit, generate() the same prompts. Without one prune()
    warns, and rightly: the markers are question text, a question written before its image ranked by the end
    marker after it alone, and the second image's markers joining the question after the first."""
    model, processor, tokenizer = _hy_v4_vl()
    image = "<|image_pad|>"
    gen = torch.Generator().manual_seed(0)
    text = [f"{BEFORE} {HY_IMAGE}", f"{HY_IMAGE}{HY_IMAGE} {AFTER}", f"{HY_IMAGE} {BETWEEN} {HY_IMAGE} {AFTER}"]
    inputs = processor(text=text,
                       images=[[_photo(10, 14, gen)], [_photo(8, 8, gen), _photo(12, 4, gen)],
                               [_photo(8, 12, gen), _photo(16, 8, gen)]], padding=True, return_tensors="pt")
    counts = [_hy_tokens(g) for g in inputs["image_grid_thw"].tolist()]
    assert len(set(counts)) > 2  # images of different sizes
    start, end = HY_MARKERS[:2]
    wrapped = [[start, f"{image}*{n}", end] for n in counts]
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE.split() + wrapped[0]
    assert _token_layout(tokenizer, inputs, 1, image) == wrapped[1] + wrapped[2] + AFTER.split()
    assert _token_layout(tokenizer, inputs, 2, image) == wrapped[3] + BETWEEN.split() + wrapped[4] + AFTER.split()
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(r, n) for r, n in zip([0, 1, 1, 2, 2], counts)]
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [BEFORE.split(), AFTER.split(), AFTER.split(), question, question]
    assert len(warned) == 1 and "HY-V4-VL" in warned[0] and "tokenizer=" in warned[0]  # the call without one
    # Without a tokenizer: the end marker after the first image, and the second image's markers after it.
    second = [end, start, end, *AFTER.split()]  # row 1: the images back to back
    third = [end, *BETWEEN.split(), start, end, *AFTER.split()]
    assert untokenized == [[end], second, second, third, third]


def test_hy_v4_vl_videos_are_one_budget_each():
    """HY-V4-VL's processor writes a video as ``t * h/2 * (w/2 + 1)`` ``<|video_pad|>``, its frames one run with no
    marker or label between them (typed 2 in ``mm_token_type_ids``, images 1), between the template's markers:
    each video is one selection (one budget) of exactly its run, as its image in an image+video row is one. With
    ``tokenizer=`` the prompts are the question words (the words between the image and the video too);
    keep-all logits bit for bit, generate() the same prompts. Without one prune() warns, and the markers are
    question text (a question written before its video ranked by the end marker alone)."""
    model, processor, tokenizer = _hy_v4_vl()
    video, image = "<|video_pad|>", "<|image_pad|>"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {HY_VIDEO}", f"{HY_IMAGE} {BETWEEN} {HY_VIDEO} {AFTER}"],
                       images=[[_photo(12, 8, gen)]], videos=[_video(4, 8, 12), _video(3, 12, 12)], padding=True,
                       return_tensors="pt")
    frames = inputs["video_grid_thw"][:, 0].tolist()
    assert frames == [4, 3]  # temporal patch 1: a frame a grid step
    videos = [_hy_tokens(g) for g in inputs["video_grid_thw"].tolist()]
    picture = _hy_tokens(inputs["image_grid_thw"][0].tolist())
    start, end = HY_MARKERS[:2]
    words = [tokenizer.convert_ids_to_tokens(inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist())
             for r in range(2)]
    assert words[0] == BEFORE.split() + [start] + [video] * videos[0] + [end]
    assert words[1] == ([start] + [image] * picture + [end] + BETWEEN.split() + [start] + [video] * videos[1] + [end]
                        + AFTER.split())
    with torch.no_grad():  # the model's own split of its features: one entry a video, all its frames
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    assert [len(f) for f in features] == videos
    types = inputs["mm_token_type_ids"]
    assert torch.equal(types, (inputs["input_ids"] == model.config.image_token_id).int()
                       + 2 * (inputs["input_ids"] == model.config.video_token_id).int())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id, model.config.video_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, videos[0]), (1, picture), (1, videos[1])]
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [BEFORE.split(), question, question]
    assert len(warned) == 1 and "HY-V4-VL" in warned[0]
    assert untokenized == [[end]] + [[end, *BETWEEN.split(), start, end, *AFTER.split()]] * 2
