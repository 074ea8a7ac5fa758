"""prune() on a vision-language-action model with a flow-matching action expert (PI0 from transformers 5.17,
PI0.5 from 5.25): the VLM prefills the kept tokens of the prefix, and every denoising step's action expert
reads the shorter cache.

The truth each pruned run is held to is the unpatched model with the dropped image tokens masked out of its
2-D attention mask and every position numbered as in the unpruned run (the model numbers its prefix and its
action chunk by counting the mask, which masking would shift: the reference hands the VLM and the expert the
unpruned numbering): the actions of ``sample_actions`` and a forward's velocities. Keep-all reproduces the
unpatched model bit for bit."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.integrations.transformers import cache_kwargs, kv_cache  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import ACTION_EXPERT_BUILDERS  # noqa: E402

from .reference import masked_out  # noqa: E402

pytestmark = pytest.mark.skipif(not ACTION_EXPERT_BUILDERS, reason="no action expert model in this transformers")

IMAGE = 127  # the tiny models' image token


@pytest.fixture(scope="module", params=sorted(ACTION_EXPERT_BUILDERS))
def tiny(request):
    return ACTION_EXPERT_BUILDERS[request.param]()


def _timestep(inputs) -> torch.Tensor:
    return torch.full((inputs["input_ids"].shape[0],), 0.4)


class _UnprunedNumbering:
    """The reference's positions: the VLM's prefix and the expert's chunk numbered as the unpatched model numbers
    them for ``mask``, the unpruned 2-D mask (the count of its tokens), or none over a prefix of ``width``
    tokens (PaliGemma's own numbering from 1, then the expert's count of the cache's slots), whatever mask
    the run is given."""

    def __init__(self, model, mask, width: int):
        prefix = None if mask is None else mask.cumsum(-1) - 1
        first = torch.tensor([[width]]) if mask is None else mask.sum(-1, keepdim=True)

        def expert(module, args, kwargs):
            return args, dict(kwargs, position_ids=first + torch.arange(kwargs["inputs_embeds"].shape[1]))

        self.hooks = [
            model.model.vlm.register_forward_pre_hook(
                lambda module, args, kwargs: (args, dict(kwargs, position_ids=prefix)), with_kwargs=True),
            model.model.dit.register_forward_pre_hook(expert, with_kwargs=True),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def _reference_actions(model, inputs, kept_positions):
    """``sample_actions`` of the unpatched model with the dropped image tokens masked out, numbered unpruned."""
    with _UnprunedNumbering(model, inputs["attention_mask"], inputs["input_ids"].shape[1]):
        return model.sample_actions(**masked_out(inputs, kept_positions, IMAGE))


def _forward(model, inputs, mask=True):
    kwargs = {k: v for k, v in inputs.items() if k != "attention_mask" or mask}
    return model(**kwargs, timestep=_timestep(inputs)).logits


@torch.no_grad()
def test_keep_all_samples_the_unpatched_actions_bit_for_bit(tiny):
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    expected = model.sample_actions(**inputs)
    expected_forward = [_forward(model, inputs, mask) for mask in (True, False)]
    with zspa_kernels.prune(model, keep=1.0) as handle:
        assert torch.equal(model.sample_actions(**inputs), expected)
        assert len(handle.last_selection) == tiny.n_images(tiny.batch) == 6
        for mask, want in zip((True, False), expected_forward):
            assert torch.equal(_forward(model, inputs, mask), want)


@pytest.mark.parametrize("keep", [3, 0.5])
@torch.no_grad()
def test_pruned_actions_are_the_unpatched_model_without_the_dropped_tokens(tiny, keep):
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    unpruned = model.sample_actions(**inputs)
    with zspa_kernels.prune(model, keep=keep) as handle:
        got = model.sample_actions(**inputs)
        kept_positions, selection = handle.last_kept_positions, handle.last_selection
    assert [(s.batch_row, s.n_tokens, s.kept.numel()) for s in selection] == [
        (row, 16, 3 if keep == 3 else 8) for row, cameras in enumerate((2, 1, 3)) for _ in range(cameras)]
    expected = _reference_actions(model, inputs, kept_positions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - unpruned).abs().max() > 1e-3  # the dropped tokens counted: the check above can fail


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
@torch.no_grad()
def test_a_forward_prefills_the_prefix_and_reads_it_as_the_masked_model(tiny, mask):
    """model(**inputs, timestep=t): the prefix prefilled inside the forward, one denoising step over it, with the
    caller's mask or none (every token attended, padding too, and numbered by the model)."""
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=3) as handle:
        got = _forward(model, inputs, mask)
        kept_positions = handle.last_kept_positions
    given = inputs["attention_mask"] if mask else torch.ones_like(inputs["attention_mask"])
    masked = masked_out(dict(inputs, attention_mask=given), kept_positions, IMAGE)
    with _UnprunedNumbering(model, inputs["attention_mask"] if mask else None, given.shape[1]):
        expected = _forward(model, masked)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_camera_is_a_budget_ranked_by_its_rows_task(tiny):
    """A camera's 16 tokens are one image; the question is the task after bos (the newline is text to a
    model whose tokenizer is not given), the padding after it none."""
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=4) as handle:
        model.sample_actions(**inputs)
    tasks = {0: (32, 5), 1: (16, 3), 2: (48, 7)}  # (bos position, task tokens) of each row
    named = {model.config.vlm_config.text_config.bos_token_id, model.config.vlm_config.text_config.eos_token_id}
    for s in handle.last_selection:
        bos, n = tasks[s.batch_row]
        ids = inputs["input_ids"][s.batch_row]
        assert ids[bos] == model.config.vlm_config.text_config.bos_token_id
        assert (inputs["attention_mask"][s.batch_row].sum() == bos + n + 2)  # the newline last, then the padding
        # The task and the newline, but the ids the config names (random text may draw bos or eos).
        assert s.prompt_tokens.tolist() == [p for p in range(bos + 1, bos + n + 2) if int(ids[p]) not in named]
        assert s.order.shape == (4,) and s.n_tokens == 16


