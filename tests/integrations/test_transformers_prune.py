"""zspa_kernels.prune on tiny random VLMs of every supported family (CPU, no downloads).

The references are independent of the hooks' bookkeeping: the unpatched model
(keep-all), each row run alone (batching), and one no-cache forward of the bare
language model over the pruned prefix plus the generated tokens, at the decode
positions the UNPRUNED model uses (cached generation).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib.util
import inspect
import pickle
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.spec import keep_budget, release  # noqa: E402
from zspa_kernels.integrations.transformers import cache_kwargs, kv_cache  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import BUILDERS  # noqa: E402
from zspa_kernels.integrations.transformers.families import find_family, split_model  # noqa: E402
from zspa_kernels.integrations.transformers.handle import CROPS_BY_COUNT  # noqa: E402

from .reference import (assert_same_generation, capture_lm_calls, image_features_of, lm_head, lm_of,  # noqa: E402
                        next_turn, no_cache_logits, ops_of, padding_mask, pruned_generation, static_cache,
                        unpruned_decode_positions)

NEW_TOKENS = 4
KEEP = 5  # of 16+ tokens per image
ATOL = 1e-5  # cached vs no-cache fp32 logits: same math, different summation order


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    return BUILDERS[request.param]()


def _static_generate(tiny) -> None:
    """Skip where the unpatched model's own generate() fails on a static cache (Llama 4 on 5.17, PaliGemma 2)."""
    if not tiny.static_generate:
        pytest.skip("the unpatched model's generate() fails on a static cache on this transformers")


@torch.no_grad()
def test_keep_all_reproduces_unpatched_logits_exactly(tiny):
    inputs = tiny.make_inputs(tiny.batch)
    expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=1.0) as handle:
        got = tiny.model(**inputs).logits
    assert len(handle.last_selection) == tiny.n_images(tiny.batch)
    assert all(s.order.shape[0] == s.n_tokens for s in handle.last_selection)
    B, L = inputs["input_ids"].shape
    assert torch.equal(handle.last_kept_positions, torch.arange(L).expand(B, L))
    # The batch has an unpadded row, so the layout is the original one; padding slots are
    # refilled (their logits are meaningless), attended ones must match bit for bit.
    attended = inputs["attention_mask"].bool()
    assert got.shape == expected.shape and torch.equal(got[attended], expected[attended])


@torch.no_grad()
def test_a_text_only_prompt_runs_unpruned(tiny):
    """A model pruned for images still answers prompts without any: nothing is selected, and the
    logits and a generation are the unpatched model's (the families that size images from
    pixel_values or image_sizes raised for want of them)."""
    inputs = tiny.make_inputs(tiny.batch)
    text = dict(input_ids=inputs["input_ids"][:, -3:], attention_mask=inputs["attention_mask"][:, -3:])
    expected = tiny.model(**text).logits
    generated = tiny.model.generate(**text, max_new_tokens=NEW_TOKENS, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        assert not torch.isin(text["input_ids"], torch.tensor(handle.visual_ids)).any()
        tiny.model(**inputs)
        assert handle.last_kept_positions is not None
        assert torch.equal(tiny.model(**text).logits, expected) and handle.last_selection == []
        assert handle.last_kept_positions is None  # this prompt's outputs are its inputs' layout
        assert torch.equal(tiny.model.generate(**text, max_new_tokens=NEW_TOKENS, do_sample=False), generated)


@torch.no_grad()
def test_keep_all_loss_is_the_unpatched_models(tiny):
    """With keep=1.0 the model computes its own loss (a family's own padding rule, as Gemma3's
    on transformers 4.57, and a router's auxiliary loss included): the unpatched loss, exactly."""
    inputs = tiny.make_inputs(tiny.batch)
    labels = _labels(tiny, inputs)
    routed = _router_logits_arg(tiny)
    expected = tiny.model(**inputs, labels=labels, **routed).loss
    with zspa_kernels.prune(tiny.model, keep=1.0):
        assert torch.equal(tiny.model(**inputs, labels=labels, **routed).loss, expected)


def _labels(tiny, inputs: dict) -> torch.Tensor:
    """The inputs as labels, where attended and the LM head can predict them (Molmo2's image tokens
    are in an extra vocabulary, which its unpatched loss rejects)."""
    vocab = tiny.model.config.get_text_config().vocab_size
    return inputs["input_ids"].masked_fill((inputs["attention_mask"] == 0) | (inputs["input_ids"] >= vocab), -100)


def _router_logits_arg(tiny) -> dict:
    """``output_router_logits=True`` where the unpatched model takes the argument (whether or not it
    returns router logits: transformers 4.57's GLM-4.5V takes it and returns none), else nothing
    (5.17/5.24's GLM-4.6V raises TypeError: its output has no field for them)."""
    try:
        tiny.model(**tiny.make_inputs(tiny.single), output_router_logits=True)
    except TypeError:
        return {}
    return dict(output_router_logits=True)


@torch.no_grad()
def test_router_logits_are_refused_wherever_the_wrapper_weighs_them_by_its_mask(tiny):
    """Where the unpatched wrapper turns router logits into a load-balancing loss over its (unpruned)
    attention mask, ``Family.router_loss`` must say so for this transformers, and a pruned forward that
    asks for them is refused (the kept tokens' logits are shorter: the loss would fail, or mix the two
    lengths silently). Where it does not, a pruned forward that asks for router logits is the same
    forward: same logits, same loss (4.57's GLM-4.5V, which computes no such loss, included)."""
    routed = _router_logits_arg(tiny)
    if not routed:
        pytest.skip("the unpatched model does not take output_router_logits")
    inputs = tiny.make_inputs(tiny.batch)
    labels = _labels(tiny, inputs)
    balanced = getattr(tiny.model(**inputs, labels=labels, **routed), "aux_loss", None) is not None
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        assert handle.family.weighs_router_logits() == balanced
        if balanced:
            with pytest.raises(ValueError, match="^output_router_logits: "):
                tiny.model(**inputs, labels=labels, **routed)
            return
        plain = tiny.model(**inputs, labels=labels)
        got = tiny.model(**inputs, labels=labels, **routed)
    assert torch.equal(got.logits, plain.logits) and torch.equal(got.loss, plain.loss)


QUANTIZED = ("fp8", "quanto", "hqq")  # transformers' quantized KV caches: FP8 (5.24 on), and KIVI's two packages


def _quantized_cache(tiny, backend: str) -> dict:
    """generate()'s arguments for one of transformers' quantized KV caches; skip where this transformers
    or this environment has none, or where the model has layers other than full attention (sliding
    windows, linear attention), which ``QuantizedCache`` refuses, unpatched too. FP8 keeps every state
    in 8 bits with one scale set by the prefill. quanto and hqq (the KIVI layer) keep the last
    ``residual_length`` states in full precision and fold them into 4-bit groups when the window fills:
    a window of 2 makes the prefill and every second decode step requantize everything. Their group is
    the model's head size, which divides every tensor they group (tiny models' heads are 4 to 128 wide)."""
    if backend == "fp8" and not hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):
        pytest.skip("this transformers has no FP8 quantized cache (5.24 added it)")
    package = {"fp8": None, "quanto": "optimum.quanto", "hqq": "hqq"}[backend]
    if package and importlib.util.find_spec(package.split(".")[0]) is None:
        pytest.skip(f"{package} is not installed")
    config = {"backend": backend}
    if backend != "fp8":
        text = tiny.model.config.get_text_config(decoder=True)
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        config.update(nbits=4, q_group_size=head, residual_length=2)
    try:
        transformers.QuantizedCache(config=tiny.model.config, **config)
    except ValueError as refused:
        pytest.skip(f"the unpatched model cannot use a quantized cache: {refused}")
    return dict(cache_implementation="quantized", cache_config=config)


def _lossless_quantized_cache(tiny, backend: str, monkeypatch) -> dict:
    """``_quantized_cache``, with the backend's storage made lossless for this test (FP8's scale 1, every
    backend's states kept in fp32), so that a comparison with a no-cache forward holds the cache's own
    bookkeeping (its length counter, KIVI's window folded into the stored states, beam reordering)."""
    gen = _quantized_cache(tiny, backend)
    if backend == "fp8":
        monkeypatch.setattr(transformers.cache_utils.Fp8QuantizedLayer, "_quantize",
                            lambda self, tensor, scale=None: (tensor.float(), torch.ones((), device=tensor.device)))
    else:
        layer = {"quanto": transformers.cache_utils.QuantoQuantizedLayer,
                 "hqq": transformers.cache_utils.HQQQuantizedLayer}[backend]
        monkeypatch.setattr(layer, "_quantize", lambda self, tensor, axis: tensor.float())
        monkeypatch.setattr(layer, "_dequantize", lambda self, stored: stored)
    return gen


@pytest.mark.parametrize("cache", ["dynamic", "static", *QUANTIZED])
@torch.no_grad()
def test_keep_all_generate_matches_unpatched(tiny, cache):
    """Keep-all generation is the unpatched model's, logits bit for bit; on the quantized caches too
    (caches that count their length themselves and cannot be cropped), with their real rounding; and on
    a static cache, whose masks generate() builds ahead of each step unpatched, and the hooks instead
    where they build them once (Family.passes_mask_dicts)."""
    if cache == "static":
        _static_generate(tiny)
        if tiny.static_differs == "neither":
            pytest.skip("the unpatched model's static-cache generation of a batch is wrong, and a keep-all pruned one "
                        "otherwise (TinyVLM.static_differs)")
    inputs = tiny.make_inputs(tiny.batch)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
               **(_quantized_cache(tiny, cache) if cache in QUANTIZED else {}),
               **(dict(cache_implementation="static") if cache == "static" else {}))
    expected = tiny.model.generate(**inputs, **copy.deepcopy(gen))  # 4.57 pops cache_config's backend
    with zspa_kernels.prune(tiny.model, keep=1.0):
        got = tiny.model.generate(**inputs, **copy.deepcopy(gen))
    if cache == "static" and tiny.static_differs == "dynamic":
        # The model's own dynamic-cache generation, to rounding (other kernels at other key lengths),
        # where its static-cache one differs: the hooks build the masks as its forward does.
        gen.pop("cache_implementation")
        dynamic = tiny.model.generate(**inputs, **gen)
        assert not all(torch.allclose(a, b, atol=ATOL, rtol=0) for a, b in zip(expected.logits, dynamic.logits))
        assert torch.equal(got.sequences, dynamic.sequences)
        for a, b in zip(got.logits, dynamic.logits):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        return
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))


@torch.no_grad()
def test_a_pruned_prefill_computes_the_logits_asked_for(tiny):
    """generate() asks a prefill for the last position's logits only (``logits_to_keep=1``): a pruned
    prompt's must be those, not the LM head over every kept position (transformers 5.24's Gemma4
    wrapper slices only hidden states as long as ``input_ids``; its language model slices them
    itself ahead of KV-shared layers, unless every layer's hidden states are asked for)."""
    if "logits_to_keep" not in inspect.signature(tiny.model.forward).parameters:
        pytest.skip("this transformers' model takes no logits_to_keep")
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        every = tiny.model(**inputs).logits
        assert handle.last_selection and every.shape[1] < inputs["input_ids"].shape[1]
        for flags in ({}, dict(output_hidden_states=True)):
            last = tiny.model(**inputs, logits_to_keep=1, **flags).logits
            assert last.shape == (every.shape[0], 1, every.shape[2]), flags
            torch.testing.assert_close(last[:, 0], every[:, -1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_is_shorter_by_the_dropped_count(tiny):
    inputs = tiny.make_inputs(tiny.single)
    length = inputs["input_ids"].shape[1]
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model(**inputs, use_cache=True)
    (sel,) = handle.last_selection
    dropped = sel.n_tokens - KEEP
    assert dropped > 0 and sel.kept.shape == (KEEP,)
    assert kv_cache(out).get_seq_length() == length - dropped
    assert out.logits.shape[1] == length - dropped


@torch.no_grad()
def test_batch_cache_length_is_the_longest_kept_row(tiny):
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model(**inputs, use_cache=True)
    dropped = torch.zeros(len(tiny.batch), dtype=torch.long)
    for s in handle.last_selection:
        dropped[s.batch_row] += s.n_tokens - s.order.shape[0]
    kept = inputs["attention_mask"].sum(1) - dropped  # old padding is dropped as well
    assert kv_cache(out).get_seq_length() == int(kept.max())
    image_rows = [s.batch_row for s in handle.last_selection]
    assert image_rows == sorted(image_rows)  # batch-row order, then image order


@pytest.mark.parametrize("mode", ["greedy", "sample", "static", *QUANTIZED])
@torch.no_grad()
def test_cached_generation_equals_no_cache_reference(tiny, mode, monkeypatch):
    """Pruned generation on each kind of cache equals one no-cache forward over the pruned prefix. On
    the quantized caches, their storage is made lossless here (FP8's scale 1; every backend's states
    kept in fp32): the caches' own bookkeeping (a length counter, no crop; KIVI's full-precision
    window folded into the quantized states) is what is tested, not their rounding."""
    if mode == "static":
        _static_generate(tiny)
    inputs = tiny.make_inputs(tiny.batch)
    if mode in QUANTIZED:
        gen = dict(do_sample=False, **_lossless_quantized_cache(tiny, mode, monkeypatch))
    else:
        gen = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=0),
               "static": dict(do_sample=False, cache_implementation="static")}[mode]
    # 4.57's generate() pops the backend out of the caller's cache_config: each call gets its own
    positions = unpruned_decode_positions(tiny.model, inputs, NEW_TOKENS, **copy.deepcopy(gen))
    torch.manual_seed(0)
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, output_logits=True,
                                  return_dict_in_generate=True, **copy.deepcopy(gen))
    prefill = calls[0]
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    rows = list(range(len(tiny.batch)))
    ref = no_cache_logits(tiny.model, prefill, positions, tokens, rows,
                          image_features_of(tiny.model, inputs))
    start = prefill["inputs_embeds"].shape[1] - 1
    for t, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[:, start + t], atol=ATOL, rtol=0)
    if mode != "sample":
        assert torch.equal(tokens, ref[:, start:start + NEW_TOKENS].argmax(-1))
    if mode in QUANTIZED:  # it holds the pruned prefix and each generated token but the last
        assert kv_cache(out).get_seq_length() == prefill["inputs_embeds"].shape[1] + NEW_TOKENS - 1


