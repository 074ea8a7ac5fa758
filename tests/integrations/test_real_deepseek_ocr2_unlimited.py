"""prune() on the layouts that transformers' own DeepSeek-OCR-2 and UnlimitedOCR processors write (the real
processor and image processor classes, built offline around a word-level tokenizer holding ``<image>``; the
models are the tiny builders' rebuilt on its ids). Both processors write an image as one run of ``<image>``
tokens and nothing else: its local crops (when it is larger than a tile), its global view and the view
separator's feature last, no marker between them (UnlimitedOCR also a newline feature after each row of a
view's features). The family rule (``_one_run_per_image``) makes each run one image with one budget; images
back to back (one run) are refused."""
from __future__ import annotations

import pytest
import torch

from .test_real_processors import (AFTER_IMAGES, BEFORE_IMAGE, _image_processor, _photo, _prompts_and_warnings,
                                   _retokenized, _runs, _token_layout, _tokenizer)

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

IMAGE = "<image>"


def _ocr_tokenizer():
    """The image token (special, as the checkpoints add it; the processors read it from ``image_token``) and
    ``"\\n"``: the checkpoints' prompts put one after the image (``<image>\\nFree OCR.``)."""
    return _tokenizer([IMAGE], plain=["\n"], bos="<｜begin▁of▁sentence｜>", image_token=IMAGE)


def _deepseek_ocr2():
    """The real DeepseekOcr2Processor at a quarter of the checkpoints' scale: the global view 256 px (1024),
    192 px tiles (768), ``patch_size=4`` (16) and ``downsample_ratio=4``, so it writes 16 * 16 tokens for the
    global view and 12 * 12 for each crop, as the checkpoints 256 and 144. The model's SAM tower (4 px patches,
    two stride-2 convolutions) gives 64 * 64 patches for the global view, 48 * 48 for a tile: its encoder reads
    them with its 256 learned queries for more than 144 patches, else with its 144, as the checkpoints'."""
    if not hasattr(transformers, "DeepseekOcr2Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-OCR-2")
    tokenizer = _ocr_tokenizer()
    processor = transformers.DeepseekOcr2Processor(
        image_processor=_image_processor("DeepseekOcr2ImageProcessor", size={"height": 256, "width": 256},
                                         tile_size=192, max_patches=4),
        tokenizer=tokenizer, patch_size=4, downsample_ratio=4)
    model = _retokenized("deepseek_ocr2", tokenizer, dict(image_token_id=IMAGE, pad_token_id="<pad>"))
    return model, processor, tokenizer


def _unlimited_ocr(sliding_window: int = 128):
    """The real UnlimitedOcrProcessor (its image processor needs torchvision) at an eighth of the checkpoints'
    scale: the global view 128 px (1024), 64 px tiles (640), ``patch_size=4`` (16), ``downsample_ratio=4``:
    8 * (8 + 1) tokens for the global view (a newline feature after each row), ``4 rows * (4 columns + 1)``
    for each row of crops of a grid; the model's SAM tower gives as many features (4 px patches, two stride-2
    convolutions; no learned queries)."""
    if not hasattr(transformers, "UnlimitedOcrProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no UnlimitedOCR")
    import torchvision  # noqa: F401  (its image processor needs it: an error here, not a skip)

    tokenizer = _ocr_tokenizer()
    processor = transformers.UnlimitedOcrProcessor(
        image_processor=transformers.UnlimitedOcrImageProcessor(size={"height": 128, "width": 128}, tile_size=64,
                                                                max_patches=4),
        tokenizer=tokenizer, patch_size=4, downsample_ratio=4)
    model = _retokenized("unlimited_ocr", tokenizer, dict(image_token_id=IMAGE, pad_token_id="<pad>"),
                         text=dict(sliding_window=sliding_window))
    return model, processor, tokenizer


