"""prune() on the token layouts that the real Step3p7 and Dots3-Note processors write (built offline around a
word-level tokenizer holding each family's markers, as special tokens; tiny random models on its ids).

Step3p7 (transformers 5.x): its processor writes an image as its local crops, each ``<patch_start>`` 4 tokens
``<patch_end>`` (``<patch_newline>`` after the last crop of each row of crops but the last), then its global view,
``<im_start>`` 16 tokens ``<im_end>``; an image small and square enough has no crops. None of the markers is named
by the config (``image_token_id`` only): each crop and each view is a run of its own and a selection of its own.

Dots3-Note (transformers 5.24+): its processor writes an image or a video as its placeholder repeated, nothing
around it (Qwen2-VL's grids, 2x2 merged, no temporal patches); the chat template (as dots.ocr's) writes an image
as ``<|img|><|imgpad|><|endofimg|>``, markers that no config names. Images back to back are one run, told apart by
their grids; so are videos back to back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_real_processors import (_image_processor, _photo, _prompt_words, _prompts_and_warnings, _retokenized, _runs,
                                   _runs_of_both, _token_layout, _tokenizer, _video, _video_inputs)

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

BEFORE, AFTER, BETWEEN = "w44 w39 w53 w0", "w43 w39 w7", "w5 w6"
UNNAMED = r"^prune\(\): {} processors write image markers .*tokenizer=processor"

# --------------------------------------------------------------------------------------------------- Step3p7

STEP3P7_MARKERS = ["<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>", "<im_start>", "<im_end>"]
CROP, VIEW = ["<patch_start>", "<im_patch>*4", "<patch_end>"], ["<im_start>", "<im_patch>*16", "<im_end>"]


def _step3p7():
    """The real Step3p7Processor and image processor (a 32 px global view, 16 px crops; 2 px patches and two
    stride-2 downsamplers: 16 tokens a view, 4 a crop) and the tiny builder's model on this tokenizer's ids."""
    if not hasattr(transformers, "Step3p7Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Step3p7")
    import torchvision  # noqa: F401  (its image processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(STEP3P7_MARKERS, plain=[])
    images = transformers.Step3p7ImageProcessor(size={"height": 32, "width": 32}, patch_size=16, vision_patch_size=2,
                                                downsampler_stride=4)
    processor = transformers.Step3p7Processor(image_processor=images, tokenizer=tokenizer)
    return _retokenized("step3p7", tokenizer, dict(image_token_id="<im_patch>")), processor, tokenizer


def test_step3p7_one_image_crops_and_view_are_budgeted_apart():
    """One image (48x32: 2x3 crops, a row break after each of the first two rows, and the view) in one row, the
    question after it: 7 selections of their runs (4 tokens a crop, 16 the view), each its own budget; keep-all bit
    for bit; the prompt the question words with a tokenizer, also in generate(). Without one prune() warns: the
    markers after the first crop (row breaks, the view's markers) are question text, before the question."""
    model, processor, tokenizer = _step3p7()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"<im_patch> {AFTER}"], images=[[_photo(48, 32, gen)]], return_tensors="pt")
    assert _token_layout(tokenizer, inputs, 0, "<im_patch>") == (
        (CROP * 2 + ["<patch_newline>"]) * 2 + CROP * 2 + VIEW + AFTER.split())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == [(0, 4)] * 6 + [(0, 16)]
    assert all(s.order.numel() == 4 for s in selections)  # each crop and the view: its own budget
    assert prompts == [AFTER.split()] * 7
    assert len(warned) == 1 and "Step3p7" in warned[0]  # the call without a tokenizer
    markers = (["<patch_end>", "<patch_start>", "<patch_end>", "<patch_newline>", "<patch_start>"] * 2
               + ["<patch_end>", "<patch_start>", "<patch_end>", "<im_start>", "<im_end>"])
    assert untokenized == [markers + AFTER.split()] * 7


