"""prune() on an encoder-decoder VLM (T5Gemma 2, transformers 5.17+): the encoder reads the kept tokens, and
every decoding step cross-attends to them only.

The truth each pruned run is held to is the unpatched model with the dropped image tokens masked out of its
2-D attention mask (which masks the encoder's attention and the decoder's cross-attention alike; the tiny
model's sliding window covers every prompt): every step's scores and the generated tokens, greedy, by beam
search, sampled several times a prompt, on a static cache, without a cache; and a forward's logits. Keep-all
reproduces the unpatched model bit for bit."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.spec import release  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import ENCODER_DECODER_BUILDERS  # noqa: E402

from .reference import masked_out  # noqa: E402

pytestmark = pytest.mark.skipif(not ENCODER_DECODER_BUILDERS, reason="no encoder-decoder VLM in this transformers")

MODES = {
    "greedy": dict(do_sample=False),
    "beam search": dict(do_sample=False, num_beams=2),
    "sampled twice a prompt": dict(do_sample=True, num_return_sequences=2),
    "static cache": dict(do_sample=False, cache_implementation="static"),
    "no cache": dict(do_sample=False, use_cache=False),
}


@pytest.fixture(scope="module", params=sorted(ENCODER_DECODER_BUILDERS))
def tiny(request):
    return ENCODER_DECODER_BUILDERS[request.param]()


def _generate(model, inputs, **kwargs):
    torch.manual_seed(1)  # the sampled mode's draws
    return model.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("mode", sorted(MODES))
@torch.no_grad()
def test_keep_all_generates_the_unpatched_scores_bit_for_bit(tiny, mode):
    inputs = tiny.make_inputs(tiny.batch)
    expected = _generate(tiny.model, inputs, **MODES[mode])
    with zspa_kernels.prune(tiny.model, keep=1.0):
        got = _generate(tiny.model, inputs, **MODES[mode])
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))


@pytest.mark.parametrize("mode", sorted(MODES))
@torch.no_grad()
def test_pruned_generation_is_the_unpatched_model_without_the_dropped_tokens(tiny, mode):
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=3) as handle:
        got = _generate(model, inputs, **MODES[mode])
        kept_positions = handle.last_kept_positions
        selections = handle.last_selection
    assert len(selections) == tiny.n_images(tiny.batch) and all(s.kept.numel() == 3 for s in selections)
    expected = _generate(model, masked_out(inputs, kept_positions, model.config.image_token_id), **MODES[mode])
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_prompt_without_images_generates_as_unpatched(tiny):
    """Nothing to select: the encoder runs on the prompt as given (Florence-2's: numbered by its own table)."""
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long())
    expected = _generate(tiny.model, inputs, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=3) as handle:
        got = _generate(tiny.model, inputs, do_sample=False)
        assert handle.last_selection == [] and handle.last_kept_positions is None
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))


@torch.no_grad()
def test_a_forward_encodes_the_kept_tokens_and_reads_them_as_the_masked_model_does(tiny):
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    answers = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10]])
    with warnings.catch_warnings(record=True) as unpatched:
        warnings.simplefilter("always")
        expected = model(**inputs, decoder_input_ids=answers).logits
    with zspa_kernels.prune(model, keep=1.0):
        assert torch.equal(model(**inputs, decoder_input_ids=answers).logits, expected)
    with zspa_kernels.prune(model, keep=3) as handle, warnings.catch_warnings(record=True) as pruned:
        warnings.simplefilter("always")
        out = model(**inputs, decoder_input_ids=answers)
        kept_positions = handle.last_kept_positions
    # The encoder takes no cache, and the hooks hand it none (it would warn that it ignores one).
    assert [str(w.message) for w in pruned] == [str(w.message) for w in unpatched]
    # The encoder's output holds the kept tokens only: the text, and 3 of each image's 16.
    text = (inputs["input_ids"] != model.config.image_token_id) & (inputs["attention_mask"] == 1)
    assert out.encoder_last_hidden_state.shape[1] == kept_positions.shape[1] == int((text.sum(1) + 3 * torch.tensor(
        [sum(seg[0] == "image" for seg in row) for row in tiny.batch])).max())
    reference = model(**masked_out(inputs, kept_positions, model.config.image_token_id), decoder_input_ids=answers)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_mask_over_neither_the_prompt_nor_the_encoder_output_is_refused(tiny):
    from transformers.modeling_outputs import BaseModelOutput

    model = tiny.model
    inputs = tiny.make_inputs(tiny.single)
    answers = torch.tensor([[1, 5]])
    with zspa_kernels.prune(model, keep=3):
        encoded = BaseModelOutput(model(**inputs, decoder_input_ids=answers).encoder_last_hidden_state)
        length, pruned = inputs["input_ids"].shape[1], encoded.last_hidden_state.shape[1]
        assert pruned < length
        with pytest.raises(ValueError, match=rf"encoder_attention_mask: expected {length} columns .* or {pruned} .* "
                                             rf"got {length - 1}"):
            model(encoder_outputs=encoded, attention_mask=inputs["attention_mask"][:, 1:], decoder_input_ids=answers)
        # A mask already over the pruned output is taken as it is.
        model(encoder_outputs=encoded, attention_mask=torch.ones(1, pruned, dtype=torch.long), decoder_input_ids=answers)


