"""prune() on a block diffusion VLM (DiffusionGemma, transformers 5.24+): the encoder prefills the kept tokens,
and every denoising step of every canvas reads the shorter cache.

The truth each pruned run is held to is the unpatched model with the dropped image tokens masked out of its
2-D attention mask (the tiny model's sliding window covers every prompt, so attention over cache slots and
over positions agree): every denoising step's logits, the generated tokens and the plain forward's logits.
Keep-all reproduces the unpatched model bit for bit."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.integrations.transformers import cache_kwargs  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import BLOCK_DIFFUSION_BUILDERS  # noqa: E402

from .reference import masked_out  # noqa: E402

pytestmark = pytest.mark.skipif(not BLOCK_DIFFUSION_BUILDERS, reason="no block diffusion model in this transformers")

NEW_TOKENS, STEPS = 12, 3  # three canvases of 4 tokens, three denoising steps each


@pytest.fixture(scope="module")
def tiny():
    return BLOCK_DIFFUSION_BUILDERS["diffusion_gemma"]()


def _generate(model, inputs, **kwargs):
    """The sequences and every denoising step's logits (the LM head's outputs, in order)."""
    steps = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: steps.append(out.clone()))
    try:
        torch.manual_seed(1)  # the canvases' noise and the sampler's draws
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, max_denoising_steps=STEPS, **kwargs)
    finally:
        hook.remove()
    return out, steps


def _cache(output):
    """The output's cache (``past_key_values`` before transformers 5.24)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


@torch.no_grad()
def test_keep_all_generates_the_unpatched_steps_bit_for_bit(tiny):
    inputs = tiny.make_inputs(tiny.batch)
    expected, expected_steps = _generate(tiny.model, inputs)
    with zspa_kernels.prune(tiny.model, keep=1.0):
        got, steps = _generate(tiny.model, inputs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(steps) == len(expected_steps) == NEW_TOKENS // 4 * STEPS
    assert all(torch.equal(a, b) for a, b in zip(steps, expected_steps))


@pytest.mark.parametrize("keep", [3, 0.5])
@torch.no_grad()
def test_pruned_generation_is_the_unpatched_model_without_the_dropped_tokens(tiny, keep):
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=keep) as handle:
        got, steps = _generate(model, inputs)
        kept_positions = handle.last_kept_positions
        dropped = sum(s.n_tokens - s.kept.numel() for s in handle.last_selection)
    assert dropped > 0
    expected, expected_steps = _generate(model, masked_out(inputs, kept_positions, model.config.image_token_id))
    assert len(steps) == len(expected_steps)
    for a, b in zip(steps, expected_steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences, expected.sequences)
    # The cache holds the kept prompt (rows re-padded to the longest) and every canvas but the last.
    assert _cache(got).get_seq_length() == kept_positions.shape[1] + NEW_TOKENS - 4
    assert _cache(expected).get_seq_length() == inputs["input_ids"].shape[1] + NEW_TOKENS - 4


@torch.no_grad()
def test_a_forward_reads_the_pruned_cache_as_the_masked_model_does(tiny):
    """model(**inputs, decoder_input_ids=canvas): one prefill and one denoising step, with or without the
    decoder's 2-D mask over the unpruned prompt and the canvas."""
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    canvas = torch.randint(3, 100, (len(tiny.batch), 4), generator=torch.Generator().manual_seed(3))
    expected = model(**inputs, decoder_input_ids=canvas).logits
    with zspa_kernels.prune(model, keep=1.0):
        assert torch.equal(model(**inputs, decoder_input_ids=canvas).logits, expected)
    with zspa_kernels.prune(model, keep=3) as handle:
        got = model(**inputs, decoder_input_ids=canvas).logits
        kept_positions = handle.last_kept_positions
        masks = torch.nn.functional.pad(inputs["attention_mask"], (0, 4), value=1)
        got_masked = model(**inputs, decoder_input_ids=canvas, decoder_attention_mask=masks).logits
        with pytest.raises(ValueError, match=r"decoder_attention_mask: expected 36 columns .* got 35"):
            model(**inputs, decoder_input_ids=canvas, decoder_attention_mask=masks[:, 1:])
    masked = masked_out(inputs, kept_positions, model.config.image_token_id)
    decoder_mask = torch.nn.functional.pad(masked["attention_mask"], (0, 4), value=1)
    reference = model(**masked, decoder_input_ids=canvas, decoder_attention_mask=decoder_mask).logits
    torch.testing.assert_close(got_masked, reference, rtol=1e-5, atol=1e-5)
    # Without the decoder's mask a pruned cache holds no slot to hide but the re-padding (the prompt's own
    # padding was dropped with the image tokens), which the hooks hide.
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_hand_written_loop_appends_canvases_at_their_original_positions(tiny):
    """Canvases encoded into the cache by forward calls that number no position (the model would count the
    pruned cache's slots), with masks over the unpruned sequence, as a hand-written decoding loop passes them."""
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    gen = torch.Generator().manual_seed(4)
    canvases = [torch.randint(3, 100, (len(tiny.batch), 4), generator=gen) for _ in range(3)]

    def loop(inputs):
        mask = inputs["attention_mask"]
        out = model(**inputs, decoder_input_ids=canvases[0],
                    decoder_attention_mask=torch.nn.functional.pad(mask, (0, 4), value=1))
        cache, logits = _cache(out), [out.logits]
        for done, canvas in zip(canvases, canvases[1:]):
            mask = torch.nn.functional.pad(mask, (0, 4), value=1)
            out = model(input_ids=done, attention_mask=mask, **cache_kwargs(model, cache), decoder_input_ids=canvas,
                        decoder_attention_mask=torch.nn.functional.pad(mask, (0, 4), value=1))
            logits.append(out.logits)
        return logits

    with zspa_kernels.prune(model, keep=3) as handle:
        got = loop(inputs)
        kept_positions = handle.last_kept_positions
    expected = loop(masked_out(inputs, kept_positions, model.config.image_token_id))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_static_cache_is_refused_before_the_prompt_runs(tiny):
    inputs = tiny.make_inputs(tiny.single)
    with zspa_kernels.prune(tiny.model, keep=3) as handle:
        with pytest.raises(RuntimeError, match="dynamic cache only"):
            _generate(tiny.model, inputs, cache_implementation="static", disable_compile=True)
        assert handle.last_selection == []
        _generate(tiny.model, inputs)  # the same handle, on the default (dynamic) cache
        assert len(handle.last_selection) == 1