@torch.no_grad()
def test_static_cache_decode_steps_never_read_its_length_and_a_reused_cache_prunes_again(tiny, monkeypatch):
    """A static cache keeps its length in a device tensor: reading it back is a host sync. The
    hooks read it once a prompt (a prefill on a cache they did not prune), never at a decode
    step: they know the caches they pruned until ``generate()`` resets one to reuse it, which
    drops that knowledge, so the second generate() prunes its prefill again, identically."""
    from zspa_kernels.integrations.transformers import handle as handle_module

    _static_generate(tiny)
    reads = []
    real = handle_module._is_empty
    monkeypatch.setattr(handle_module, "_is_empty", lambda cache: reads.append(1) or real(cache))
    inputs = tiny.make_inputs(tiny.batch)
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
               return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        first = tiny.model.generate(**inputs, **gen)
        picked = [s.order for s in handle.last_selection]
        # At most the prefill's one read (none while the cache is not yet allocated: its length is
        # then a host 0); NEW_TOKENS - 1 decode steps, each past two hooks, read nothing.
        assert picked and len(reads) <= 1
        second = tiny.model.generate(**inputs, **gen)
        assert len(reads) <= 2
        assert len(handle.last_selection) == len(picked)
        assert all(torch.equal(a, b.order) for a, b in zip(picked, handle.last_selection))
        # A static cache kept by the caller (as for torch.compile), reset and passed in again:
        # the reset drops the handle's state of it, so the prompt is a new prefill, not a reuse.
        # A deep copy of it (prompt caching) is a cache of its own: resetting the copy leaves it.
        cache = kv_cache(second)
        assert cache in handle._caches
        copied = copy.deepcopy(cache)
        copied.reset()
        assert cache in handle._caches and bool(cache.get_seq_length() > 0)
        cache.reset()
        third = tiny.model.generate(**inputs, **cache_kwargs(tiny.model, cache),
                                    **{k: v for k, v in gen.items() if k != "cache_implementation"})
        assert len(reads) <= 3 and all(torch.equal(a, b.order) for a, b in zip(picked, handle.last_selection))
        # Reset, then ONE token: a new sequence, which only the reset can tell from a decode step
        # without reading the length back. It must run as unpruned, at position 0.
        cache.reset()
        token = dict(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"][:, -1:])
        got = tiny.model(**token, **cache_kwargs(tiny.model, cache), use_cache=True).logits
    cache.reset()
    expected = tiny.model(**token, **cache_kwargs(tiny.model, cache), use_cache=True).logits
    assert torch.equal(got, expected)
    assert torch.equal(first.sequences, second.sequences) and torch.equal(first.sequences, third.sequences)


@torch.no_grad()
def test_a_reset_after_a_one_token_generation_makes_a_new_sequence(tiny):
    """A generation of one token on a caller's static cache makes no decode step; a reset after
    it must still drop the handle's state of the cache, so that a one-token prompt on it is a new
    sequence (unpruned, at position 0), not a decode step of the pruned prefill."""
    _static_generate(tiny)
    inputs = tiny.make_inputs(tiny.batch)
    B, L = inputs["input_ids"].shape
    cache = static_cache(tiny.model, B, L + 4)
    token = dict(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"][:, -1:])
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        tiny.model.generate(**inputs, **cache_kwargs(tiny.model, cache), max_new_tokens=1, do_sample=False)
        assert handle.last_selection
        cache.reset()
        got = tiny.model(**token, **cache_kwargs(tiny.model, cache), use_cache=True).logits
    cache.reset()
    assert torch.equal(got, tiny.model(**token, **cache_kwargs(tiny.model, cache), use_cache=True).logits)


@torch.no_grad()
def test_static_cache_decoding_compiles_once(tiny):
    """On GPUs, generate() compiles the decode step of a static-cache generation by itself
    (transformers' automatic compile; CUDA graphs by default). The hooks must give that step the
    same shapes and no changing Python state at every step: otherwise Dynamo recompiles it at each
    step until its limit, then falls back to eager (minutes of compiles for a 7B model). Compiled
    here on CPU with Dynamo's eager backend: the pruned generation must compile no more graphs
    than the unpatched one (which recompiles once where transformers' sliding-window layers count
    their length in Python; one more where the hooks are a frame of their own: TinyVLM.hook_graph),
    and generate the tokens of its uncompiled self. Where the unpatched
    model compiles a graph per count of tokens routed to an expert (4.57's GLM-4.5V), its count
    depends on the tokens, which pruning changes: only the tokens are compared, and the unpatched
    generation, whose count would not be read, is not compiled (the slowest compiles of the suite)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    _static_generate(tiny)
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True  # what a CUDA model gets without asking
    inputs = tiny.make_inputs(tiny.batch)
    gen = dict(max_new_tokens=2 * NEW_TOKENS, min_new_tokens=2 * NEW_TOKENS, do_sample=False,
               cache_implementation="static")

    def compiled():  # the tokens, and how many graphs Dynamo compiled for them
        torch._dynamo.reset()
        counters.clear()
        try:
            return tiny.model.generate(**inputs, **gen, compile_config=compile_config), counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()

    unpatched = None if tiny.graphs_follow_routing else compiled()[1]
    if unpatched == 0:  # transformers 4.57 never compiles Llama 4's decoding
        pytest.skip("generate() compiles no decode step of this model on this transformers")
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        eager = tiny.model.generate(**inputs, **gen, disable_compile=True)
        tokens, pruned = compiled()
    assert torch.equal(tokens, eager)
    if unpatched is None:
        assert pruned >= 1, "generate() compiled no decode step of the pruned model"
    else:
        assert 1 <= pruned <= unpatched + tiny.hook_graph, (pruned, unpatched)


@pytest.mark.parametrize("cache", ["dynamic", *QUANTIZED])
@torch.no_grad()
def test_beam_search_scores_equal_no_cache_reference(tiny, cache, monkeypatch):
    """Beam scores of a pruned generation equal a no-cache forward's over the pruned prefix; on the
    quantized caches too (storage made lossless), which reorder their beams themselves (KIVI's
    layer defers the reordering of its quantized states to the next step)."""
    if not tiny.beam_batch:
        pytest.skip("the unpatched model cannot beam-search these inputs on this transformers")
    if cache in ("quanto", "hqq") and not hasattr(transformers.cache_utils.QuantizedLayer, "_apply_pending_reorder"):
        pytest.skip("this transformers' KIVI layer cannot reorder beams once its window is folded (5.17 and older index"
                    " the emptied window), unpatched too")
    quantized = _lossless_quantized_cache(tiny, cache, monkeypatch) if cache in QUANTIZED else {}
    inputs = tiny.make_inputs(tiny.beam_batch)
    beams = 3
    gen = dict(num_beams=beams, do_sample=False, length_penalty=0.0, **quantized)
    positions = unpruned_decode_positions(tiny.model, inputs, NEW_TOKENS, **copy.deepcopy(gen))
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, output_scores=True,
                                  return_dict_in_generate=True, **copy.deepcopy(gen))
    rows = [b * beams for b in range(len(tiny.beam_batch))]  # beams of a row share its prefill
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    ref = no_cache_logits(tiny.model, calls[0], positions, tokens, rows,
                          image_features_of(tiny.model, inputs)).log_softmax(-1)
    start = calls[0]["inputs_embeds"].shape[1] - 1
    steps = ref[:, start:start + NEW_TOKENS].gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, steps.sum(-1), atol=1e-4, rtol=0)


def _oracle_rows(calls: list, selection: list, keep) -> list:
    """The fp64 oracle's ``Row`` of each image of ``selection`` (a handle's ``last_selection``), read from the
    ``zspa::select_tokens`` calls that chose them (``calls``: ``(args, picks)`` in call order): select_images
    makes one call a distinct budget, ascending, its images in selection order."""
    from .test_prune_on_gpu import oracle_row

    budgets = [keep_budget(keep, s.n_tokens) for s in selection]
    assert len(calls) == len(set(budgets)), "one prefill: one call a budget"
    rows = [None] * len(selection)
    for (args, _), k in zip(calls, sorted(set(budgets))):
        for j, i in enumerate(i for i, b in enumerate(budgets) if b == k):
            rows[i] = oracle_row(args, j)
    return rows


@pytest.mark.parametrize("name, attn", [(n, "sdpa") for n in sorted(BUILDERS)] + [("llava", "eager")])
@torch.no_grad()
def test_each_batch_row_equals_that_row_alone(name, attn, monkeypatch):
    """Rows batched and alone give their vision towers different shapes, so image features may differ in the
    last bits (the host BLAS blocks a matrix product by its rows): where that flips a near-tie of the
    selection, the row's picks differ. Such a row is held to the near-tie, not to the row alone: the batch's
    picks replay within the backend's tolerance against the fp64 oracle on the features the row alone gave."""
    from fp64_oracle import replay
    from helpers import TOLERANCE
    from zspa_kernels.dispatch import resolve_backend

    from .test_prune_on_gpu import _recorded_calls

    tiny = BUILDERS[name](attn=attn)
    if not tiny.rows_independent:
        pytest.skip("the unpatched model's batch rows depend on each other")
    calls = _recorded_calls(monkeypatch)
    batch = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        together = tiny.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
        batched = handle.last_selection
        for r, row in enumerate(tiny.batch):
            calls.clear()
            alone = tiny.model.generate(**tiny.make_inputs([row], seeds=[r]), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
            mine = [s for s in batched if s.batch_row == r]
            assert len(mine) == len(handle.last_selection)
            if any(not torch.equal(a.order, b.order) for a, b in zip(mine, handle.last_selection)):
                args = calls[0][0]
                backend = resolve_backend(args[7], args[0].device, tuple(args[0].shape))
                for oracle, picked in zip(_oracle_rows(calls, handle.last_selection, KEEP), mine):
                    replay(oracle, picked.order.tolist(), TOLERANCE[backend][torch.float32])
                continue
            assert torch.equal(together.sequences[r, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
            for a, b in zip(together.logits, alone.logits):
                torch.testing.assert_close(a[r], b[0], atol=ATOL, rtol=0)


def _flex_attention(name: str, monkeypatch):
    """``BUILDERS[name]`` run with flex_attention, its kernel uncompiled; skip where the model does not run it.
    transformers compiles flex_attention's kernel, which inductor fails to build on CPU with some torch versions
    (torch 2.14.1: unpatched too); uncompiled, torch computes the attention from the same mask function and block
    mask, which are what this test is about."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from transformers.integrations import flex_attention as wrapper

    monkeypatch.setattr(wrapper.WrappedFlexAttention, "__call__", lambda self: flex.flex_attention)
    try:
        return BUILDERS[name](attn="flex_attention")
    except ValueError as error:
        if "flex" not in str(error):
            raise
        pytest.skip(f"transformers runs {name} without flex_attention")


def _fails_unpatched_alike(model, inputs: dict, gen: dict, error: Exception) -> None:
    """Skip where ``model``'s unpatched ``generate()`` fails with the pruned run's ``error``, type and message."""
    try:
        model.generate(**inputs, **gen)
    except Exception as unpatched:
        if (type(unpatched), str(unpatched)) == (type(error), str(error)):
            pytest.skip(f"the unpatched model fails alike: {type(error).__name__}: {error}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_flex_attention_generates_as_sdpa(name, cache, monkeypatch):
    """Under flex_attention the language model gets a ``BlockMask``: a mask function that the attention reads
    when it runs. A prompt's prebuilt one (PaliGemma, Molmo2, Inkling) is read for its padding as a 4-D mask
    is; on a static cache, transformers numbers a decode step's query by the cache's length tensor, which the
    layer has grown by the time the attention reads it, so the hooks' decode mask must hide the slots ahead
    itself, as generate()'s does (without that, every first decode step sees one empty slot: ~4e-3 off).
    Pruned and keep-all, a generation gives sdpa's: the same picks and tokens, logits within rounding."""
    sdpa = BUILDERS[name](attn="sdpa")
    if cache == "static":
        _static_generate(sdpa)
    flex = _flex_attention(name, monkeypatch)
    inputs = flex.make_inputs(flex.batch)
    gen = dict(max_new_tokens=NEW_TOKENS, **(dict(cache_implementation="static") if cache == "static" else {}))
    for keep in (1.0, KEEP):
        try:
            got = pruned_generation(flex.model, inputs, keep, **gen)
        except Exception as error:  # where transformers' own flex masks fail (4.57's Qwen3-VL-MoE on a static cache)
            _fails_unpatched_alike(_flex_attention(name, monkeypatch).model, inputs, gen, error)
            raise
        assert len(got[1]) == flex.n_images(flex.batch)
        assert_same_generation(got, pruned_generation(sdpa.model, inputs, keep, **gen), atol=ATOL)


@torch.no_grad()
def test_a_text_only_row_beside_rows_with_images_is_left_whole(tiny):
    """Batches mix questions with and without images (ScienceQA-style evaluation): a row without
    images keeps all its tokens and generates what the unpatched model generates for it alone."""
    rows = tiny.batch + [[("text", 8)]]
    batch = tiny.make_inputs(rows)
    attended = batch["attention_mask"][-1].bool()
    # Its token types too, where the masks read them (PaliGemma's: without them its prompt is not a prefix).
    alone = {k: batch[k][-1:, attended] for k in ("input_ids", "attention_mask", "token_type_ids")
             if k in batch}
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = tiny.model.generate(**alone, **gen)
    if not tiny.rows_independent and not torch.equal(tiny.model.generate(**batch, **gen).sequences[-1, -NEW_TOKENS:],
                                                     expected.sequences[0, -NEW_TOKENS:]):
        pytest.skip("the unpatched model's text row batched differs from the row alone")
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        together = tiny.model.generate(**batch, **gen)
    assert {s.batch_row for s in handle.last_selection} == set(range(len(rows) - 1))
    assert torch.equal(together.sequences[-1, -NEW_TOKENS:], expected.sequences[0, -NEW_TOKENS:])
    for a, b in zip(together.logits, expected.logits):
        torch.testing.assert_close(a[-1], b[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_hand_written_decode_loop_needs_no_use_cache_flag(tiny):
    """A prefill without ``use_cache`` gives a cache as the model's config says (several base
    models pass ``use_cache=None`` on); the hooks must prune it as with ``use_cache=True``, or the
    decode steps would run on a pruned cache with the unpruned positions and mask."""
    inputs = tiny.make_inputs(tiny.batch)

    def loop(**flag):
        out = tiny.model(**inputs, **flag)
        mask, token, logits = inputs["attention_mask"], out.logits[:, -1:].argmax(-1), []
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = tiny.model(input_ids=token, attention_mask=mask, use_cache=True,
                             **cache_kwargs(tiny.model, kv_cache(out)))
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    try:
        same_unpatched = torch.equal(loop(), loop(use_cache=True))
    except Exception as exc:  # noqa: BLE001 - e.g. M-RoPE models need generate()'s bookkeeping
        pytest.skip(f"the unpatched model runs no hand-written decode loop: {type(exc).__name__}")
    if not same_unpatched:  # transformers 4.57's Gemma3 returns no cache from a prefill without the flag
        pytest.skip("the unpatched model's loop depends on the flag itself")
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        explicit = loop(use_cache=True)
        assert handle.last_selection
        assert torch.equal(loop(), explicit)


@torch.no_grad()
def test_a_pruned_cache_is_freed_by_reference_counting(tiny):
    """The hooks hold a cache they pruned weakly (its reset and crop report to them): dropping
    the output frees it at once, as unpatched, not at the next garbage-collector pass (on a GPU,
    KV-cache memory held until then)."""
    import gc
    import weakref

    inputs = tiny.make_inputs(tiny.single)
    text = dict(input_ids=inputs["input_ids"][:, -3:], attention_mask=inputs["attention_mask"][:, -3:])
    gc.disable()
    try:
        with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
            out = tiny.model(**inputs, use_cache=True)
            assert handle.last_selection
            cache = weakref.ref(kv_cache(out))
            del out
            assert cache() is None

        # Nor does a generation's last step keep it (its arguments held the cache), pruned or
        # text-only, dynamic or static (transformers 4.x keeps a static cache on the model to reuse
        # it, unpatched as well).
        def kept(prompt, **gen):
            out = tiny.model.generate(**prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **gen)
            cache = weakref.ref(kv_cache(out))
            del out
            return cache() is not None

        cases = [(inputs, {}), (text, {})] + [(inputs, dict(cache_implementation="static"))] * tiny.static_generate
        unpatched = [kept(prompt, **gen) for prompt, gen in cases]
        assert unpatched[:2] == [False, False]
        with zspa_kernels.prune(tiny.model, keep=KEEP):
            assert [kept(prompt, **gen) for prompt, gen in cases] == unpatched
    finally:
        gc.enable()


def _drafts_need_a_newer_transformers() -> bool:
    """transformers before 5.14 crops assisted decoding's rejected drafts to an unpruned length: refused."""
    return release("transformers") < CROPS_BY_COUNT


def _wrong(tokens: torch.Tensor) -> torch.Tensor:
    """A text id other than each of ``tokens``: a draft the model rejects."""
    return tokens % 89 + 1


def _drafting_cache(model):
    """An empty cache as assisted decoding makes it: recording what its sliding-window and linear-attention
    layers would drop, so that a crop can take drafts back (transformers 5's activate_past_recording)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording(recurrent_states_to_keep=4)
    return cache


@pytest.mark.parametrize("with_mask", [True, False])
@torch.no_grad()
def test_drafts_on_a_pruned_cache_are_verified_and_cropped_by_count(tiny, with_mask):
    """Assisted and prompt-lookup decoding, by hand, as transformers 5 runs them: the prompt prefilled with the
    first drafts (``logits_to_keep`` = drafts + 1; a model that takes none is prefilled alone), then several
    new tokens alone at a step, each time the rejected draft cropped by count (``cache.crop(-1)``), with or
    without the conversation's mask (5.24+ passes none for an unpadded row). Pruned, every verified
    position's logits equal the plain pruned generation's, and the drafts are no question: the selection is
    the plain generation's. At keep-all, the unpatched model's replay bit for bit. Before 5.14, whose crop
    counts the unpruned length, new tokens alone on a pruned cache are refused, naming the release."""
    inputs = tiny.make_inputs(tiny.single)
    L = inputs["input_ids"].shape[1]
    scores = "logits_to_keep" in inspect.signature(tiny.model.forward).parameters
    family = find_family(tiny.model)

    def masked(width):  # the conversation's mask, as wide as the tokens it counts
        return dict(attention_mask=torch.nn.functional.pad(inputs["attention_mask"], (0, width - L), value=1)
                    if with_mask else None)

    def step(ids, cache, width):
        return tiny.model(input_ids=ids, **cache_kwargs(tiny.model, cache), use_cache=True, **masked(width))

    def replay(t):
        """The logits of the positions that verify ``t`` (the generation's first 6 tokens), one (B, V) each."""
        if scores:  # the prompt and the first drafts: t1 t2 right, then a wrong one
            first = {**inputs, **next_turn(inputs, inputs["input_ids"], torch.cat([t[:, :2], _wrong(t[:, 2:3])], 1))}
            if family.typed_answers:  # PaliGemma: generated text is suffix, attended causally (the prompt is not)
                first[family.token_types_arg][:, L:] = 1
            out = tiny.model(**first, **cache_kwargs(tiny.model, _drafting_cache(tiny.model)), logits_to_keep=4,
                             use_cache=True)
            logits, cache = [out.logits[:, i] for i in range(3)], kv_cache(out)
            cache.crop(-1)
        else:
            out = tiny.model(**inputs, **cache_kwargs(tiny.model, _drafting_cache(tiny.model)), use_cache=True)
            logits, cache = [out.logits[:, -1]], kv_cache(out)
            out = step(t[:, :2], cache, L + 2)
            logits += [out.logits[:, 0], out.logits[:, 1]]
        out = step(torch.cat([t[:, 2:4], _wrong(t[:, 4:5])], 1), cache, L + 5)  # t3 t4 right, then a wrong one
        logits += [out.logits[:, 0], out.logits[:, 1]]
        cache.crop(-1)
        out = step(t[:, 4:5], cache, L + 5)
        assert int(cache.get_seq_length()) == int(kv_cache(out).get_seq_length())
        return logits + [out.logits[:, -1]]

    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if _drafts_need_a_newer_transformers():
        with zspa_kernels.prune(tiny.model, keep=KEEP):
            out = tiny.model.generate(**inputs, **gen)
            cache = kv_cache(out)
            length = cache.get_seq_length()
            with pytest.raises(RuntimeError, match=r"(?s)need transformers 5\.14.*prompt_lookup_num_tokens"):
                last = out.sequences[:, -1:]  # the 6th token (not in the cache yet), and a draft
                step(torch.cat([last, _wrong(last)], 1), cache, L + 7)
            assert cache.get_seq_length() == length
        return
    t = tiny.model.generate(**inputs, **gen).sequences[:, L:]
    try:
        unpatched, failed = replay(t), None
    except Exception as exc:  # noqa: BLE001 - the unpatched model's own limits: M-RoPE models number new tokens
        failed = exc  # by the whole mask without the positions generate() passes; a cache built otherwise
    if failed is None:
        with zspa_kernels.prune(tiny.model, keep=1.0):
            assert all(torch.equal(a, b) for a, b in zip(replay(t), unpatched))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        plain = tiny.model.generate(**inputs, **gen)
        orders = [s.order for s in handle.last_selection]
        if not with_mask and L - handle.last_kept_positions.shape[1] < 3:
            pytest.skip("three tokens alone without a mask read as a turn where fewer tokens were dropped")
        try:
            verified = replay(plain.sequences[:, L:])
        except Exception as exc:
            if failed is not None and type(exc) is type(failed) and str(exc) == str(failed):
                pytest.skip(f"the unpatched model's cache takes no drafts back so: {type(exc).__name__}: {exc}")
            raise
        picked = [s.order for s in handle.last_selection]
    assert len(picked) == len(orders) and all(torch.equal(a, b) for a, b in zip(picked, orders))
    for got, expected in zip(verified, plain.logits):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_crop_into_the_pruned_prompt_or_an_extension_is_refused():
    """A crop may take back what was appended since the prefill and the drafts prefilled with it; cut into the
    pruned prompt, or extended outside the hooks, the cache no longer holds the layout they know: refused."""
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        out = tiny.model(**inputs, use_cache=True)
        cache = kv_cache(out)
        step = out.logits[:, -1:].argmax(-1)
        out = tiny.model(input_ids=step, **cache_kwargs(tiny.model, cache), use_cache=True)
        cropped = copy.deepcopy(cache)
        cropped.crop(-2)
        with pytest.raises(RuntimeError, match="cropped into its prompt"):
            tiny.model(input_ids=step, **cache_kwargs(tiny.model, cropped), use_cache=True)
        extended = copy.deepcopy(cache)
        layer = extended.layers[0]
        layer.keys, layer.values = (torch.cat([t, t[..., -1:, :]], -2) for t in (layer.keys, layer.values))
        with pytest.raises(RuntimeError, match="extended outside it"):
            tiny.model(input_ids=step, **cache_kwargs(tiny.model, extended), use_cache=True)
        cache.crop(-1)  # back to the prompt: decodes as after the prefill
        again = tiny.model(input_ids=step, **cache_kwargs(tiny.model, cache), use_cache=True)
        torch.testing.assert_close(again.logits, out.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_what_follows_a_long_qwen_video_is_numbered_as_the_model_numbers_it(name):
    """transformers 5.x numbers the text after a Qwen2-VL or Qwen2.5-VL video on from the video's height and
    width, while the frames' temporal positions step by one (Qwen2.5-VL: tokens_per_second ·
    second_per_grid_ts): here, 8 frames of 2 x 2 merged patches, they run past the text after them. What follows the prompt is then numbered two ways, and the hooks keep each (dropped
    tokens count): generate() continues one past the last token's positions (decode steps, drafts); the
    model numbers a conversation's next turn, and a token given no positions, one past the prompt's largest
    M-RoPE position on every M-RoPE row (its rope_deltas). At keep-all a turn and prompt-lookup decoding are
    the unpatched model's bit for bit; pruned, the turn is numbered as the unpatched one, prompt-lookup
    decoding generates as greedy decoding, and hand-written steps without positions (one token or several)
    are numbered by the model's rope_deltas. (The hooks had continued each M-RoPE row from its own largest
    kept position.)"""
    tiny = BUILDERS[name]()
    model = tiny.model
    inputs = tiny.make_inputs([[("text", 3), ("video", (8, 4, 4)), ("text", 3)]])
    if name == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([2.0])
    L = inputs["input_ids"].shape[1]
    with capture_lm_calls(model) as calls:
        model(**inputs)
    rope_next = L + int(model.model.rope_deltas)  # the model's own number for the token after the prompt
    mrope = calls[0]["position_ids"][-3:, 0]
    if rope_next == int(mrope[:, -1].max()) + 1:
        pytest.skip("this transformers numbers the text after a video past the video's positions")
    g = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)

    def conversation():
        with capture_lm_calls(model) as calls:
            first = model.generate(**inputs, **g)
            turn = next_turn(inputs, first.sequences, first.sequences[:, -3:])
            second = model.generate(**turn, **cache_kwargs(model, kv_cache(first)), **g)
        return first, second, calls[g["max_new_tokens"]]["position_ids"]  # the turn's prefill

    def same(a, b):
        return torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))

    *unpatched, unpatched_turn = conversation()
    unpatched_lookup = model.generate(**inputs, prompt_lookup_num_tokens=2, **g)
    with zspa_kernels.prune(model, keep=1.0):
        *kept_all, _ = conversation()
        assert same(model.generate(**inputs, prompt_lookup_num_tokens=2, **g), unpatched_lookup)
    assert all(same(a, b) for a, b in zip(kept_all, unpatched))
    with zspa_kernels.prune(model, keep=4):
        *_, pruned_turn = conversation()
        greedy = model.generate(**inputs, **g)
        lookup = model.generate(**inputs, prompt_lookup_num_tokens=2, **g)
        with capture_lm_calls(model) as calls:  # hand-written steps given no positions: 1 token, 2, then 1
            out = model(**inputs, use_cache=True)
            token, mask = out.logits[:, -1:].argmax(-1), inputs["attention_mask"]
            for q in (1, 2, 1):
                mask = torch.nn.functional.pad(mask, (0, q), value=1)
                model(input_ids=token.repeat(1, q), attention_mask=mask, **cache_kwargs(model, kv_cache(out)))
    assert torch.equal(pruned_turn[-3:], unpatched_turn[-1:].expand(3, -1, -1))
    assert torch.equal(greedy.sequences, lookup.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(greedy.logits, lookup.logits)) < ATOL
    steps = [call["position_ids"][-3:, 0] for call in calls[1:]]
    assert [step.tolist() for step in steps] == [[[rope_next + t for t in ts]] * 3 for ts in ([0], [1, 2], [3])]


@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant_model", "pruned_assistant"])
@torch.no_grad()
def test_assisted_decoding_on_a_pruned_cache_generates_as_greedy_decoding(tiny, drafts):
    """generate() with drafts on a pruned model: prompt lookup's (where none is found, it is greedy decoding),
    or an assistant model's (a copy of the unpruned model: its drafts are the unpruned model's greedy tokens,
    some rejected, every round), pruned too or not. The same tokens as greedy decoding, and logits as close to
    greedy decoding's as the unpatched model's are (exactly, but where linear-attention layers verify drafts
    with a chunked kernel and decode with a recurrent one). At keep-all, the unpatched model's assisted
    decoding bit for bit. Drafts passed without a mask are at most as many as the tokens pruning dropped (more
    read as a conversation's turn). Before transformers 5.14 a pruned cache's drafts are refused, saying so.
    transformers 5 gives an assistant the prompt's ids without its images: a pruned assistant then selects
    nothing and drafts as the unpruned one, to the bit."""
    if drafts == "prompt_lookup" and not tiny.prompt_lookup:
        pytest.skip("the unpatched model's prompt-lookup decoding fails on some drafts")
    inputs = tiny.make_inputs(tiny.single)
    L = inputs["input_ids"].shape[1]
    # An eos id (the last of the vocabulary): transformers 4.57's lookup filters drafts by it.
    greedy = dict(max_new_tokens=8, do_sample=False, eos_token_id=tiny.model.config.get_text_config().vocab_size - 1,
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        plain = tiny.model.generate(**inputs, **greedy)
        dropped = L - handle.last_kept_positions.shape[1]
    if dropped < 2:
        pytest.skip("pruning dropped too few tokens of this prompt for drafts without a mask")
    n = min(3, dropped - 1)
    gen = dict(greedy, **(dict(prompt_lookup_num_tokens=n) if drafts == "prompt_lookup" else dict(
        assistant_model=copy.deepcopy(tiny.model), num_assistant_tokens=n, num_assistant_tokens_schedule="constant")))

    def assistant_pruned(keep):  # the assistant pruned as the model is, where the case says so
        if drafts != "pruned_assistant":
            return contextlib.nullcontext()
        return zspa_kernels.prune(gen["assistant_model"], keep=keep)

    try:
        unpatched = tiny.model.generate(**inputs, **gen)
    except Exception as exc:  # noqa: BLE001 - the unpatched model's own limits
        pytest.skip(f"the unpatched model runs no {drafts} decoding here: {type(exc).__name__}")
    unpatched_greedy = tiny.model.generate(**inputs, **greedy)
    gap = max(float((a - b).abs().max()) for a, b in zip(unpatched.logits, unpatched_greedy.logits))
    with zspa_kernels.prune(tiny.model, keep=1.0), assistant_pruned(1.0):
        kept_all = tiny.model.generate(**inputs, **gen)
    assert torch.equal(kept_all.sequences, unpatched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(kept_all.logits, unpatched.logits))
    with zspa_kernels.prune(tiny.model, keep=KEEP), assistant_pruned(KEEP) as assistant:
        try:
            drafted = tiny.model.generate(**inputs, **gen)
        except RuntimeError as exc:
            if _drafts_need_a_newer_transformers():
                assert re.search("(?s)pruned.*prompt-lookup", str(exc)), exc
                return
            # A model that takes no logits_to_keep: its first drafts, prefilled with the prompt, cannot be told
            # from it, and one rejected is refused.
            assert "logits_to_keep" not in inspect.signature(tiny.model.forward).parameters, exc
            assert re.search("(?s)cropped into its prompt.*takes no logits_to_keep", str(exc)), exc
            return
    if "logits_to_keep" not in inspect.signature(tiny.model.forward).parameters:
        return  # its first drafts counted as question: the picks may be others than greedy decoding's (README)
    if find_family(tiny.model).typed_answers:
        return  # PaliGemma: generate() types the first drafts as prefix, attended both ways, unpatched too
    assert torch.equal(drafted.sequences, plain.sequences)
    for a, b in zip(drafted.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=max(ATOL, 4 * gap), rtol=0)
    if assistant is not None and not assistant.last_selection:  # the assistant was given no images
        with zspa_kernels.prune(tiny.model, keep=KEEP):
            unpruned = tiny.model.generate(**inputs, **dict(gen, assistant_model=copy.deepcopy(tiny.model)))
        assert torch.equal(drafted.sequences, unpruned.sequences)
        assert all(torch.equal(a, b) for a, b in zip(drafted.logits, unpruned.logits))


@pytest.mark.parametrize("rows", ["batch", "single"])
@torch.no_grad()
def test_a_conversation_continues_on_its_pruned_cache(tiny, rows):
    """A conversation's next turns on its cache: generate() given the whole conversation (prompt, answer,
    new text) and the last turn's cache, without pixel inputs, as the unpatched model takes it, twice; by
    hand, on a deep copy of the first turn's cache, the conversation from the cache's length on. On a
    pruned cache, each turn's logits equal one no-cache forward over the pruned prompt and everything
    after it, at the unpruned model's positions; at keep-all, the unpatched continuation's bit for bit. A
    single row has no padding: transformers 5.24+'s generate() then passes no mask, and the hooks tell the
    repeated tokens from the new ones by their ids (the third turn's include the second's). Without a
    mask, more tokens than were dropped whose ids do not repeat them, and pixel inputs, are refused, the
    cache left as it was (new tokens alone: test_drafts_on_a_pruned_cache_are_verified_and_cropped_by_count)."""
    inputs = tiny.make_inputs(getattr(tiny, rows))
    B, L = inputs["input_ids"].shape
    gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
               return_dict_in_generate=True)

    def conversation(copies=None):
        """The first turn's output, then (turn, output) twice: each turn's new text is the last answer's tokens."""
        first = tiny.model.generate(**inputs, **gen)
        if copies is not None:
            copies.append(copy.deepcopy(kv_cache(first)))
        turns, out = [], first
        for _ in range(2):
            turn = next_turn(inputs, out.sequences, out.sequences[:, -NEW_TOKENS:])
            out = tiny.model.generate(**turn, **cache_kwargs(tiny.model, kv_cache(out)), **gen)
            turns.append((turn, out))
        return first, turns

    try:
        unpatched = conversation()
    except Exception as exc:  # noqa: BLE001 - the unpatched model's own limits
        pytest.skip(f"the unpatched model continues no conversation on its cache: {type(exc).__name__}: {exc}")
    with zspa_kernels.prune(tiny.model, keep=1.0):
        kept_all = conversation()
    for (_, got), (_, expected) in zip(kept_all[1], unpatched[1]):
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.logits, expected.logits):
            assert torch.equal(a, b)

    positions = unpruned_decode_positions(tiny.model, inputs, 5 * NEW_TOKENS, do_sample=False,
                                          min_new_tokens=5 * NEW_TOKENS)
    copies = []
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        first, turns = conversation(copies)
        (turn, second), (_, third) = turns
        assert handle.last_selection
        # By hand, on a deep copy of the first turn's cache: the conversation from the cache's length on.
        copied = copies[0]
        given = copied.get_seq_length()
        by_hand = tiny.model(**{k: v if k == "attention_mask" else v[:, given:] for k, v in turn.items()},
                             **cache_kwargs(tiny.model, copied), use_cache=True).logits[:, -1]
        cache = kv_cache(third)
        # Without a mask, more new tokens than the dropped ones that a turn repeats read as a turn, told by their
        # ids (an id the conversation never holds: not those tokens); pixel inputs: refused before the cache is
        # touched. (Fewer, or with the conversation's mask, are new tokens alone: assisted decoding's drafts.)
        length = cache.get_seq_length()
        dropped = L - calls[0]["inputs_embeds"].shape[1]
        unseen = next(i for i in range(tiny.model.config.get_text_config().vocab_size)
                      if not bool((third.sequences == i).any()))
        with pytest.raises(RuntimeError, match="do not read as a.*conversation's next turn"):
            tiny.model(input_ids=torch.full((B, dropped + 1), unseen), **cache_kwargs(tiny.model, cache), use_cache=True)
        with pytest.raises(RuntimeError, match="no pixel inputs"):
            tiny.model(**dict(inputs, **turn), **cache_kwargs(tiny.model, cache), use_cache=True)
        assert cache.get_seq_length() == length
    tokens = third.sequences[:, L:]  # answer, text, answer, text, answer
    ref = no_cache_logits(tiny.model, calls[0], positions, tokens, list(range(B)),
                          image_features_of(tiny.model, inputs))
    for n, out in ((2, second), (4, third)):
        start = calls[0]["inputs_embeds"].shape[1] - 1 + n * NEW_TOKENS
        for t, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, ref[:, start + t], atol=ATOL, rtol=0)
        assert torch.equal(tokens[:, n * NEW_TOKENS:(n + 1) * NEW_TOKENS], ref[:, start:start + NEW_TOKENS].argmax(-1))
    torch.testing.assert_close(by_hand, ref[:, calls[0]["inputs_embeds"].shape[1] - 1 + 2 * NEW_TOKENS], atol=ATOL,
                               rtol=0)


@torch.no_grad()
def test_a_turn_that_brings_images_on_a_pruned_cache_is_refused(tiny):
    """A conversation's next turn that asks the prompt again, its images with it: generate() given the whole
    conversation, the images' inputs and the first turn's cache. Where the unpatched model merges the images at
    the new placeholders (its logits differ from those of the same ids without image inputs, or it fails without
    them), the pruned model would run them unpruned, unsaid: refused, the cache left as it was, whichever way
    they come (pixels up to transformers 5.17; 5.24+ encodes them ahead of the call and passes no pixel input;
    Phi-4-multimodal's pixels come at every step, under a name of their own). Where generate() gives the turn
    no images (transformers 4.57 drops them on a cache), the model reads the placeholders as text, and the
    pruned one runs the turn so, selecting nothing; at keep-all, as the unpatched model, bit for bit."""
    inputs = tiny.make_inputs(tiny.single)
    L = inputs["input_ids"].shape[1]
    gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
               return_dict_in_generate=True)

    def turn_of(out, images=True):
        """The conversation (prompt, answer) and the prompt again: per-token inputs follow the ids."""
        ids = torch.cat([out.sequences, inputs["input_ids"]], 1)
        turn = dict(inputs if images else {}, input_ids=ids, attention_mask=torch.ones_like(ids))
        for name, value in inputs.items():
            if name not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor) \
                    and value.shape == inputs["input_ids"].shape:
                turn[name] = torch.cat([torch.nn.functional.pad(value, (0, NEW_TOKENS)), value], 1)
        return turn

    def second_turn(images=True):
        out = tiny.model.generate(**inputs, **gen)
        return tiny.model.generate(**turn_of(out, images), **cache_kwargs(tiny.model, kv_cache(out)), **gen)

    try:
        unpatched = second_turn()
    except Exception as exc:  # noqa: BLE001 - the unpatched model's own limits
        pytest.skip(f"the unpatched model continues no conversation with images on its cache: "
                    f"{type(exc).__name__}: {exc}")
    try:
        as_text = second_turn(images=False)
        merges = not all(torch.equal(a, b) for a, b in zip(unpatched.logits, as_text.logits))
    except Exception:  # noqa: BLE001 - it needs the image inputs for the placeholders
        merges = True
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model.generate(**inputs, **gen)
        assert handle.last_selection
        cache = kv_cache(out)
        length = cache.get_seq_length()
        assert length < L + NEW_TOKENS - 1
        handle.last_selection = []
        if merges:
            with pytest.raises(RuntimeError, match="would run new images unpruned"):
                tiny.model.generate(**turn_of(out), **cache_kwargs(tiny.model, cache), **gen)
            assert cache.get_seq_length() == length
        else:
            tiny.model.generate(**turn_of(out), **cache_kwargs(tiny.model, cache), **gen)
            assert handle.last_selection == []
    if not merges:
        with zspa_kernels.prune(tiny.model, keep=1.0):
            kept_all = second_turn()
        assert torch.equal(kept_all.sequences, unpatched.sequences)
        assert all(torch.equal(a, b) for a, b in zip(kept_all.logits, unpatched.logits))


@pytest.mark.parametrize("chunk", ["one token", "eight tokens", "the whole prompt"])
@torch.no_grad()
def test_a_chunked_prefill_is_refused_clearly(tiny, chunk):
    """``generate(prefill_chunk_size=...)`` (transformers 5.24+) feeds the prompt in parts, each with the
    features of the image placeholders it holds, all images' rows merged into one. A part pruned alone
    would rank by part of the question and could take several images for one, even where the whole prompt
    is one part (LLaVA's adjacent images; a tile budget over all tiles): refused, naming the argument,
    before the base model runs; a part without images ran unpruned, and images then arriving on its cache
    are refused too. The handle is left as it was: the next generate() is pruned as without the refusal."""
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.57's chunked prefill hands the first chunk every image's pixels (README)")
    inputs = tiny.make_inputs(tiny.batch)
    size = {"one token": 1, "eight tokens": 8, "the whole prompt": inputs["input_ids"].shape[1]}[chunk]
    gen = dict(max_new_tokens=2, do_sample=False)
    base = split_model(tiny.model, find_family(tiny.model))[0]
    fed = []
    hook = base.register_forward_pre_hook(lambda module, args, kwargs: fed.append(
        any(v is not None for v in (kwargs.get("mm_encoder_outputs") or {}).values())), with_kwargs=True)
    try:
        tiny.model.generate(**inputs, prefill_chunk_size=size, **gen)
    except Exception as exc:  # noqa: BLE001 - raw pixel inputs, which transformers does not chunk; 4.57
        pytest.skip(f"the unpatched model's chunked prefill fails: {exc}")
    finally:
        hook.remove()
    if not any(fed):  # GLM-4V's videos: placeholders of the image id, looked for under the video id
        pytest.skip("the unpatched model's chunked prefill merges no features (it finds no placeholders)")
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        expected = tiny.model.generate(**inputs, **gen)
        with pytest.raises(RuntimeError, match=re.escape("Pass prefill_chunk_size=None")):
            tiny.model.generate(**inputs, prefill_chunk_size=size, **gen)
        handle.last_selection = []
        assert torch.equal(tiny.model.generate(**inputs, **gen), expected) and handle.last_selection


def _refuses_a_prompt_after_a_cache(tiny, cache, mask) -> bool:
    """Where the hooks refuse a prompt with images after a cache they did not prefill (handle.py's
    ``_offset_refusal``): a family whose pruned prefill builds its own masks, a cache with linear-attention
    layers (their state is no sequence of tokens), or a language model handed another mask than a 2-D one
    over the cached and the new tokens (``mask``: what the unpatched model hands it)."""
    layers = getattr(cache, "layers", [])
    sequences = (transformers.cache_utils.CacheLayerMixin, getattr(transformers.cache_utils, "DummyLayer", ()))
    linear = not all(isinstance(layer, sequences) for layer in layers)
    other_mask = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
    return linear or other_mask and find_family(tiny.model).build_mask is None


@contextlib.contextmanager
def _stateless(model):
    """Yields ``fresh()``, which puts ``model`` as it was loaded before each call: the models that keep their
    M-RoPE offsets (``rope_deltas``) from one call to the next, and number a prompt on a non-empty cache by
    them (Qwen's, HunYuan-VL's generate()), would otherwise number a run by the one before it (another test's
    too: the fixture's model is shared). What the model held before is put back after."""
    saved = [(m, m.rope_deltas) for m in model.modules() if hasattr(m, "rope_deltas")]

    def fresh():
        for m, _ in saved:
            m.rope_deltas = None

    try:
        yield fresh
    finally:
        for m, value in saved:
            m.rope_deltas = value


@torch.no_grad()
def test_images_after_a_cached_prefix_are_pruned_after_it(tiny):
    """Prompt caching, as transformers documents it: the text before the images prefilled once, a copy of its
    cache given to generate() with the whole prompt (5.24+ hands the model the images encoded, no pixels); or
    by hand, the prompt from the cache's length on with its pixels (a conversation whose first turn brought no
    image). The hooks prune the new tokens after the cached ones: at keep-all the unpatched model's logits bit
    for bit; pruned, every logit equal to one no-cache forward of the language model over the prefix as the
    unpatched model ran it, then the kept tokens (and the generated ones) at the positions the model gave
    them (with the family's own per-position inputs: deepstack features, per-layer inputs, token types, after
    the prefix's; Gemma 3 and 4's and Molmo2's image blocks attended both ways behind it). Where the unpatched
    model's run after the prefix is not the whole prompt's (transformers 5.24+'s Gemma 3 and Molmo2), keep-all
    gives the whole prompt's; where it fails by hand (4.57's Gemma 3), the hooks fail the same or give the whole
    prompt's. Refused, naming why and leaving the cache as it was, where the cache has linear-attention layers
    or the language model gets a prebuilt mask the hooks do not build again."""
    inputs = tiny.make_inputs(tiny.batch)
    ids = inputs["input_ids"]
    B, L = ids.shape
    family = find_family(tiny.model)
    visual = torch.isin(ids, torch.tensor(family.visual_token_ids(tiny.model.config)))
    types = inputs.get(family.token_types_arg) if family.build_mask is not None else None
    if isinstance(types, torch.Tensor) and types.shape == ids.shape:
        visual |= types == 1  # the tokens a block attended both ways begins with (Molmo2's image markers)
    first = int(visual.int().argmax(1).min())  # every row's tokens before it are text
    if first == 0:
        pytest.skip("a row begins with its image: no text before it to cache")
    per_token = {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape[-2:] == (B, L)}
    gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
               return_dict_in_generate=True)

    def generate(cache):
        return tiny.model.generate(**inputs, **cache_kwargs(tiny.model, copy.deepcopy(cache)), **gen)

    def by_hand(cache):
        """The prompt from the cache's length on, its pixels with it: the last position's logits."""
        given = {k: v[..., first:] if k in per_token and k != "attention_mask" else v for k, v in inputs.items()}
        return tiny.model(**given, **cache_kwargs(tiny.model, cache), use_cache=True).logits[:, -1]

    def run_way(way):
        return by_hand(copy.deepcopy(cached)) if way == "by hand" else generate(cached)

    with _stateless(tiny.model) as fresh:
        fresh()
        cached = transformers.DynamicCache(config=tiny.model.config.get_text_config())
        with capture_lm_calls(tiny.model) as prefix_calls:
            tiny.model(**{k: inputs[k][..., :first] for k in per_token}, **cache_kwargs(tiny.model, cached),
                       use_cache=True)
        unpatched, failures = {}, []  # each way the unpatched model takes such a prompt: its output
        for way in ("by hand", "generate"):
            fresh()
            try:
                with capture_lm_calls(tiny.model) as calls:
                    unpatched[way] = (run_way(way), calls[0]["attention_mask"])
            except Exception as exc:  # noqa: BLE001 - the unpatched model's own limits
                failures.append(f"{way}: {type(exc).__name__}: {exc}")
        if not unpatched:
            pytest.skip(f"the unpatched model takes no prompt after a cached prefix: {failures}")

        if _refuses_a_prompt_after_a_cache(tiny, cached, next(iter(unpatched.values()))[1]):
            with zspa_kernels.prune(tiny.model, keep=KEEP):
                for way in unpatched:
                    copied = copy.deepcopy(cached)
                    fresh()
                    if way == "generate" and transformers.__version__.startswith("4.") and "pixel_values" in inputs:
                        # 4.57's generate() gives the prompt no pixel_values on a cache: text to the model and the
                        # hooks (Phi-4-multimodal's image_pixel_values come at every step: refused)
                        assert torch.equal(generate(cached).sequences, unpatched[way][0].sequences)
                        continue
                    with pytest.raises(RuntimeError, match="images arrive on a KV cache that already holds.*, and "):
                        if way == "by hand":
                            by_hand(copied)
                        else:
                            tiny.model.generate(**inputs, **cache_kwargs(tiny.model, copied), **gen)
                    assert copied.get_seq_length() == first
            return
        # What a cached prefix must not change: the unpatched model's run of the whole prompt without the cache.
        fresh()
        whole = {"by hand": tiny.model(**inputs).logits[:, -1]}
        if "generate" in unpatched:
            fresh()
            whole["generate"] = tiny.model.generate(**inputs, **gen)

        def same(a, b, way, close):
            equal = (lambda x, y: torch.allclose(x, y, atol=ATOL, rtol=0)) if close else torch.equal
            if way == "by hand":
                return equal(a, b)
            return torch.equal(a.sequences, b.sequences) and all(map(equal, a.logits, b.logits))

        with zspa_kernels.prune(tiny.model, keep=1.0):
            for way, (expected, _) in unpatched.items():
                fresh()
                got = run_way(way)
                # The unpatched model's own run after the prefix, bit for bit; or, where that is not the whole
                # prompt's run, the whole prompt's (transformers 5.x's Gemma 3 reads the image blocks of a prompt
                # after a cached prefix at the prompt's own slots, from 0: the hooks place them after the prefix).
                assert same(got, expected, way, close=False) or (
                    not same(expected, whole[way], way, close=True) and same(got, whole[way], way, close=True))
            if "by hand" not in unpatched:
                # The unpatched model fails by hand: pruned, the same failure, or the whole prompt's run (transformers
                # 4.57's Gemma 3 looks its prompt's token types up by cache slot, out of bounds; the hooks pass them
                # behind the prefix's).
                fresh()
                try:
                    got = by_hand(copy.deepcopy(cached))
                except Exception as exc:  # noqa: BLE001 - compared with the unpatched model's failure
                    assert f"by hand: {type(exc).__name__}: {exc}" in failures
                else:
                    assert same(got, whole["by hand"], "by hand", close=True)

        pruned = {}
        with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
            for way in unpatched:
                fresh()
                with capture_lm_calls(tiny.model) as calls:
                    pruned[way] = (run_way(way), calls)
                assert handle.last_selection or way == "generate" and transformers.__version__.startswith("4.")

    features = image_features_of(tiny.model, inputs)

    def reference(prompt, decode_positions=(), tokens=ids[:, :1]):
        """One no-cache forward over the prefix, ``prompt``'s tokens (the language model's arguments of a pruned
        prompt), then ``tokens`` but the last, at ``decode_positions``."""
        assert prompt["inputs_embeds"].shape[1] < L - first  # pruned, after the prefix
        positions, prefix_positions = prompt["position_ids"], prefix_calls[0]["position_ids"]
        if prefix_positions is None:
            prefix_positions = torch.arange(first)[None]
        if positions.dim() == 3 and prefix_positions.dim() == 3 and len(positions) > len(prefix_positions):
            # Qwen2.5-Omni's thinker numbers a prompt with images by 4 rows (the text's, then M-RoPE's), a text
            # prompt by M-RoPE's 3: the prefix is text, whose every row is its text row.
            prefix_positions = torch.cat([prefix_positions[:1], prefix_positions])
        prefill = dict(inputs_embeds=torch.cat([prefix_calls[0]["inputs_embeds"], prompt["inputs_embeds"]], 1),
                       attention_mask=prompt["attention_mask"],
                       position_ids=torch.cat([prefix_positions.expand(*positions.shape[:-1], first), positions], -1))
        if prefill["attention_mask"] is None:
            prefill["attention_mask"] = torch.ones(B, prefill["inputs_embeds"].shape[1], dtype=torch.long)
        # The language model's per-position inputs of the prompt (a family's on_prefill keeps the kept tokens'),
        # after the prefix's: text there (no deepstack feature, the prefix's own per-layer inputs and types).
        if prompt.get("visual_pos_masks") is not None:  # Qwen3-VL's deepstack features: none in the text
            visual = prompt["visual_pos_masks"]
            pad = (0, 0) * (visual.dim() - 2) + (first, 0)
            prefill["visual_pos_masks"] = torch.nn.functional.pad(visual, pad)
            prefill["deepstack_visual_embeds"] = prompt["deepstack_visual_embeds"]
        if prompt.get("vision_mask") is not None:  # Granite 4 Vision's features, added inside the language model
            prefill["vision_mask"] = torch.nn.functional.pad(prompt["vision_mask"], (0, 0, first, 0))
            prefill["deepstack_features"] = prompt["deepstack_features"]
        for name in ("moe_mm_token_type_ids", "ple_input_ids", "per_layer_inputs"):
            if prompt.get(name) is not None:
                prefill[name] = torch.cat([prefix_calls[0][name], prompt[name]], 1)
        return no_cache_logits(tiny.model, prefill, list(decode_positions), tokens, list(range(B)), features)

    if "by hand" in pruned:
        logits, (prompt, *_) = pruned["by hand"]
        last = first + prompt["inputs_embeds"].shape[1] - 1
        torch.testing.assert_close(logits, reference(prompt)[:, last], atol=ATOL, rtol=0)
    if "generate" not in pruned:
        return
    out, (prompt, *steps) = pruned["generate"]
    if transformers.__version__.startswith("4."):  # 4.57's generate() gives the model no pixels on a cache
        assert torch.equal(out.sequences, unpatched["generate"][0].sequences)
        return
    last = first + prompt["inputs_embeds"].shape[1] - 1
    assert kv_cache(out).get_seq_length() == last + NEW_TOKENS  # the generated tokens after the kept ones
    tokens = out.sequences[:, L:]
    ref = reference(prompt, [c["position_ids"] if c["position_ids"] is not None else torch.full((1, 1), L + step)
                             for step, c in enumerate(steps)], tokens)
    for t, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[:, last + t], atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref[:, last:].argmax(-1))