def _t5gemma2_with_its_processor():
    """A tiny random T5Gemma 2 around the ids of the real processor class its checkpoints name (Gemma3's:
    ``\\n\\n`` and begin/end-of-image markers around each image's 16 soft tokens)."""
    from .test_real_processors import _gemma3

    gemma3, processor, tokenizer = _gemma3()
    text = gemma3.config.text_config.to_dict()
    text = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "vocab_size", "pad_token_id")}
    text.update(query_pre_attn_scalar=8, sliding_window=1024, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=1024)
    vision = gemma3.config.vision_config.to_dict()
    config = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=gemma3.config.mm_tokens_per_image,
                     boi_token_index=gemma3.config.boi_token_id, eoi_token_index=gemma3.config.eoi_token_id,
                     image_token_index=gemma3.config.image_token_id),
        decoder=text, image_token_index=gemma3.config.image_token_id, eoi_token_index=gemma3.config.eoi_token_id)
    torch.manual_seed(0)
    model = transformers.T5Gemma2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.encoder.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return model, processor, tokenizer


@pytest.mark.skipif("t5gemma2" not in ENCODER_DECODER_BUILDERS, reason="T5Gemma 2: transformers 5.17+")
@torch.no_grad()
def test_the_real_processor_layout_generates_as_the_masked_model():
    """Gemma3's processor (which T5Gemma 2 checkpoints name): a question before its image and an image before
    its question, left-padded; each image a selection of its own soft tokens ranked by its row's question
    alone (its newlines and markers are no question with the tokenizer), and generation as the masked model's."""
    from .test_real_processors import _prompt_words, _questions_around_images, _runs

    model, processor, tokenizer = _t5gemma2_with_its_processor()
    inputs, questions = _questions_around_images(processor, processor.boi_token)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    with zspa_kernels.prune(model, keep=5, tokenizer=processor) as handle:
        got = _generate(model, inputs, do_sample=False, num_beams=2)
        selections, kept_positions = handle.last_selection, handle.last_kept_positions
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == questions
    expected = _generate(model, masked_out(inputs, kept_positions, model.config.image_token_id), do_sample=False,
                         num_beams=2)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _florence2_with_its_processor(words: tuple = ()):
    """A tiny random Florence-2 around the ids of its real processor (CLIP's image processor, 17 image tokens
    an image, a BART tokenizer): it writes the image's tokens, bos, the task's question and eos, right-padded.
    ``words``: more of the tokenizer's words."""
    from zspa_kernels.integrations.transformers.tiny import florence2

    from .test_real_processors import _image_processor, _tokenizer

    words = tuple(dict.fromkeys(("What", "is", "the", "text", "in", "image?", "Locate", "image.", *words)))
    # 4.x's processor takes a BART tokenizer only; 5.x's BART tokenizer would rebuild its own vocabulary on loading
    # a saved checkpoint (the demo's test), where the word-level one loads as it was saved.
    bart = transformers.BartTokenizerFast if release("transformers") < (5, 0) else None
    tokenizer = _tokenizer(["<image>"], plain=[], words=words, cls=bart,
                           image_token="<image>")
    tokenizer.padding_side = "right"  # BART's
    image_processor = _image_processor("CLIPImageProcessor", size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # as the checkpoints' preprocessor configs name it (577 there)
    processor = transformers.Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    tiny = florence2(vocab=len(tokenizer), image_token=tokenizer.convert_tokens_to_ids("<image>"),
                     bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    return tiny.model, processor, tokenizer


@pytest.mark.skipif("florence2" not in ENCODER_DECODER_BUILDERS, reason="Florence-2: transformers 4.56+")
@torch.no_grad()
def test_florence2_task_prompts_rank_each_image_by_the_question_they_become():
    """Florence-2's processor turns a task token into a question (``<OCR>``: "What is the text in the image?")
    written after the image's tokens and bos; each image is ranked by that question alone, and generation (beam
    search, right-padded rows) is the masked model's."""
    from .test_real_processors import _photo, _prompt_words, _runs

    model, processor, tokenizer = _florence2_with_its_processor()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=["<OCR>", "<OPEN_VOCABULARY_DETECTION>w4 w5"], images=[_photo(48, 40, gen), _photo(40, 56, gen)],
                       padding=True, return_tensors="pt")
    assert inputs["attention_mask"][1, -1] == 0  # the shorter row is padded on the right
    with zspa_kernels.prune(model, keep=4) as handle:
        got = _generate(model, inputs, do_sample=False, num_beams=2)
        selections, kept_positions = handle.last_selection, handle.last_kept_positions
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(0, 17), (1, 17)]
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == [
        "What is the text in the image?".split(), "Locate w4 w5 in the image.".split()]
    expected = _generate(model, masked_out(inputs, kept_positions, model.config.image_token_id), do_sample=False,
                         num_beams=2)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("florence2" not in ENCODER_DECODER_BUILDERS, reason="Florence-2: transformers 4.56+")