@torch.no_grad()
def test_a_batch_row_samples_as_the_row_alone(tiny):
    model = tiny.model
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(model, keep=3):
        batch = model.sample_actions(**inputs)
        for r in range(len(tiny.batch)):
            alone = tiny.make_inputs(tiny.batch[r:r + 1], seeds=[r])
            torch.testing.assert_close(batch[r:r + 1], model.sample_actions(**alone), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_expert_refuses_what_it_cannot_number(tiny):
    """A pruned prefix's cache is read by the expert through the model's forward, cropped back to the prefix
    after each step, with a mask as wide as the unpruned prefix: anything else is refused, not misread."""
    model, inputs = tiny.model, tiny.make_inputs(tiny.batch)
    step = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    with zspa_kernels.prune(model, keep=3):
        cache = kv_cache(model.model.vlm(inputs_embeds=model.model.embed_prefix(
            inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"]),
            attention_mask=inputs["attention_mask"], position_ids=inputs["attention_mask"].cumsum(-1) - 1,
            token_type_ids=torch.zeros_like(inputs["input_ids"]), use_cache=True))
        prefix = cache.get_seq_length()
        assert prefix < inputs["input_ids"].shape[1]
        # A denoising step, as sample_actions() takes it; a second one on the uncropped cache is refused.
        model(**step, timestep=_timestep(inputs), **cache_kwargs(model, cache))
        with pytest.raises(RuntimeError, match="holds 5 tokens past the prefix|holds 4 tokens past the prefix"):
            model(**step, timestep=_timestep(inputs), **cache_kwargs(model, cache))
        cache.crop(prefix - cache.get_seq_length())
        narrow = dict(step, attention_mask=inputs["attention_mask"][:, 1:])
        with pytest.raises(ValueError, match=r"attention_mask: expected \(3, 57\)"):
            model(**narrow, timestep=_timestep(inputs), **cache_kwargs(model, cache))
        chunk = torch.zeros(3, 4, model.config.dit_config.hidden_size)
        extra = {"timestep_embeds": torch.zeros(3, chunk.shape[-1])} if "pi05" in type(model).__name__.lower() else {}
        with pytest.raises(RuntimeError, match="outside the model's forward"):
            model.model.dit(inputs_embeds=chunk, **cache_kwargs(model.model.dit, cache), **extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(ACTION_EXPERT_BUILDERS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_sample_like_the_reference_on_the_gpu(name, backend, monkeypatch):
    """On a GPU (bench/run_gpu.sh's checks): every selection the hooks ask of a fused backend replays against
    the fp64 oracle; where its picks equal the reference backend's, the actions are the reference's bit for bit.
    The hooks wait for the GPU once, at the prefill's copy of the ids and the mask to the host: never where they
    find the images in the embeddings, nor at a denoising step."""
    from zspa_kernels.integrations.transformers.action_expert import ActionExpertPruneHandle

    from .test_prune_on_gpu import DOCUMENTED_SYNCS, HOST_COPY, _on, _recorded_calls, _replay, _SyncWatch

    tiny = ACTION_EXPERT_BUILDERS[name]()
    model = tiny.model.to("cuda")
    inputs = _on(tiny.make_inputs(tiny.batch), torch.device("cuda"))
    with zspa_kernels.prune(model, keep=3, backend="reference") as reference:
        expected = model.sample_actions(**inputs)
    calls = _recorded_calls(monkeypatch)
    prefill = _SyncWatch(monkeypatch, "_prefill")
    found, expert = (_SyncWatch(monkeypatch, method, ActionExpertPruneHandle)
                     for method in ("_vlm_pre_hook", "_expert_pre_hook"))
    with zspa_kernels.prune(model, keep=3, backend=backend) as handle:
        got = model.sample_actions(**inputs)
    assert calls and all(args[7] == backend for args, _ in calls)
    for args, picks in calls:
        _replay(args, picks)
    assert len(handle.last_selection) == len(reference.last_selection) == tiny.n_images(tiny.batch)
    if all(torch.equal(a.order, b.order) for a, b in zip(handle.last_selection, reference.last_selection)):
        assert torch.equal(got, expected)
    assert (prefill.calls, found.calls, expert.calls) == (1, 1, model.config.num_inference_steps)
    assert prefill.ours.count(HOST_COPY) == 1 and set(prefill.ours) <= DOCUMENTED_SYNCS, prefill.ours
    assert found.ours == [] and expert.ours == [], (found.ours, expert.ours)