def _cached_text_prefix(tiny, inputs) -> tuple:
    """The text before the batch's first image token prefilled on a dynamic cache, unpruned: ``(its length,
    the cache, the language model's arguments of that prefill)``."""
    ids = inputs["input_ids"]
    first = int((ids == tiny.model.config.image_token_id).int().argmax(1).min())
    cache = transformers.DynamicCache(config=tiny.model.config.get_text_config())
    with capture_lm_calls(tiny.model) as calls, torch.no_grad():
        tiny.model(input_ids=ids[:, :first], attention_mask=inputs["attention_mask"][:, :first],
                   **cache_kwargs(tiny.model, cache), use_cache=True)
    return first, cache, calls[0]


def _prefill_after(prefix: dict, prompt: dict, first: int, repeats: int = 1) -> dict:
    """A no-cache reference's prefill of a prompt pruned after a cached prefix (``prefix`` and ``prompt``: the
    language model's arguments of each): the prefix's embeddings, each row ``repeats`` times (beams), then the kept
    tokens', under the pruned cache's mask (ones where 5.24+ passes none), at the positions the model gave them."""
    embeds = torch.cat([prefix["inputs_embeds"].repeat_interleave(repeats, 0), prompt["inputs_embeds"]], 1)
    before = prefix["position_ids"] if prefix["position_ids"] is not None else torch.arange(first)[None]
    before = before.expand(prefix["inputs_embeds"].shape[0], first).repeat_interleave(repeats, 0)
    mask = padding_mask(prompt["attention_mask"], embeds)
    if mask.shape[1] != embeds.shape[1]:  # a mask of the kept tokens alone: no padding in the prefix
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return dict(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.cat([before, prompt["position_ids"]], -1))