def test_a_florence2_config_without_image_tokens_is_refused_naming_the_checkpoints_to_use():
    """Florence-2's remote code (microsoft/Florence-2-*, trust_remote_code=True) shares its model type but writes
    no image tokens; its config names no image_token_id."""
    model = ENCODER_DECODER_BUILDERS["florence2"]().model
    object.__setattr__(model.config, "image_token_id", None)  # as the remote config has none (5.x's validates fields)
    with pytest.raises(ValueError, match=r"transformers' own Florence-2 .* names no image_token_id, as the remote code"):
        zspa_kernels.prune(model, keep=3)
    assert not model._forward_pre_hooks and not model.model.language_model.encoder._forward_pre_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(ENCODER_DECODER_BUILDERS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_generate_like_the_reference_on_the_gpu(name, backend, monkeypatch):
    """On a GPU (bench/run_gpu.sh's checks): every selection the hooks ask of a fused backend replays against
    the fp64 oracle, and where its picks equal the reference backend's, the beam search's scores are the
    reference's, bit for bit."""
    from .test_prune_on_gpu import _on, _recorded_calls, _replay

    tiny = ENCODER_DECODER_BUILDERS[name]()
    model = tiny.model.to("cuda")
    inputs = _on(tiny.make_inputs(tiny.batch), torch.device("cuda"))
    with zspa_kernels.prune(model, keep=3, backend="reference") as reference:
        expected = _generate(model, inputs, do_sample=False, num_beams=2)
    calls = _recorded_calls(monkeypatch)
    with zspa_kernels.prune(model, keep=3, backend=backend) as handle:
        got = _generate(model, inputs, do_sample=False, num_beams=2)
    assert calls and all(args[7] == backend for args, _ in calls)
    for args, picks in calls:
        _replay(args, picks)
    assert len(handle.last_selection) == len(reference.last_selection) == tiny.n_images(tiny.batch)
    if all(torch.equal(a.order, b.order) for a, b in zip(handle.last_selection, reference.last_selection)):
        assert torch.equal(got.sequences, expected.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
