"""prune() on the token layouts that the real MiniMax-M3-VL processor writes (built offline around a word-level
tokenizer holding its markers as special tokens, as its checkpoint's tokenizer holds them; the tiny builder's model
on its ids).

MiniMax-M3-VL (transformers 5.x): its processor writes an image as ``]<]start of image[>[``, ``h*w / 4`` image tokens
of its merged grid (``image_grid_thw``), ``]<]end of image[>[``; a video as its frames (temporal patches), each after
its timestamp (``]<]0.0 seconds[>[``: words of the real tokenizer) and between the same markers, with the video
token. The config names the image and video tokens alone."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (_photo, _prompts_and_warnings, _retokenized, _runs, _runs_of_both, _token_layout,
                                   _tokenizer, _video, _video_inputs)

transformers = pytest.importorskip("transformers")

BEFORE, AFTER, BETWEEN = "w44 w39 w53 w0", "w43 w39 w7", "w5 w6"
IMAGE, VIDEO = "]<]image[>[", "]<]video[>["
START, END = "]<]start of image[>[", "]<]end of image[>["
# Its frame timestamps, "]<]0.5 seconds[>[": ordinary words of the real tokenizer, here too.
TIMESTAMPS = [f"]<]{t / 10:.1f}" for t in range(100)] + ["seconds[>["]


def _minimax_m3_vl():
    """The real MiniMaxM3VLProcessor with its image and video processors (the tiny tower's 2 px patches, two
    frames a temporal patch, merged 2x2; 4 to 64 patches a picture) and the tiny builder's model on this
    tokenizer's ids."""
    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if "minimax_m3_vl" not in BUILDERS or not hasattr(transformers, "MiniMaxM3VLProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMax-M3-VL (not in 4.57)")
    import torchvision  # noqa: F401  (its processors need it: an error here, not a skip)

    tokenizer = _tokenizer([IMAGE, VIDEO, START, END], plain=TIMESTAMPS)
    model = _retokenized("minimax_m3_vl", tokenizer, dict(image_token_id=IMAGE, video_token_id=VIDEO))
    vision = model.config.vision_config
    pixels = dict(min_pixels=4 * vision.patch_size ** 2, max_pixels=64 * vision.patch_size ** 2)
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)
    processor = transformers.MiniMaxM3VLProcessor(
        image_processor=transformers.MiniMaxM3VLImageProcessor(**sizes, **pixels),
        video_processor=transformers.MiniMaxM3VLVideoProcessor(**sizes, **pixels,
                                                               size={"height": 8, "width": 8}),
        tokenizer=tokenizer)
    return model, processor, tokenizer


def test_minimax_m3_vl_images_are_budgeted_apart_and_their_markers_are_no_question():
    """A batch: one image after a question; two of different sizes with words between. Each image is one selection of
    exactly its run; with ``tokenizer=`` the prompts are exactly the question words (also in generate()). Without one
    prune() warns, and rightly: the end marker alone stands for row 0's question, and row 1's holds the second image's
    markers."""
    model, processor, tokenizer = _minimax_m3_vl()
    p = model.config.vision_config.patch_size
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {IMAGE}", f"{IMAGE} {BETWEEN} {IMAGE} {AFTER}"], padding=True,
                       images=[[_photo(8 * p, 8 * p, gen)], [_photo(4 * p, 8 * p, gen), _photo(8 * p, 4 * p, gen)]],
                       return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 8], [1, 8, 4]]
    a, b, c = ([START, f"{IMAGE}*{n}", END] for n in (16, 8, 8))
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == [*BEFORE.split(), *a]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == [*b, *BETWEEN.split(), *c, *AFTER.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 16), (1, 8), (1, 8)]
    assert [s.order.numel() for s in selections] == [4] * 3
    question = (BETWEEN + " " + AFTER).split()
    assert prompts == [BEFORE.split(), question, question]
    assert len(warned) == 1 and "MiniMax-M3-VL" in warned[0]
    row_1 = [END, *BETWEEN.split(), START, END, *AFTER.split()]
    assert untokenized == [[END], row_1, row_1]


@pytest.mark.parametrize("frames, segment", [(4, None), (8, 2)], ids=["one_chunk", "chunks"])
def test_minimax_m3_vl_a_videos_frames_are_budgeted_apart_and_their_timestamps_are_no_question(frames, segment):
    """Row 0: a question before its image; row 1: an image, words, a video at 2 fps (two frames a temporal patch:
    each patch ``]<]t seconds[>[`` then 4 video tokens between the markers), the question. Each frame is a selection
    of its own, after the images; with ``tokenizer=`` the prompts are the question words (the words between the
    image and the video too), the timestamps not among them, also in generate(). With ``vision_segment_max_frames``
    the processor cuts the video into chunks, one ``video_grid_thw`` row each (how many a video has is no model
    input): the same layout, told apart the same."""
    model, processor, tokenizer = _minimax_m3_vl()
    from transformers.models.minimax_m3_vl import video_processing_minimax_m3_vl as videos

    if segment is not None and "vision_segment_max_frames" not in videos.MiniMaxM3VLVideoProcessorKwargs.__annotations__:
        pytest.skip(f"transformers {transformers.__version__}'s video processor cuts no chunks")
    inputs, (before, question), words = _video_inputs(
        processor, _video(frames, 8, 8), [(8, 16), (16, 8)], do_sample_frames=False,
        **({} if segment is None else {"vision_segment_max_frames": segment}))
    patches = frames // 2
    chunk = patches if segment is None else segment
    assert inputs["video_grid_thw"].tolist() == [[chunk, 4, 4]] * (patches // chunk)
    frame = [START, f"{VIDEO}*4", END]
    timed = [token for t in range(patches) for token in (f"]<]{t * 2 / 2:.1f}", "seconds[>[", *frame)]
    assert _token_layout(tokenizer, inputs, 1, IMAGE, VIDEO) == [
        START, f"{IMAGE}*8", END, *BETWEEN.split(), *timed, *AFTER.split()]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) \
        == [(0, 8), (1, 8)] + [(1, 4)] * patches
    assert prompts == [before] + [question] * (1 + patches)
    assert len(warned) == 1 and "MiniMax-M3-VL" in warned[0]