@pytest.mark.parametrize("name", ["llava", "gemma3"])
@pytest.mark.parametrize("rows", ["batch", "single"])
@torch.no_grad()
def test_a_conversation_continues_on_a_cache_pruned_after_its_prefix(rows, name):
    """The cache of a prompt pruned after a cached prefix holds the prefix, then the kept tokens: a next turn
    (the whole conversation given to generate() with that cache) continues on it as on any pruned cache: every
    logit of both turns equal to one no-cache forward over the prefix, the kept tokens and everything after
    them, at the unpruned model's positions. A single row has no padding: transformers 5.24+'s generate() then
    passes no mask, and the hooks tell the turn's repeated tokens by their ids, none of which lie in the prefix
    (whose ids the hooks never see). Gemma 3's image blocks attend both ways, behind the prefix."""
    tiny = BUILDERS[name]()
    inputs = tiny.make_inputs(getattr(tiny, rows))
    B, L = inputs["input_ids"].shape
    gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
               return_dict_in_generate=True)
    first, prefix, prefix_call = _cached_text_prefix(tiny, inputs)
    positions = unpruned_decode_positions(tiny.model, inputs, 3 * NEW_TOKENS, do_sample=False,
                                          min_new_tokens=3 * NEW_TOKENS)  # answer, text, answer
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, **cache_kwargs(tiny.model, copy.deepcopy(prefix)), **gen)
        turn = next_turn(inputs, out.sequences, out.sequences[:, -NEW_TOKENS:])
        second = tiny.model.generate(**turn, **cache_kwargs(tiny.model, kv_cache(out)), **gen)
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.57's generate() gives the prompt no pixels on a cache: nothing is pruned")
    assert handle.last_selection
    prefill = _prefill_after(prefix_call, calls[0], first)
    ref = no_cache_logits(tiny.model, prefill, positions, second.sequences[:, L:], list(range(B)),
                          image_features_of(tiny.model, inputs))
    last = prefill["inputs_embeds"].shape[1] - 1
    for n, turn_out in ((0, out), (2, second)):
        for t, logits in enumerate(turn_out.logits):
            torch.testing.assert_close(logits, ref[:, last + n * NEW_TOKENS + t], atol=ATOL, rtol=0)
    assert torch.equal(second.sequences[:, L:], torch.cat([out.sequences[:, L:], turn["input_ids"][:, -NEW_TOKENS:],
                                                           ref[:, last + 2 * NEW_TOKENS:].argmax(-1)], 1))