def test_step3p7_crops_and_views_of_a_batch_are_budgeted_apart_and_their_markers_are_no_question():
    """Row 0: a question before a 48x32 image (2x3 crops and the view); row 1: a 30x30 image (no crops: the view
    alone), the question, a 16x30 image (1x2 crops, no row break, and the view), more words. Every crop and view
    is a selection of its run, each its own budget, keep-all bit for bit; with a tokenizer the prompts are the
    question words exactly (row 0's, written before its image, too), also in generate(). Without one prune()
    warns, and rightly: row 0's question gives way to the markers after its first crop, and row 1's holds the
    second image's markers."""
    model, processor, tokenizer = _step3p7()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} <im_patch>", f"<im_patch> {AFTER} <im_patch> {BETWEEN}"], padding=True,
                       images=[[_photo(48, 32, gen)], [_photo(30, 30, gen), _photo(16, 30, gen)]], return_tensors="pt")
    assert inputs["num_local_patches"].tolist() == [6, 0, 2]
    assert _token_layout(tokenizer, inputs, 0, "<im_patch>") == (
        BEFORE.split() + (CROP * 2 + ["<patch_newline>"]) * 2 + CROP * 2 + VIEW)
    assert _token_layout(tokenizer, inputs, 1, "<im_patch>") == VIEW + AFTER.split() + CROP * 2 + VIEW + BETWEEN.split()
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs == (
        [(0, 4)] * 6 + [(0, 16)] + [(1, 16), (1, 4), (1, 4), (1, 16)])
    assert all(s.order.numel() == 4 for s in selections)
    question = (AFTER + " " + BETWEEN).split()
    assert prompts == [BEFORE.split()] * 7 + [question] * 4
    assert len(warned) == 1 and "Step3p7" in warned[0]
    row_0 = (["<patch_end>", "<patch_start>", "<patch_end>", "<patch_newline>", "<patch_start>"] * 2
             + ["<patch_end>", "<patch_start>", "<patch_end>", "<im_start>", "<im_end>"])
    row_1 = ["<im_end>", *AFTER.split(), "<patch_start>", "<patch_end>", "<patch_start>", "<patch_end>", "<im_start>",
             "<im_end>", *BETWEEN.split()]
    assert untokenized == [row_0] * 7 + [row_1] * 4
    with pytest.warns(UserWarning, match=UNNAMED.format("Step3p7")):
        zspa_kernels.prune(model, keep=4).remove()


# ------------------------------------------------------------------------------------------------ Dots3-Note

DOTS3_MARKERS = ["<|imgpad|>", "<|video_pad|>", "<|audio_comp_pad|>", "<|img|>", "<|endofimg|>"]
DOTS3_IMAGE = "<|img|><|imgpad|><|endofimg|>"  # as the dots chat template writes an image


def _dots3_note():
    """The real Dots3NoteProcessor with Qwen2-VL's image processor and Qwen3-VL's video processor (its auto
    classes), 2 px patches, no temporal patches (its tower embeds 2-D patches), 2x2 merged; the tiny builder's
    model on this tokenizer's ids."""
    if not hasattr(transformers, "Dots3NoteProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Dots3-Note")
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(DOTS3_MARKERS, plain=[])
    sizes = dict(patch_size=2, temporal_patch_size=1, merge_size=2)
    pixels = dict(min_pixels=4 * 4 * 4, max_pixels=4 * 4 * 16)
    processor = transformers.Dots3NoteProcessor(
        image_processor=_image_processor("Qwen2VLImageProcessor", **pixels, **sizes),
        video_processor=transformers.Qwen3VLVideoProcessor(
            size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}, **sizes),
        feature_extractor=transformers.Dots3NoteFeatureExtractor(), tokenizer=tokenizer)
    model = _retokenized("dots3_note", tokenizer, dict(image_token_id="<|imgpad|>", video_token_id="<|video_pad|>",
                                                       audio_token_id="<|audio_comp_pad|>"))
    return model, processor, tokenizer