def _diffusion_gemma_with_its_processor():
    """A tiny random DiffusionGemma around the ids of the real processor class its checkpoints name (Gemma 4's:
    4 px patches pooled 3x3, at most 70 soft tokens an image, between begin/end-of-image markers)."""
    from .test_real_processors import GEMMA4_MARKERS, MINUTES, _image_processor, _text, _tokenizer, _vision

    import torchvision  # noqa: F401  (the processor's video processor needs it: an error here, not a skip)

    boi, eoi, image, boa, eoa, audio = GEMMA4_MARKERS
    tokenizer = _tokenizer(GEMMA4_MARKERS, plain=MINUTES, bos="<bos>", boi_token=boi, eoi_token=eoi, image_token=image,
                           boa_token=boa, eoa_token=eoa, audio_token=audio)
    sizes = dict(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)
    processor = transformers.Gemma4Processor(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
        image_processor=_image_processor("Gemma4ImageProcessor", **sizes),
        video_processor=transformers.Gemma4VideoProcessor(**sizes), tokenizer=tokenizer, image_seq_length=70)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.DiffusionGemmaConfig(
        vision_config=_vision(num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                              position_embedding_size=64),
        text_config=_text(tokenizer, head_dim=8, global_head_dim=8, max_position_embeddings=2048, num_experts=2,
                          top_k_experts=1, moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=1024, use_bidirectional_attention="vision", final_logit_softcapping=30.0,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=ids(image), boi_token_id=ids(boi), eoi_token_id=ids(eoi), pad_token_id=tokenizer.pad_token_id,
        canvas_length=4)
    torch.manual_seed(0)
    model = transformers.DiffusionGemmaForBlockDiffusion(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, None
    return model, processor, tokenizer


@torch.no_grad()
def test_the_real_processor_layout_generates_as_the_masked_model():
    """The processor's rows (a question before its image, an image before its question; left-padded): each
    image is a selection of its own soft tokens, ranked by its row's question alone (no marker, no
    padding), and every denoising step equals the unpatched model's with the dropped tokens masked out."""
    from .test_real_processors import _prompt_words, _questions_around_images, _runs

    model, processor, tokenizer = _diffusion_gemma_with_its_processor()
    inputs, questions = _questions_around_images(processor, processor.image_token)
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    with zspa_kernels.prune(model, keep=5, tokenizer=processor) as handle:
        got, steps = _generate(model, inputs)
        selections, kept_positions = handle.last_selection, handle.last_kept_positions
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs and all(n > 5 for _, n in runs)
    assert [_prompt_words(tokenizer, inputs, s) for s in selections] == questions
    expected, expected_steps = _generate(model, masked_out(inputs, kept_positions, model.config.image_token_id))
    for a, b in zip(steps, expected_steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_generate_like_the_reference_on_the_gpu(backend, monkeypatch):
    """On a GPU (bench/run_gpu.sh's checks): every selection the hooks ask of a fused backend replays
    against the fp64 oracle, and where its picks equal the reference backend's, every denoising step's
    logits are the reference's, bit for bit."""
    from .test_prune_on_gpu import _on, _recorded_calls, _replay

    tiny = BLOCK_DIFFUSION_BUILDERS["diffusion_gemma"]()
    model = tiny.model.to("cuda")
    inputs = _on(tiny.make_inputs(tiny.batch), torch.device("cuda"))
    with zspa_kernels.prune(model, keep=3, backend="reference") as reference:
        expected, expected_steps = _generate(model, inputs)
    calls = _recorded_calls(monkeypatch)
    with zspa_kernels.prune(model, keep=3, backend=backend) as handle:
        got, steps = _generate(model, inputs)
    assert calls and all(args[7] == backend for args, _ in calls)
    for args, picks in calls:
        _replay(args, picks)
    assert len(handle.last_selection) == len(reference.last_selection) == 3
    if all(torch.equal(a.order, b.order) for a, b in zip(handle.last_selection, reference.last_selection)):
        assert all(torch.equal(a, b) for a, b in zip(steps, expected_steps))
        assert torch.equal(got.sequences, expected.sequences)