@torch.no_grad()
def test_beam_search_after_a_cached_prefix_scores_as_a_no_cache_reference():
    """Beam search on a copy of a prefix's cache, expanded to the beams by the caller (generate() expands the
    inputs, not a cache it is given: unpatched, a cache of the batch's rows fails): the beam scores equal a
    no-cache forward over the prefix, the kept tokens (at the positions the hooks gave them, which keep-all
    checks: test_images_after_a_cached_prefix_are_pruned_after_it) and the generated ones (at the unpruned
    model's positions), the beams reordering the cache of the prefix and the kept tokens."""
    tiny = BUILDERS["llava"]()
    inputs, beams = tiny.make_inputs(tiny.beam_batch), 3
    B, L = inputs["input_ids"].shape
    first, prefix, prefix_call = _cached_text_prefix(tiny, inputs)
    prefix.batch_repeat_interleave(beams)
    gen = dict(num_beams=beams, do_sample=False, length_penalty=0.0)
    positions = unpruned_decode_positions(tiny.model, inputs, NEW_TOKENS, **copy.deepcopy(gen))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, **cache_kwargs(tiny.model, prefix), max_new_tokens=NEW_TOKENS,
                                  output_scores=True, return_dict_in_generate=True, **gen)
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.57's generate() gives the prompt no pixels on a cache: nothing is pruned")
    assert handle.last_selection
    assert calls[0]["inputs_embeds"].shape[1] < L - first  # pruned, after the prefix
    prefill = _prefill_after(prefix_call, calls[0], first, beams)
    rows = [b * beams for b in range(B)]  # beams of a row share its prefill
    tokens = out.sequences[:, L:]
    ref = no_cache_logits(tiny.model, prefill, positions, tokens, rows).log_softmax(-1)
    start = prefill["inputs_embeds"].shape[1] - 1
    steps = ref[:, start:start + NEW_TOKENS].gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, steps.sum(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant"])
@torch.no_grad()
def test_assisted_decoding_after_a_cached_prefix_generates_as_greedy_decoding(drafts):
    """Drafts (prompt lookup's, or an unpruned assistant's) verified on a cache pruned after a cached prefix: the
    same tokens as greedy decoding on that prefix, and logits as close to it as the unpatched model's are
    (transformers 5.24+'s assisted decoding on a given prefix cache is off from its greedy decoding by ~0.03 on
    every step's logits, unpatched, which follows the no-cache run exactly; 4.57 to the bit). At keep-all, the
    unpatched model's assisted decoding bit for bit."""
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    _, prefix, _ = _cached_text_prefix(tiny, inputs)
    greedy = dict(max_new_tokens=8, do_sample=False, eos_token_id=tiny.model.config.get_text_config().vocab_size - 1,
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    gen = dict(greedy, **(dict(prompt_lookup_num_tokens=3) if drafts == "prompt_lookup" else dict(
        assistant_model=copy.deepcopy(tiny.model), num_assistant_tokens=3, num_assistant_tokens_schedule="constant")))

    def generate(**kwargs):
        return tiny.model.generate(**inputs, **cache_kwargs(tiny.model, copy.deepcopy(prefix)), **kwargs)

    unpatched, unpatched_greedy = generate(**gen), generate(**greedy)
    if not torch.equal(unpatched.sequences, unpatched_greedy.sequences):  # transformers 5.17's, from the 5th token
        pytest.skip(f"the unpatched model's {drafts} decoding on a given prefix cache generates other tokens than "
                    "its greedy decoding here")
    gap = max(float((a - b).abs().max()) for a, b in zip(unpatched.logits, unpatched_greedy.logits))
    with zspa_kernels.prune(tiny.model, keep=1.0):
        kept_all = generate(**gen)
    assert torch.equal(kept_all.sequences, unpatched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(kept_all.logits, unpatched.logits))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        plain = generate(**greedy)
        drafted = generate(**gen)
    assert handle.last_selection or transformers.__version__.startswith("4.")  # 4.57: no pixels on a cache
    assert torch.equal(drafted.sequences, plain.sequences)
    for a, b in zip(drafted.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=max(ATOL, 2 * gap), rtol=0)


@torch.no_grad()
def test_a_prompt_after_a_cached_prefix_is_refused_on_a_static_cache():
    """A static cache keeps its length on the device: the hooks prune after a dynamic cache only, and say so.
    (One row: transformers 4.57 counts a static cache's length by row 0's nonzero keys, none where its cached
    tokens are all padding.)"""
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    ids, image = inputs["input_ids"], tiny.model.config.image_token_id
    first = int((ids == image).int().argmax(1).min())
    cache = static_cache(tiny.model, ids.shape[0], ids.shape[1] + NEW_TOKENS)
    tiny.model(input_ids=ids[:, :first], attention_mask=inputs["attention_mask"][:, :first],
               **cache_kwargs(tiny.model, cache), use_cache=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        with pytest.raises(RuntimeError, match="images arrive on a KV cache that already holds.*the cache is static"):
            tiny.model(input_ids=ids[:, first:], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"], **cache_kwargs(tiny.model, cache), use_cache=True)


@torch.no_grad()
def test_a_prompt_after_a_cached_prefix_is_refused_where_the_whole_prompt_attends_both_ways():
    """PaliGemma attends its whole prompt (images, then the text before the answer) both ways: text cached ahead
    of it never saw the rest, so no prompt after a cached prefix is one the model was made for. Refused, naming
    why, the cache left as it was."""
    tiny = BUILDERS["paligemma"]()
    inputs = tiny.make_inputs(tiny.single)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prefix = transformers.DynamicCache(config=tiny.model.config.get_text_config())
    tiny.model(input_ids=ids[:, -2:], attention_mask=mask[:, -2:], **cache_kwargs(tiny.model, prefix), use_cache=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        with pytest.raises(RuntimeError, match="images arrive on a KV cache that already holds.*PaliGemma attends its "
                                               "whole prompt"):
            tiny.model(**dict(inputs, attention_mask=torch.cat([mask[:, -2:], mask], 1)),
                       **cache_kwargs(tiny.model, prefix), use_cache=True)
    assert prefix.get_seq_length() == 2


def test_unsupported_model_names_the_supported_families():
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=32)
    with pytest.raises(ValueError, match="LLaVA-1.5.*Qwen2-VL"):
        zspa_kernels.prune(transformers.LlamaForCausalLM(config))


@pytest.mark.parametrize("arg, value", [("keep", 0), ("keep", 1.5), ("keep", "all"), ("keep", True),
                                        ("core_ratio", 1.5), ("relevance", "min"),
                                        ("prompt", "system"), ("backend", "gpu")])
def test_bad_arguments_are_rejected_at_prune_time(arg, value):
    tiny = BUILDERS["llava"]()
    with pytest.raises((ValueError, TypeError), match=f"^{arg}: expected"):
        zspa_kernels.prune(tiny.model, **{arg: value})


def test_a_model_is_pruned_by_one_handle_at_a_time():
    tiny = BUILDERS["llava"]()
    with zspa_kernels.prune(tiny.model):
        with pytest.raises(ValueError, match="already pruned"):
            zspa_kernels.prune(tiny.model)
    zspa_kernels.prune(tiny.model).remove()  # free again once removed


def test_remove_restores_the_unpatched_model():
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    with torch.no_grad():
        expected = tiny.model(**inputs).logits
        handle = zspa_kernels.prune(tiny.model, keep=KEEP)
        assert tiny.model(**inputs).logits.shape[1] < expected.shape[1]
        handle.remove()
        assert torch.equal(tiny.model(**inputs).logits, expected)


@pytest.mark.parametrize("with_mask", [True, False])
@torch.no_grad()
def test_hand_written_decode_loop_matches_generate(tiny, with_mask):
    """A loop that passes neither positions nor (optionally) a mask still decodes at the
    original positions: the hooks supply them for a pruned cache."""
    inputs = tiny.make_inputs(tiny.single)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        expected = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        out = tiny.model(**inputs, use_cache=True)
        tokens, mask = [out.logits[:, -1].argmax(-1, keepdim=True)], inputs["attention_mask"]
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            step = dict(attention_mask=mask) if with_mask else {}
            out = tiny.model(input_ids=tokens[-1], **cache_kwargs(tiny.model, kv_cache(out)),
                             use_cache=True, **step)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, 1), expected[:, -NEW_TOKENS:])



@pytest.mark.parametrize("numbered", [False, True], ids=["no_cache_position", "cache_position"])
@torch.no_grad()
def test_a_hand_written_static_cache_loop_matches_generate(tiny, numbered):
    """A batch (left padding) decoded by hand on a caller's static cache, with or without
    ``cache_position`` (counted as the caller sees the sequence, the original positions, as in
    transformers' static-cache docs). Its decode steps must take their slots from the caller's
    arguments, not from the ``cache_position`` the base model computes for its language model
    from the cache (slots of the pruned layout), nor from a full-attention layer's length, which
    transformers 4.57 counts by non-zero keys of row 0 (Gemma3's padding has zero keys)."""
    inputs = tiny.make_inputs(tiny.batch)
    B, L = inputs["input_ids"].shape
    if numbered and "cache_position" not in inspect.signature(tiny.model.forward).parameters:
        pytest.skip("this transformers' model takes no cache_position")
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")

    def loop():
        cache, mask = static_cache(tiny.model, B, L + NEW_TOKENS), inputs["attention_mask"]
        out = tiny.model(**inputs, **cache_kwargs(tiny.model, cache), use_cache=True,
                         **(dict(cache_position=torch.arange(L)) if numbered else {}))
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = tiny.model(input_ids=tokens[-1], attention_mask=mask, **cache_kwargs(tiny.model, cache),
                             use_cache=True, **(dict(cache_position=torch.tensor([L + i])) if numbered else {}))
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)

    try:
        same_unpatched = torch.equal(loop(), tiny.model.generate(**inputs, **gen)[:, L:])
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the unpatched model runs no hand-written static-cache loop: {type(exc).__name__}")
    if not same_unpatched:
        pytest.skip("the unpatched model's hand-written static-cache loop differs from its generate()")
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        expected = tiny.model.generate(**inputs, **gen)[:, L:]
        got = loop()
        assert handle.last_selection
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_a_deep_copy_of_a_pruned_cache_continues_its_sequence(tiny, kind):
    """``copy.deepcopy`` of a pruned cache (prompt caching, branching a generation) holds the pruned
    layout too: decoded by hand, the copy gives the original's logits bit for bit, and then the
    original still does (the copy's steps do not advance it); where the unpatched model's
    hand-written loop equals its generate() (not Qwen/GLM's), both give the pruned generate()'s
    tokens. A new prompt on the copy is refused as on the original, and so is any use of an
    unpickled copy, whose layout no handle can find, or of a cache once its handle is removed. An
    untracked copy decoded at the pruned slot numbers with the unpruned mask: wrong logits,
    silently (LLaVA, Gemma3), or a shape error (Qwen2-VL)."""
    inputs = tiny.make_inputs(tiny.batch)
    B, L = inputs["input_ids"].shape
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
               **(dict(cache_implementation="static") if kind == "static" else {}))

    def prefill():
        cache = (static_cache(tiny.model, B, L + NEW_TOKENS) if kind == "static"
                 else transformers.DynamicCache(config=tiny.model.config.get_text_config()))
        out = tiny.model(**inputs, **cache_kwargs(tiny.model, cache), use_cache=True)
        return cache, out.logits[:, -1:]

    def decode(cache, logits):
        mask, steps = inputs["attention_mask"], [logits]
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            steps.append(tiny.model(input_ids=steps[-1].argmax(-1), attention_mask=mask,
                                    **cache_kwargs(tiny.model, cache), use_cache=True).logits[:, -1:])
        return torch.cat(steps, 1)

    try:
        loop_is_generate = torch.equal(decode(*prefill()).argmax(-1), tiny.model.generate(**inputs, **gen)[:, L:])
    except Exception:  # noqa: BLE001 - the unpatched model cannot run such a loop (Qwen, GLM)
        loop_is_generate = False
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        expected = tiny.model.generate(**inputs, **gen)[:, L:] if loop_is_generate else None
        cache, first = prefill()
        assert handle.last_selection
        copied = copy.deepcopy(cache)
        from_copy = decode(copied, first)
        from_original = decode(cache, first)
        assert torch.equal(from_copy, from_original)
        if loop_is_generate:
            assert torch.equal(from_original.argmax(-1), expected)
        again = copy.deepcopy(cache)
        with pytest.raises(RuntimeError, match="pruned prefill"):
            tiny.model(**inputs, **cache_kwargs(tiny.model, again), use_cache=True)
        # Pickled (a generate() output saved, or sent to another process), the cache's tensors
        # survive but its layout cannot: extending it is refused, a prompt included, until it is
        # emptied; a static cache's reset() empties it, and its prompt is then pruned again.
        unpickled = pickle.loads(pickle.dumps(again))
        token = first.argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        for step in (dict(input_ids=token, attention_mask=mask), inputs):
            with pytest.raises(RuntimeError, match="was pickled"):
                tiny.model(**step, **cache_kwargs(tiny.model, unpickled), use_cache=True)
        if kind == "static" and tiny.static_reset:
            unpickled.reset()
            handle.last_selection = []
            assert torch.equal(tiny.model(**inputs, **cache_kwargs(tiny.model, unpickled), use_cache=True).logits[:, -1:],
                               first)
            assert handle.last_selection
    # The handle that knew the layouts is gone: a later one refuses the caches it left.
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        with pytest.raises(RuntimeError, match="handle .* was removed"):
            tiny.model(input_ids=token, attention_mask=mask, **cache_kwargs(tiny.model, copied), use_cache=True)


