"""prune() on the token layouts that transformers' own Phi-4-multimodal and Fuyu processors write (the real
classes, built offline around word-level tokenizers holding each family's markers; tiny random models with the
tokenizers' ids in their configs). Phi-4-multimodal: images of different sizes, hence of different crop grids
and useful-patch masks, two of them back to back in a row (one run of image tokens, cut by ``_phi4_counts``).
Fuyu: each row's image as rows of patch tokens, each ended by ``|NEWLINE|``, then ``<s>``, the question and
``<0x04>``; rows of different image sizes (``_fuyu_counts``)."""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")


from .test_real_processors import (  # noqa: E402
    WORDS, _photo, _prompts_and_warnings, _retokenized, _runs, _token_layout, _tokenizer)

PHI4_MARKERS = dict(image_token="<|image|>", audio_token="<|audio|>")
PHI4_TEMPLATE = ["<|user|>", "<|end|>", "<|assistant|>"]  # its chat template's markers, special in its tokenizer


def _phi4():
    """The real Phi4MultimodalProcessor (its image processor: 32 px crops of 1 px patches, at most 4 crops; its
    token count assumes a 16x16 global view after 2x2 pooling, as the checkpoint's 448 px crops of 14 px
    patches give, so 32 patches a side here too) and the tiny builder's model on this tokenizer's ids, its
    vision tower sized alike (``crop_size`` 32) and its prompts allowed past the tokens an image takes."""
    import torchvision  # noqa: F401  (its image processor needs it: an error here, not a skip)

    from zspa_kernels.integrations.transformers.tiny import BUILDERS

    if not hasattr(transformers, "Phi4MultimodalProcessor") or "phi4_multimodal" not in BUILDERS:
        pytest.skip(f"transformers {transformers.__version__} has no Phi-4-multimodal")
    v4 = transformers.__version__.startswith("4.")  # 4.57's processor takes GPT-2's tokenizer class only
    tokenizer = _tokenizer([*PHI4_MARKERS.values(), *PHI4_TEMPLATE], plain=[], bos="<|endoftext|>",
                           cls=transformers.GPT2TokenizerFast if v4 else None, **PHI4_MARKERS)
    images = (getattr(transformers, "Phi4MultimodalImageProcessor", None)  # 4.57: its fast class only
              or transformers.Phi4MultimodalImageProcessorFast)
    processor = transformers.Phi4MultimodalProcessor(
        image_processor=images(size={"height": 32, "width": 32}, patch_size=1, dynamic_hd=4),
        audio_processor=transformers.Phi4MultimodalFeatureExtractor(), tokenizer=tokenizer)
    tiny = BUILDERS["phi4_multimodal"]()
    config = tiny.model.config.to_dict()
    config["vision_config"].update(image_size=32, patch_size=1, crop_size=32,
                                   image_token_id=tokenizer.convert_tokens_to_ids(PHI4_MARKERS["image_token"]))
    config["audio_config"].update(audio_token_id=tokenizer.convert_tokens_to_ids(PHI4_MARKERS["audio_token"]))
    config.update(vocab_size=len(tokenizer), max_position_embeddings=4096, original_max_position_embeddings=4096,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = type(tiny.model)(type(tiny.model.config)(**config)).eval()
    embedding = model.model.embed_tokens_extend.image_embed  # zero-initialised separators, as the builder's
    for extensor in (embedding.global_img_feature_extensor, embedding.sub_img_feature_extensor):
        extensor.data.normal_()
    try:  # as the builder: its output-capturing hooks ahead (transformers 5.24 installs the tower's twice)
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4.x
        maybe_install_capturing_hooks = None
    if maybe_install_capturing_hooks is not None:
        maybe_install_capturing_hooks(model.model)
    return model, processor, tokenizer


@torch.no_grad()
def test_phi4_multimodal_images_of_different_crop_grids_are_budgeted_apart():
    """Phi-4-multimodal's processor writes each image as one run of ``<|image|>`` tokens, as many as its image
    embedding makes of it: its HD crops' useful rows of features (each row ended by a separator), a separator,
    then its global view's 16 rows of 16 and their separators. Images of different sizes have different crop
    grids (1x1, 2x2, 1x3 here) and padding (``image_attention_mask`` marks the useful patches), and two images
    written back to back are one run: ``_phi4_counts`` cuts it from ``image_sizes`` and the masks. Each image
    is a selection of the tokens the processor wrote for it, keep-all bit for bit. The processor writes no
    marker of its own, so prune() does not warn; the template's markers (``<|user|>``, ``<|end|>``,
    ``<|assistant|>``, special in its tokenizer, in no config) are no question with ``tokenizer=``: the prompts
    are exactly the question words, also in generate(). Without one they are question text: a question
    written before its image is ranked by ``<|end|><|assistant|>`` alone."""
    model, processor, tokenizer = _phi4()
    image = PHI4_MARKERS["image_token"]
    gen = torch.Generator().manual_seed(0)
    before, after = "w44 w39 w53 w0", "w43 w39 w7"
    inputs = processor(text=[f"<|user|>{before} {image}<|end|><|assistant|>",
                             f"<|user|>{image}{image} {after}<|end|><|assistant|>"],
                       images=[_photo(30, 30, gen), _photo(40, 64, gen), _photo(70, 20, gen)], padding=True,
                       return_tensors="pt")
    inputs.pop("num_img_tokens", None)  # returned by some versions; the model takes none
    assert inputs["image_sizes"].tolist() == [[32, 32], [64, 64], [96, 32]]  # 1x1, 2x2 and 3x1 crops
    masks = inputs["image_attention_mask"]
    assert masks.shape[1] == 1 + 4 and not masks[1, 1:].bool().all() and not masks[2, 1:4].bool().all()  # padded
    # Useful rows x (useful columns + a separator), a separator, the global view's 16 x (16 + 1): a whole crop's
    # 16x16; the 2x2 grid's 20 rows of 32 (its bottom padded); the 3x1 grid's 48 rows of 14 (its right padded).
    counts = [16 * 17 + 1 + 272, 20 * 33 + 1 + 272, 48 * 15 + 1 + 272]
    assert _token_layout(tokenizer, inputs, 0, image) == ["<|user|>", *before.split(), f"{image}*{counts[0]}",
                                                          "<|end|>", "<|assistant|>"]
    assert _token_layout(tokenizer, inputs, 1, image) == ["<|user|>", f"{image}*{counts[1] + counts[2]}",
                                                          *after.split(), "<|end|>", "<|assistant|>"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(0, counts[0]), (1, counts[1]), (1, counts[2])]
    assert prompts == [before.split(), after.split(), after.split()]
    assert not warned
    assert untokenized == [["<|end|>", "<|assistant|>"]] + [[*after.split(), "<|end|>", "<|assistant|>"]] * 2


def _fuyu_tokenizer():
    """As Fuyu's tokenizer: its normalizer writes ``▁`` for every space and ahead of the text, and ``|SPEAKER|``
    and ``|NEWLINE|`` are pieces of its vocabulary, ordinary text (no added or special tokens): the text
    ``|SPEAKER|`` is ``▁`` then ``|SPEAKER|`` (transformers 4.57's processor reads its id at index 1, and 5.x's
    drops the first token of each row's image text, that ``▁``). ``<0x04>`` is a byte token of its byte-fallback
    vocabulary (decoded: U+0004); ``<s>`` its special beginning of sequence."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = ["<unk>", "<s>", "</s>", "|ENDOFTEXT|", "▁", *(f"▁{w}" for w in WORDS), "|SPEAKER|", "|NEWLINE|",
             "<0x04>"]
    pieces = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    pieces.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pieces.pre_tokenizer = pre_tokenizers.Split(Regex(r"▁?[^▁|<]+|▁|\|SPEAKER\||\|NEWLINE\||<0x04>"), "isolated")
    pieces.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=pieces, unk_token="<unk>", bos_token="<s>",
                                                eos_token="|ENDOFTEXT|")


@pytest.mark.parametrize("legacy", [True, False], ids=["image_patches", "pixel_values"])
@torch.no_grad()
def test_fuyu_images_are_budgeted_whole_and_their_row_newlines_are_no_question(legacy):
    """Fuyu's processor writes each row's image first: its rows of ``|SPEAKER|`` patch tokens, each row ended
    by ``|NEWLINE|``, then ``<s>``, the question and ``<0x04>`` (its "beginning of answer"); rows with images
    of different sizes, left-padded. Each image is one selection of as many tokens as its patches
    (``_fuyu_counts``), keep-all bit for bit: transformers 5.x's processor gives every image's patches in
    one ``(patches, features)`` tensor (4.57's one entry an image). ``|NEWLINE|`` is ordinary text of its
    tokenizer and no config names it: the newlines between an image's rows are inside it, and with
    ``tokenizer=`` the one after its last row goes too (README: pass ``tokenizer=`` so that the question
    leaves it out), as ``<0x04>`` (a control character, decoded) does: the prompts are exactly the question
    words, also in generate(). Without one both are question text, and prune() warns. From transformers 5.24
    the processor returns the patches as ``pixel_values`` when asked (``return_legacy_image_output=False``)."""
    asks = inspect.signature(transformers.FuyuProcessor.__call__).parameters
    if not legacy and "return_legacy_image_output" not in asks:
        pytest.skip(f"transformers {transformers.__version__}'s Fuyu processor returns image_patches only")
    tokenizer = _fuyu_tokenizer()
    # 2 px patches; images within 8x12 px are not resized. 5.x's torchvision class: its PIL one fails in this
    # processor (it patchifies torch tensors with numpy's calls).
    images = transformers.FuyuImageProcessor(size={"height": 8, "width": 12}, patch_size={"height": 2, "width": 2})
    processor = transformers.FuyuProcessor(image_processor=images, tokenizer=tokenizer)
    model = _retokenized("fuyu", tokenizer, dict(image_token_id="|SPEAKER|", pad_token_id="<unk>"))
    gen = torch.Generator().manual_seed(0)
    questions = ["w1 w2 w3", "w4 w5"]
    inputs = processor(text=questions, images=[_photo(8, 12, gen), _photo(6, 8, gen)], return_tensors="pt",
                       **({} if legacy else {"return_legacy_image_output": False}))
    assert ("image_patches" in inputs) == legacy
    words = [tokenizer.tokenize(q) for q in questions]  # ▁w1 ▁w2 ▁w3, ▁w4 ▁w5
    grids = [(4, 6), (3, 4)]  # rows, patches a row
    for row, (h, w) in enumerate(grids):
        image = (["|SPEAKER|"] * w + ["|NEWLINE|"]) * h
        assert _token_layout(tokenizer, inputs, row, "") == image + ["<s>", *words[row], "<0x04>"]
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    assert runs == [(r, w) for r, (h, w) in enumerate(grids) for _ in range(h)]  # a run a row of patches

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == [(r, h * w) for r, (h, w) in enumerate(grids)]
    assert prompts == words
    assert untokenized == [["|NEWLINE|", *w, "<0x04>"] for w in words]  # the last row's newline, the answer's mark
    assert len(warned) == 1 and "Fuyu" in warned[0] and "tokenizer=" in warned[0]  # the call without one