def test_dots3_note_images_are_budgeted_apart_and_their_template_markers_are_no_question():
    """Row 0: a question before an 8x12 image; row 1: a 12x8 image, the question, a 16x12 image, more words; each
    image between the template's ``<|img|>``/``<|endofimg|>``: each image a selection of its run (6, 6, 12 tokens),
    keep-all bit for bit; with a tokenizer the prompts are the question words (also in generate()). Without one
    prune() warns, and rightly: ``<|endofimg|>`` alone stands for row 0's question, and row 1's holds the second
    image's markers."""
    model, processor, tokenizer = _dots3_note()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} {DOTS3_IMAGE}", f"{DOTS3_IMAGE} {AFTER} {DOTS3_IMAGE} {BETWEEN}"], padding=True,
                       images=[[_photo(8, 12, gen)], [_photo(12, 8, gen), _photo(16, 12, gen)]], return_tensors="pt")
    image = ["<|img|>", "<|imgpad|>*6", "<|endofimg|>"]
    assert _token_layout(tokenizer, inputs, 0, "<|imgpad|>") == BEFORE.split() + image
    assert _token_layout(tokenizer, inputs, 1, "<|imgpad|>") == (
        image + AFTER.split() + ["<|img|>", "<|imgpad|>*12", "<|endofimg|>"] + BETWEEN.split())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 6), (1, 6), (1, 12)]
    question = (AFTER + " " + BETWEEN).split()
    assert prompts == [BEFORE.split(), question, question]
    assert len(warned) == 1 and "Dots3-Note" in warned[0]
    row_1 = ["<|endofimg|>", *AFTER.split(), "<|img|>", "<|endofimg|>", *BETWEEN.split()]
    assert untokenized == [["<|endofimg|>"], row_1, row_1]


def test_dots3_note_images_back_to_back_are_told_apart_by_their_grids():
    """The processor's own layout, no template: two images back to back are one run of 6 + 12 tokens, split by
    their grids into two selections, each its own budget (also in generate()). No marker stands anywhere, so the
    prompts are the question words with a tokenizer or without; prune() warns all the same (the flag is the
    family's: its template writes markers)."""
    model, processor, tokenizer = _dots3_note()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE} <|imgpad|>", f"<|imgpad|><|imgpad|> {AFTER}"], padding=True,
                       images=[[_photo(8, 12, gen)], [_photo(12, 8, gen), _photo(16, 12, gen)]], return_tensors="pt")
    assert _token_layout(tokenizer, inputs, 1, "<|imgpad|>") == ["<|imgpad|>*18"] + AFTER.split()
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [(0, 6, 4), (1, 6, 4), (1, 12, 4)]
    assert prompts == untokenized == [BEFORE.split(), AFTER.split(), AFTER.split()]
    assert len(warned) == 1 and "Dots3-Note" in warned[0]


def test_dots3_note_a_video_is_one_budget():
    """Row 0: a question before its image; row 1: an image, words, a 4-frame video (one run of 4*4*4/4 = 16
    tokens, nothing around it), the question: the video is one selection, after the images; the prompts the
    question words with a tokenizer (the words between the image and the video too), also in generate();
    without one the end-of-image marker stays, and prune() warns."""
    model, processor, tokenizer = _dots3_note()
    inputs, (before, question), words = _video_inputs(processor, _video(4, 8, 8), [(8, 12), (12, 8)], DOTS3_IMAGE,
                                                      "<|video_pad|>", do_sample_frames=False)
    assert words.count("<|video_pad|>") == int(inputs["video_grid_thw"].prod()) // 4 == 16
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [(0, 6), (1, 6), (1, 16)]
    assert prompts == [before, question, question]
    assert untokenized == [["<|endofimg|>"]] + [["<|endofimg|>", *question]] * 2
    assert len(warned) == 1 and "Dots3-Note" in warned[0]


@torch.no_grad()
def test_dots3_note_videos_back_to_back_are_budgeted_apart():
    """Two videos back to back (4 frames of 8x8, 2 of 8x12): the processor writes them as one run of 16 + 12
    tokens, nothing between them. Each video is its own budget (the family rule: a video one budget), so the
    run splits by their grids, as images back to back do: two selections of ``keep`` tokens each, in a forward
    and in generate() (which on 5.24+ passes the videos encoded), not one of 28 tokens keeping ``keep`` of both."""
    from transformers.video_utils import VideoMetadata

    model, processor, tokenizer = _dots3_note()
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)]
    metadata = [VideoMetadata(total_num_frames=len(v), fps=2, frames_indices=list(range(len(v)))) for v in videos]
    inputs = processor(text=[f"<|video_pad|><|video_pad|> {AFTER}"], videos=videos, return_tensors="pt",
                       videos_kwargs=dict(do_sample_frames=False, video_metadata=metadata))
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4], [2, 4, 6]]
    assert _runs(inputs["input_ids"], model.config.video_token_id) == [(0, 28)]  # one run
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [(0, 16, 4), (0, 12, 4)]
    assert prompts == untokenized == [AFTER.split()] * 2
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in handle.last_selection] == [(0, 16, 4), (0, 12, 4)]
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == prompts