PALIGEMMA = [name for name in sorted(BUILDERS) if name.startswith("paligemma")]


def _paligemma_types(inputs: dict, types: str) -> dict:
    """``token_type_ids`` none, the processor's (0: the whole prompt is the prefix), or 1 on the
    last three tokens (a suffix, as the processor marks one given with the prompt)."""
    inputs = dict(inputs)
    if types == "none":
        del inputs["token_type_ids"]
    elif types == "suffix":
        inputs["token_type_ids"] = inputs["token_type_ids"].clone()
        inputs["token_type_ids"][:, -3:] = 1
    return inputs


@pytest.mark.parametrize("types", ["none", "prefix", "suffix"])
@pytest.mark.parametrize("name", PALIGEMMA)
@torch.no_grad()
def test_paligemma_keep_all_is_the_unpatched_model_whatever_the_token_types(name, types):
    """PaliGemma's masks follow ``token_type_ids`` (5.x: type 0 attends bidirectionally, causal
    without them; 4.57: the whole prompt attends to itself, and with labels causal plus the type 0
    columns): keep-all gives the unpatched logits, loss and generations bit for bit in every case."""
    tiny = BUILDERS[name]()
    inputs = _paligemma_types(tiny.make_inputs(tiny.batch), types)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    attended = inputs["attention_mask"].bool()
    gens = [dict(do_sample=False), dict(num_beams=3, do_sample=False)]
    if tiny.static_generate:
        gens.append(dict(do_sample=False, cache_implementation="static"))

    def run():
        out = [tiny.model(**inputs).logits[attended], tiny.model(**inputs, labels=labels).loss]
        return out + [tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, **gen) for gen in gens]

    expected = run()
    with zspa_kernels.prune(tiny.model, keep=1.0) as handle:
        got = run()
        assert handle.last_selection
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="refused on transformers 4.x only")
@torch.no_grad()
def test_paligemma2_is_refused_on_transformers_4():
    """4.57 hands PaliGemma 2's sliding-window layers a full-length mask they cut to the wrong keys:
    refused by prune() itself, before any hook."""
    from zspa_kernels.integrations.transformers.tiny import paligemma

    tiny = paligemma(version=2)
    with pytest.raises(ValueError, match=r"^model: zspa_kernels.prune supports PaliGemma 2 .* from transformers 5\.0; this is 4\."):
        zspa_kernels.prune(tiny.model, keep=KEEP)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.model.modules())


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="refused on transformers 4.x only")
@torch.no_grad()
def test_emu3_is_refused_on_transformers_4_whose_wrapper_reads_no_image():
    """4.57's Emu3 wrapper does not pass pixel_values on to its base model: its logits are those of
    the bare placeholders, whatever the pixels (nothing to prune). Refused by prune() itself."""
    from zspa_kernels.integrations.transformers.tiny import emu3

    tiny = emu3()
    inputs = tiny.make_inputs(tiny.single)
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    assert torch.equal(tiny.model(**inputs).logits, tiny.model(**other).logits)
    with pytest.raises(ValueError, match=r"^model: zspa_kernels.prune supports Emu3 from transformers 5\.0; this is 4\."):
        zspa_kernels.prune(tiny.model, keep=KEEP)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.model.modules())


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("name", PALIGEMMA)
@torch.no_grad()
def test_paligemma_pruned_prompt_with_a_suffix_is_masked_as_the_model_masks_it(name, labelled):
    """Pruned, a prompt with a suffix (type 1) computes what the base model computes without a cache
    over the kept tokens with their types (and labels: transformers 4.57 reads the types only beside
    them), so the prefix stays bidirectional and the suffix causal; the loss is over kept positions."""
    tiny = BUILDERS[name]()
    inputs = _paligemma_types(tiny.make_inputs(tiny.batch), "suffix")
    labels = inputs["input_ids"].masked_fill((inputs["attention_mask"] == 0) | (inputs["token_type_ids"] == 0), -100)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        out = tiny.model(**inputs, **(dict(labels=labels) if labelled else {}))
        index, valid = handle.last_kept_positions.clamp_min(0), handle.last_kept_positions >= 0
    kept = calls[0]
    extra = dict(token_type_ids=inputs["token_type_ids"].gather(1, index) * valid)
    if labelled and "labels" in inspect.signature(tiny.model.model.forward).parameters:
        extra["labels"] = labels.gather(1, index).masked_fill(~valid, -100)
    hidden = tiny.model.model(inputs_embeds=kept["inputs_embeds"], attention_mask=padding_mask(kept["attention_mask"]),
                              position_ids=kept["position_ids"], use_cache=False, **extra).last_hidden_state
    expected = lm_head(tiny.model, hidden)
    torch.testing.assert_close(out.logits[valid], expected[valid], atol=ATOL, rtol=0)
    if labelled:
        targets = labels.gather(1, index).masked_fill(~valid, -100)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
        torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=0)


