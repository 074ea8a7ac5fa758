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


@pytest.fixture(scope="module")
def tiny():
    return ENCODER_DECODER_BUILDERS["t5gemma2"]()


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
    model = tiny.model
    inputs = tiny.make_inputs(tiny.single)
    with zspa_kernels.prune(model, keep=3):
        encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      pixel_values=inputs["pixel_values"])
        answers = torch.tensor([[1, 5]])
        with pytest.raises(ValueError, match=r"encoder_attention_mask: expected 30 columns .* or 17 .* got 29"):
            model(encoder_outputs=encoded, attention_mask=inputs["attention_mask"][:, 1:], decoder_input_ids=answers)
        # A mask already over the pruned output is taken as it is.
        model(encoder_outputs=encoded, attention_mask=torch.ones(1, 17, dtype=torch.long), decoder_input_ids=answers)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_generate_like_the_reference_on_the_gpu(backend, monkeypatch):
    """On a GPU (bench/run_gpu.sh's checks): every selection the hooks ask of a fused backend replays against
    the fp64 oracle, and where its picks equal the reference backend's, the beam search's scores are the
    reference's, bit for bit."""
    from .test_prune_on_gpu import _on, _recorded_calls, _replay

    tiny = ENCODER_DECODER_BUILDERS["t5gemma2"]()
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