def _check_images_are_one_budget_each(model, processor, tokenizer, photos, counts, crops):
    """Row 0: a question, then an image and ``"\\n"``; row 1: an image, ``"\\n"``, a question, a second image,
    ``"\\n"`` and more question words. Each run the processor wrote is one image's (the model's features for it
    are as many), one selection, one budget; the prompts are the question words with a tokenizer (the newline
    after row 0's image is no question: the text before the image is), generate() selects with the same.
    Without one prune() does not warn (the processor writes no marker, the config names the image token) and
    the newlines are question text: row 0's question is ranked by the newline after its image alone."""
    question = AFTER_IMAGES.split() + ["w5", "w6"]
    inputs = processor(text=[f"{BEFORE_IMAGE} {IMAGE}\n", f"{IMAGE}\n{AFTER_IMAGES} {IMAGE}\nw5 w6"],
                       images=[[photos[0]], [photos[1], photos[2]]], padding=True, return_tensors="pt")
    assert list(inputs["num_local_patches"]) == crops
    assert _token_layout(tokenizer, inputs, 0, IMAGE) == BEFORE_IMAGE.split() + [f"{IMAGE}*{counts[0]}", "\n"]
    assert _token_layout(tokenizer, inputs, 1, IMAGE) == [
        f"{IMAGE}*{counts[1]}", "\n", *AFTER_IMAGES.split(), f"{IMAGE}*{counts[2]}", "\n", "w5", "w6"]
    image = model.config.image_token_id
    assert _runs(inputs["input_ids"], image) == [(0, counts[0]), (1, counts[1]), (1, counts[2])]
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():  # crops, global view and separator: one image's features, as many as its run
        assert [len(f) for f in model.model.get_image_features(**pixels).pooler_output] == counts

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [
        (0, counts[0], 4), (1, counts[1], 4), (1, counts[2], 4)]
    assert prompts == [BEFORE_IMAGE.split(), question, question]
    assert not warned
    with_newlines = ["\n", *AFTER_IMAGES.split(), "\n", "w5", "w6"]  # the text after the row's first image
    assert untokenized == [["\n"], with_newlines, with_newlines]

    back_to_back = processor(text=[f"{IMAGE}{IMAGE}\nw1 w2"], images=[[photos[0], photos[2]]], return_tensors="pt")
    assert _runs(back_to_back["input_ids"], image) == [(0, counts[0] + counts[2])]
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=processor), \
            pytest.raises(ValueError, match="back to back"):
        model(**back_to_back)  # refused, never budgeted as one image
    return inputs


def test_deepseek_ocr2_images_are_one_budget_each_over_crops_global_view_and_separator():
    """DeepSeek-OCR-2's processor writes an image as ``<image>`` times ``256 + 144 n + 1`` (the checkpoints'
    counts): the ``n`` local crops' features (none for an image no larger than a tile), the global view's and
    the view separator's, in one run without markers. An image of one tile is 257 tokens, a tall image of
    two crops 545: each is one selection with one budget over exactly those tokens, the separator included
    (neither split at the crops' end nor merged with the next image)."""
    model, processor, tokenizer = _deepseek_ocr2()
    gen = torch.Generator().manual_seed(0)
    photos = [_photo(100, 150, gen), _photo(300, 150, gen), _photo(100, 100, gen)]
    _check_images_are_one_budget_each(model, processor, tokenizer, photos, counts=[257, 2 * 144 + 257, 257],
                                      crops=[0, 2, 0])


def test_unlimited_ocr_images_are_one_budget_each_and_generation_slides_past_the_kept_prompt():
    """UnlimitedOCR's processor writes an image as one run of ``<image>``: a grid of ``c x r`` crops as
    ``4r (4c + 1)`` tokens (each row of features ended by a newline feature), then the global view's
    ``8 (8 + 1)`` and the view separator's (none for the crops of an image no larger than a tile: 73). A 2 x 2
    grid is 145 tokens, a 1 x 2 one 113: each image one selection, one budget over its run. Its generate()
    declares the unpruned prompt's length to the reference sliding-window cache (``_reference_prefill``
    declares the kept one): keep-all generation equals the unpatched one bit for bit, with a window of two
    generated tokens, and a pruned one generates as many tokens."""
    model, processor, tokenizer = _unlimited_ocr(sliding_window=2)
    gen = torch.Generator().manual_seed(0)
    photos = [_photo(100, 100, gen), _photo(100, 50, gen), _photo(60, 60, gen)]
    inputs = _check_images_are_one_budget_each(model, processor, tokenizer, photos, counts=[145, 113, 73],
                                               crops=[4, 2, 0])
    assert inputs["patches_grid"][:2] == [[2, 2], [1, 2]]

    steps = 6
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        unpatched = model.generate(**inputs, **kwargs)
        with zspa_kernels.prune(model, keep=1.0, tokenizer=processor):
            kept_all = model.generate(**inputs, **kwargs)
        with zspa_kernels.prune(model, keep=4, tokenizer=processor):
            pruned = model.generate(**inputs, **kwargs)
    assert torch.equal(kept_all.sequences, unpatched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(kept_all.logits, unpatched.logits, strict=True))
    assert pruned.sequences.shape == unpatched.sequences.shape
    assert all(torch.isfinite(step).all() for step in pruned.logits)