@torch.no_grad()
def test_shieldgemma2_classifier_returns_the_pruned_models_last_yes_no_logits():
    """ShieldGemma 2's classifier holds its Gemma3 model (there the hooks' base model is that
    wrapper) and returns the yes/no logits of the last position and their softmax: keep-all gives
    the unpatched ones bit for bit; pruned, those of its Gemma3 model pruned alike, which the
    shared suite holds to the no-cache reference."""
    from zspa_kernels.integrations.transformers.tiny import SHIELD_NO, SHIELD_YES

    tiny = BUILDERS["shieldgemma2"]()
    classifier, inputs = tiny.wrapper, tiny.make_inputs(tiny.batch)
    expected = classifier(**inputs)
    with zspa_kernels.prune(classifier, keep=1.0) as handle:
        got = classifier(**inputs)
    assert len(handle.last_selection) == tiny.n_images(tiny.batch)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.probabilities, expected.probabilities)
    with zspa_kernels.prune(classifier, keep=KEEP) as handle:
        pruned = classifier(**inputs)
    assert [s.order.shape[0] for s in handle.last_selection] == [KEEP] * tiny.n_images(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        inner = tiny.model(**inputs).logits[:, -1, [SHIELD_YES, SHIELD_NO]]
    assert torch.equal(pruned.logits, inner) and not torch.equal(pruned.logits, expected.logits)
    assert torch.equal(pruned.probabilities, inner.softmax(-1))


@torch.no_grad()
def test_qwen3_deepstack_rows_follow_their_tokens():
    """Each kept visual token keeps its own deepstack features (matched by its embedding)."""
    tiny = BUILDERS["qwen3_vl"]()
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as pruned:
        tiny.model(**inputs)
    (full,), (pruned,) = full, pruned

    def visual_rows(kw):
        return kw["inputs_embeds"][kw["visual_pos_masks"]], kw["deepstack_visual_embeds"]

    (embeds, stacks), (kept_embeds, kept_stacks) = visual_rows(full), visual_rows(pruned)
    assert kept_embeds.shape[0] < embeds.shape[0]
    source = (kept_embeds[:, None] == embeds[None]).all(-1).float().argmax(1)
    assert torch.equal(embeds[source], kept_embeds)
    for layer, kept_layer in zip(stacks, kept_stacks):
        assert torch.equal(layer[source], kept_layer)


@pytest.mark.skipif("qwen4_exp" not in BUILDERS, reason="Qwen4-Exp is not in this transformers")
@torch.no_grad()
def test_qwen4_exp_per_layer_embeddings_read_the_kept_tokens_ids():
    """Qwen4-Exp's per-layer n-gram embeddings read ``ple_input_ids`` beside the embeddings: a pruned
    prefill hands its language model the ids of the kept positions (the no-cache reference reuses
    them, so only this test holds them to the input's)."""
    tiny = BUILDERS["qwen4_exp"]()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as calls:
        tiny.model(**inputs)
    ids, kept = calls[0]["ple_input_ids"], handle.last_kept_positions
    assert ids.shape == kept.shape and ids.shape[1] < inputs["input_ids"].shape[1]
    valid = kept >= 0
    assert torch.equal(ids[valid], inputs["input_ids"].gather(1, kept.clamp(min=0))[valid])


@pytest.mark.skipif("minimax_m3_vl" not in BUILDERS, reason="MiniMax-M3-VL is not in this transformers")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_minimax_m3_indexer_reads_the_slots_and_rope_the_original_positions(cache):
    """MiniMax-M3-VL's sparse attention (README ³²): in a pruned prefill and in each decode step, the lightning
    indexer is handed the slots its tokens fill, and the rotary embedding their original positions (the
    no-cache reference numbers the slots as the model does itself, so only this test holds them to the
    layout). The tiny model's attention is sparse there: some query reads fewer blocks than precede it."""
    tiny = BUILDERS["minimax_m3_vl"]()
    inputs = tiny.make_inputs(tiny.single)
    lm = lm_of(tiny.model)
    indexers = [layer.self_attn.indexer for layer in lm.layers if layer.self_attn.indexer is not None]
    indexed, rotated = [], []
    hooks = [m.register_forward_hook(lambda m, args, out: indexed.append((args[3], out))) for m in indexers]
    hooks.append(lm.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: rotated.append(kwargs["position_ids"]), with_kwargs=True))
    try:
        with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
            tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                **({"cache_implementation": "static"} if cache == "static" else {}))
    finally:
        for hook in hooks:
            hook.remove()
    kept, length = handle.last_kept_positions, inputs["input_ids"].shape[1]
    pruned = kept.shape[1]
    assert len(indexers) == 1 and len(indexed) == len(rotated) == 3 and pruned < length
    (slots, blocks), *steps = indexed
    assert torch.equal(slots, torch.arange(pruned)[None]) and torch.equal(rotated[0], kept)
    for t, (step, _) in enumerate(steps):
        assert step.tolist() == [[pruned + t]] and rotated[1 + t].tolist() == [[length + t]]
    preceding = slots // indexers[0].block_size + 1  # the blocks up to each query's own
    assert bool(((blocks >= 0).sum(-1) < preceding[:, None]).any())


@pytest.mark.skipif("unlimited_ocr" not in BUILDERS, reason="UnlimitedOCR is not in this transformers")
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_unlimited_ocr_generated_tokens_slide_past_the_kept_prompt(kind):
    """UnlimitedOCR's reference sliding window keeps a prompt's states and the last ``sliding_window``
    generated ones (the shared suite cannot show it: its no-cache reference takes every token as prompt,
    so its window exceeds what it generates). Its generate() declares the unpruned prompt's length to the
    cache ahead of the forward; a pruned generate() equals its language model's own cached run over the
    kept prompt: the kept tokens are the reference, and every generated token slides. On a static cache
    too, whose window layers are shorter than the prompt (they keep it in slots of their own)."""
    tiny = BUILDERS["unlimited_ocr"](sliding_window=2)
    inputs = tiny.make_inputs(tiny.batch)
    B, L = inputs["input_ids"].shape
    steps = 8
    static = dict(cache_implementation="static") if kind == "static" else {}
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, **static)
    prefill = calls[0]
    assert prefill["inputs_embeds"].shape[1] < L - steps  # more tokens dropped than generated
    lm = tiny.model.model.language_model
    cache = transformers.DynamicCache(config=lm.config)
    assert {layer._layer_type for layer in cache.layers} == {"reference_sliding_attention"}
    mask, tokens = prefill["attention_mask"], out.sequences[:, L:]
    hidden = lm(inputs_embeds=prefill["inputs_embeds"], attention_mask=mask, position_ids=prefill["position_ids"],
                use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state
    logits = [tiny.model.lm_head(hidden[:, -1:])]
    for k, call in enumerate(calls[1:]):
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        hidden = lm(inputs_embeds=lm.embed_tokens(tokens[:, k:k + 1]), attention_mask=mask,
                    position_ids=call["position_ids"], use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state
        logits.append(tiny.model.lm_head(hidden))
    assert len(logits) == steps
    torch.testing.assert_close(torch.cat(logits, 1), torch.stack(out.logits, 1), atol=ATOL, rtol=0)


@pytest.mark.skipif("granite4_vision" not in BUILDERS, reason="Granite 4 Vision is not in this transformers")
@torch.no_grad()
def test_granite4_vision_features_follow_their_tokens():
    """Granite 4 Vision's image tokens are zero embeddings whose features its language model adds
    (one map per layer): each kept token keeps its own feature rows, and tokens are selected by
    those features, not by the zeros."""
    tiny = BUILDERS["granite4_vision"]()
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, capture_lm_calls(tiny.model) as pruned:
        tiny.model(**inputs)
    (full,), (pruned,) = full, pruned
    index, valid = handle.last_kept_positions.clamp_min(0), handle.last_kept_positions >= 0
    visual = full["vision_mask"][..., 0]
    kept = pruned["vision_mask"][..., 0]
    assert torch.equal(kept, visual.gather(1, index) & valid) and kept.sum() < visual.sum()
    assert sorted(pruned["deepstack_features"]) == sorted(full["deepstack_features"]) == [0, 1, 2, 3, 4]
    for layer, features in full["deepstack_features"].items():
        at = features.new_zeros(*visual.shape, features.shape[-1])
        at[visual] = features  # each position's own row
        expected = at.gather(1, index[..., None].expand(-1, -1, at.shape[-1]))[kept]
        assert torch.equal(pruned["deepstack_features"][layer], expected)
    # Selected by the layer-0 features: the zero embeddings would keep each image's first tokens.
    first = [s.order.sort().values.tolist() == list(range(KEEP)) for s in handle.last_selection]
    assert not all(first)


@pytest.mark.skipif("llama4" not in BUILDERS, reason="Llama 4 is refused on this transformers")
@torch.no_grad()
def test_llama4_temperature_tuning_reads_the_unpatched_positions_at_keep_all():
    """Llama 4's NoPE layers scale their queries by a temperature of the position, which the model
    counts in cache slots (transformers 4.x: the cache_position the hooks remap). The shared tiny
    model's floor_scale (the checkpoints') leaves it at 1 on short prompts; at 2 it changes every
    other position: keep-all must still give the unpatched logits and tokens bit for bit, and a
    pruned generation the no-cache reference's (the slots of the pruned prompt). Its 8-token
    chunks are checked to matter as well."""
    from zspa_kernels.integrations.transformers.tiny import llama4

    tiny, flat = llama4(floor_scale=2), llama4()
    inputs = tiny.make_inputs(tiny.batch)
    attended = inputs["attention_mask"].bool()
    expected = tiny.model(**inputs).logits
    assert not torch.equal(expected[attended], flat.model(**inputs).logits[attended])  # the temperature counts
    flat.model.config.text_config.attention_chunk_size = 1024
    unchunked = flat.model(**inputs).logits
    flat.model.config.text_config.attention_chunk_size = 8
    assert not torch.equal(unchunked[attended], flat.model(**inputs).logits[attended])  # the chunks count
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = tiny.model.generate(**inputs, **gen)
    with zspa_kernels.prune(tiny.model, keep=1.0):
        assert torch.equal(tiny.model(**inputs).logits[attended], expected[attended])
        assert torch.equal(tiny.model.generate(**inputs, **gen), tokens)
    positions = unpruned_decode_positions(tiny.model, inputs, NEW_TOKENS, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, **gen, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    ref = no_cache_logits(tiny.model, calls[0], positions, generated, list(range(len(tiny.batch))))
    start = calls[0]["inputs_embeds"].shape[1] - 1
    for t, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[:, start + t], atol=ATOL, rtol=0)
    assert torch.equal(generated, ref[:, start:start + NEW_TOKENS].argmax(-1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_eager_attention_generation_equals_no_cache_reference(name):
    tiny = BUILDERS[name](attn="eager")
    inputs = tiny.make_inputs(tiny.batch)
    positions = unpruned_decode_positions(tiny.model, inputs, NEW_TOKENS, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=KEEP), capture_lm_calls(tiny.model) as calls:
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    ref = no_cache_logits(tiny.model, calls[0], positions, tokens, list(range(len(tiny.batch))),
                          image_features_of(tiny.model, inputs))
    start = calls[0]["inputs_embeds"].shape[1] - 1
    torch.testing.assert_close(torch.stack(out.logits, 1), ref[:, start:start + NEW_TOKENS],
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_pruned_inputs_hold_exactly_the_selected_tokens(tiny):
    """last_selection describes the gather: each row keeps its text and, of each image,
    the tokens at ``kept``, in their original order (left-padded to the longest row);
    last_kept_positions is that gather's index (-1 on the re-padding)."""
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=0.3) as handle, capture_lm_calls(tiny.model) as cut:
        tiny.model(**inputs)
    embeds, kept_embeds = full[0]["inputs_embeds"], cut[0]["inputs_embeds"]
    mask = padding_mask(cut[0]["attention_mask"])[:, : kept_embeds.shape[1]]
    visual = torch.isin(inputs["input_ids"], torch.tensor(handle.visual_ids))
    for r in range(len(tiny.batch)):
        # The row's visual tokens in order; each image takes the next n_tokens of them
        # (an image may span several runs, a run may hold several images).
        spots, at = visual[r].nonzero()[:, 0], 0
        keep = ~visual[r] & inputs["attention_mask"][r].bool()
        for sel in (s for s in handle.last_selection if s.batch_row == r):
            assert sel.order.shape[0] == keep_budget(0.3, sel.n_tokens) <= sel.n_tokens
            assert torch.equal(sel.kept, sel.order.sort().values)
            keep[spots[at + sel.kept]] = True
            at += sel.n_tokens
        assert at == spots.shape[0]
        n = int(keep.sum())
        assert torch.equal(kept_embeds[r, -n:], embeds[r, keep])
        assert mask[r, : kept_embeds.shape[1] - n].sum() == 0  # re-padding is masked out
        # The public map from output positions to input positions says the same.
        assert torch.equal(handle.last_kept_positions[r, -n:], keep.nonzero()[:, 0])
        assert bool((handle.last_kept_positions[r, : kept_embeds.shape[1] - n] == -1).all())
    assert handle.last_kept_positions.shape == kept_embeds.shape[:2]
    assert len(handle.last_selection) == tiny.n_images(tiny.batch)


@pytest.mark.parametrize("prompt, follows_preamble", [("question", False), ("all_text", True)])
@torch.no_grad()
def test_question_prompt_ignores_text_before_the_image(prompt, follows_preamble):
    """With ``prompt="question"`` only text after the first image (minus special tokens)
    forms the prompt vector, so a different system preamble leaves the selection alone."""
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][0, :5] = torch.arange(60, 65)  # the 5 text tokens before the image
    orders = []
    for case in (inputs, other):
        with zspa_kernels.prune(tiny.model, keep=8, core_ratio=1.0, prompt=prompt) as handle:
            tiny.model(**case)
        orders.append(handle.last_selection[0].order)
    assert torch.equal(orders[0], orders[1]) != follows_preamble


def test_package_import_does_not_import_transformers():
    code = ("import sys, zspa_kernels; assert 'transformers' not in sys.modules; "
            "assert callable(zspa_kernels.prune)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("keep, calls", [(KEEP, 1), (0.5, 3)])
@torch.no_grad()
def test_one_selection_call_per_distinct_budget(keep, calls):
    """Images of every row and size go through the op together; a fractional keep gives
    16-, 8-, 12- and 16-token images budgets of 8, 4, 6 and 8: three calls."""
    tiny = BUILDERS["qwen2_vl"]()
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=keep) as handle, torch.profiler.profile() as prof:
        tiny.model(**inputs)
    assert sorted(s.n_tokens for s in handle.last_selection) == [8, 12, 16, 16]
    names = [e.name for e in prof.events()]
    assert names.count("zspa::select_tokens") == calls


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_bfloat16_model_keep_all_is_exact_and_pruning_shortens(name):
    tiny = BUILDERS[name]()
    model = tiny.model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in tiny.make_inputs(tiny.single).items()}
    expected = model(**inputs).logits
    with zspa_kernels.prune(model, keep=1.0):
        assert torch.equal(model(**inputs).logits, expected)
    with zspa_kernels.prune(model, keep=KEEP) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True)
    dropped = handle.last_selection[0].n_tokens - KEEP
    assert kv_cache(out).get_seq_length() == inputs["input_ids"].shape[1] - dropped + 1


@torch.no_grad()
def test_the_base_model_can_be_pruned_directly():
    tiny = BUILDERS["llava"]()
    inputs = tiny.make_inputs(tiny.single)
    with zspa_kernels.prune(tiny.model.model, keep=KEEP) as handle:
        hidden = tiny.model.model(**inputs).last_hidden_state
    dropped = handle.last_selection[0].n_tokens - KEEP
    assert hidden.shape[1] == inputs["input_ids"].shape[1] - dropped


def _uncounted(fn):
    """``fn`` run with the counting mode off: a family's own function (the mask it builds, the features it
    gathers, its video's timestamps), which does what its model does, image by image where the model does."""
    from torch.utils._python_dispatch import _disable_current_modes

    def call(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return call


def _prefill_ops(tiny, handle, inputs) -> collections.Counter:
    """The ops of ``handle``'s own prefill hook in one pruned forward of ``inputs``, its family's functions
    apart."""
    import dataclasses

    family = handle.family
    handle.family = dataclasses.replace(family, **{
        f.name: _uncounted(getattr(family, f.name)) for f in dataclasses.fields(family)
        if inspect.isfunction(getattr(family, f.name))})
    try:
        with ops_of(handle, "_prefill") as counted:
            tiny.model(**inputs)
    finally:
        handle.family = family
    assert len(counted) == 1
    return counted[0]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_the_prefill_hook_makes_as_many_ops_for_one_image_as_for_many(name):
    """After its one host sync, each op of the prefill hook is a kernel launch or a host op that the GPU waits
    for (it has run the vision tower and has nothing else queued). So the hook's own code works on all images of
    a batch at once, in a fixed number of ops: the row with the most images, twice and six times over (not once:
    torch takes shortcuts on dimensions of size 1). What a family's own functions do, image by image where its
    model does, is theirs: not counted."""
    tiny = BUILDERS[name]()
    row = max(tiny.batch, key=lambda r: tiny.n_images([r]))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        few = _prefill_ops(tiny, handle, tiny.make_inputs([row] * 2, seeds=[0] * 2))
        assert len(handle.last_selection) == 2 * tiny.n_images([row]) > 0
        many = _prefill_ops(tiny, handle, tiny.make_inputs([row] * 6, seeds=[0] * 6))
        assert len(handle.last_selection) == 6 * tiny.n_images([row])
    more, fewer = many - few, few - many
    assert not more and not fewer, f"ops that grow with the images: {dict(more)}; that shrink: {dict(fewer)}"
