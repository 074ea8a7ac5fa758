"""zspa_kernels.prune with the model, its inputs and the selection on a GPU: every tiny family,
both fused backends. The CPU suite (test_transformers_prune.py) proves the hooks' bookkeeping;
this proves that nothing in them assumes host tensors (devices of indices, lengths, masks) and
that the fused backends drive them like the reference: every selection call the hooks make is
recorded and its picks replayed against the fp64 oracle, and where the picks equal the
reference backend's, so must the logits, bit for bit. Runs where a GPU is (bench/run_gpu.sh's
checks); skipped elsewhere.
"""
from __future__ import annotations

import linecache
import pathlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from fp64_oracle import Row, replay  # noqa: E402
from helpers import TOLERANCE  # noqa: E402
from zspa_kernels.integrations.transformers import handle as handle_module  # noqa: E402
from zspa_kernels.integrations.transformers import cache_kwargs, kv_cache  # noqa: E402
from zspa_kernels.integrations.transformers.handle import PruneHandle  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import BUILDERS  # noqa: E402

from .reference import assert_same_generation, next_turn, pruned_generation, source_site  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")
KEEP = 5  # of 16+ tokens per image


def _on(inputs: dict, device: torch.device) -> dict:
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    built = BUILDERS[request.param]()
    built.model.to(DEVICE)
    return built


@torch.no_grad()
def test_keep_all_reproduces_unpatched_logits_on_the_gpu(tiny):
    inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
    expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=1.0, backend="triton"):
        got = tiny.model(**inputs).logits
    attended = inputs["attention_mask"].bool()
    assert got.shape == expected.shape and torch.equal(got[attended], expected[attended])


def _recorded_calls(monkeypatch) -> list:
    """Every ``zspa::select_tokens`` call made from here on: ``(args, picks)``."""
    calls, op = [], torch.ops.zspa.select_tokens

    def recording(*args):
        picks = op(*args)
        calls.append((args, picks))
        return picks

    monkeypatch.setattr(torch.ops.zspa, "select_tokens", recording)
    return calls


def oracle_row(args, b: int) -> Row:
    """The fp64 oracle's ``Row`` of row ``b`` of a ``zspa::select_tokens`` call's arguments ``args``."""
    visual, prompt, k, core_ratio, lengths, mask, relevance = args[:7]
    return Row(visual[b].double().cpu().numpy(), prompt[b].double().cpu().numpy(),
               None if mask is None else mask[b].cpu().numpy(),
               visual.shape[1] if lengths is None else int(lengths[b]), k, core_ratio, relevance)


def _replay(args, picks) -> None:
    visual, backend, pick_order = args[0], args[7], args[8]
    assert pick_order and picks.device.type == "cuda"
    for b in range(visual.shape[0]):
        replay(oracle_row(args, b), picks[b].tolist(), TOLERANCE[backend][visual.dtype])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_prune_like_the_reference_on_the_gpu(tiny, backend, monkeypatch):
    inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="reference") as ref:
        expected = tiny.model(**inputs, use_cache=True)
    calls = _recorded_calls(monkeypatch)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend=backend) as handle:
        got = tiny.model(**inputs, use_cache=True)
    assert calls and all(args[7] == backend for args, _ in calls)
    for args, picks in calls:
        _replay(args, picks)
    assert len(handle.last_selection) == len(ref.last_selection) == tiny.n_images(tiny.batch)
    assert kv_cache(got).get_seq_length() == kv_cache(expected).get_seq_length()
    if all(torch.equal(a.order, b.order) for a, b in zip(handle.last_selection, ref.last_selection)):
        assert torch.equal(got.logits, expected.logits)  # same picks: the very same computation


# The host sync the prefill hook may make (handle.py's docstring): the one copy of the ids and
# the mask (and the labels and token types where read) to the host (the inputs that size the
# images arrive with it, copied asynchronously).
HOST_COPY = source_site(PruneHandle._host_copy, ".cpu()")
DOCUMENTED_SYNCS = {HOST_COPY}
# And right before them, once a prompt, a static cache's length (a device tensor), where the cache
# is already allocated (a reused one; a new one's length is a host 0 until its first update).
STATIC_LENGTH_READ = source_site(handle_module._is_empty, "== 0")


class _SyncWatch:
    """From its creation on, every call of ``PruneHandle.<method>`` (or ``cls``'s: ``calls``) and the
    ``(file name, source line)`` of each synchronising CUDA call that this package's code makes
    inside it (``ours``), found by torch.cuda.set_sync_debug_mode (a copy from pageable host
    memory is one). Syncs inside transformers' own code (its mask builders, which Gemma3's hook
    calls) are the model's, made pruned or not. Watches nest (the language model's hook calls
    the prefill and the decode step): an inner one hands what it caught to the outer ones, and
    gives them back the mode it found."""

    active: list["_SyncWatch"] = []  # the watches whose method is running, outermost first

    def __init__(self, monkeypatch, method: str, cls: type = PruneHandle):
        self.calls, self._sites = 0, []
        original = getattr(cls, method)

        def watched(handle, *args, **kwargs):
            self.calls += 1
            if not _SyncWatch.active:
                torch.cuda.synchronize()
            mode = torch.cuda.get_sync_debug_mode()
            _SyncWatch.active.append(self)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original(handle, *args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
                    _SyncWatch.active.pop()
                    sites = [(pathlib.Path(w.filename), w.lineno) for w in caught
                             if "synchronizing CUDA operation" in str(w.message)]
                    for watch in (*_SyncWatch.active, self):
                        watch._sites += sites

        monkeypatch.setattr(cls, method, watched)  # before prune(): hooks bind at install

    @property
    def ours(self) -> list:
        package = pathlib.Path(zspa_kernels.__file__).parent
        return [(path.name, linecache.getline(str(path), line).strip()) for path, line in self._sites
                if package in path.parents]


@pytest.mark.parametrize("backend, cache", [("triton", "dynamic"), ("cuda", "dynamic"), ("triton", "static")])
@torch.no_grad()
def test_the_hooks_wait_for_the_gpu_only_where_documented(tiny, backend, cache, monkeypatch):
    """handle.py's promise: one host sync a prefill (the ids and the mask, the image sizes,
    grids and crop masks arriving with it; a static cache's length right before, with nothing
    queued in between), none at decode steps, static caches included (whose length is a device
    tensor).
    Anything else (a copy from pageable memory, say) would make the host wait for the vision
    tower or the selection before it can queue the language model."""
    if cache == "static" and not tiny.static_generate:  # as the CPU suite's _static_generate (PaliGemma 2)
        pytest.skip("the unpatched model's generate() fails on a static cache on this transformers")
    inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
    prefill, decode, base, lm = (_SyncWatch(monkeypatch, method) for method in
                                 ("_prefill", "_decode_step", "_base_pre_hook", "_lm_pre_hook"))
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    if cache == "static":
        # generate() would compile its decode steps here (a static cache on a GPU), and the hooks
        # with them: compiled decoding has a test of its own, below; this one watches the hooks.
        gen.update(cache_implementation="static", disable_compile=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend=backend) as handle:
        tiny.model.generate(**inputs, **gen)
    assert prefill.calls == 1 and decode.calls == 2 and handle.last_selection, (prefill.calls, decode.calls)
    assert prefill.ours and set(prefill.ours) <= DOCUMENTED_SYNCS, prefill.ours
    assert prefill.ours.count(HOST_COPY) == 1, prefill.ours
    assert decode.ours == [] and base.ours == [], (decode.ours, base.ours)
    # The language model's hook around them: the prefill's syncs, at most one length read (at the
    # prefill: three calls would read three times), nothing else.
    assert set(lm.ours) <= DOCUMENTED_SYNCS | {STATIC_LENGTH_READ} and lm.ours.count(STATIC_LENGTH_READ) <= 1, lm.ours


# A conversation's next turn given without a mask: its ids read back where the hooks check them.
TURN_IDS = source_site(PruneHandle._repeats, "torch.equal")


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("rows", ["batch", "single"])
@torch.no_grad()
def test_a_conversation_turn_waits_for_the_gpu_only_to_check_its_ids(name, rows, monkeypatch):
    """A next turn on a pruned cache (test_transformers_prune.py holds its logits to the reference): with
    the conversation's mask (padded rows), the hooks wait for the GPU nowhere; without one (a row of no
    padding: transformers 5.24+'s generate() drops its mask of ones), once a turn, where its ids are
    checked. The decode steps around it: never. (New on 2026-12-05, never run.)"""
    from zspa_kernels.integrations.transformers.families import find_family, split_model

    base, decode = (_SyncWatch(monkeypatch, method) for method in ("_base_pre_hook", "_decode_step"))
    tiny = BUILDERS[name]()
    tiny.model.to(DEVICE)
    inputs = _on(tiny.make_inputs(getattr(tiny, rows)), DEVICE)
    masked = []  # whether generate() gave the base model a mask, call by call (ahead of the hooks)
    split_model(tiny.model, find_family(tiny.model))[0].register_forward_pre_hook(
        lambda module, args, kwargs: masked.append(kwargs.get("attention_mask") is not None), with_kwargs=True)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="triton") as handle:
        first = tiny.model.generate(**inputs, **gen)
        assert handle.last_selection and base.ours == [], base.ours
        turn = next_turn(inputs, first.sequences, first.sequences[:, inputs["input_ids"].shape[1]:])
        calls = base.calls
        second = tiny.model.generate(**turn, **cache_kwargs(tiny.model, kv_cache(first)), **gen)
    # The turn, then two steps; the decode step's hook runs at each (two steps of the first generate()).
    assert base.calls == calls + 3 and decode.calls == 2 + 3, (base.calls, decode.calls)
    assert kv_cache(second).get_seq_length() < second.sequences.shape[1] - 1  # still pruned
    assert base.ours == ([] if masked[calls] else [TURN_IDS]), (masked[calls], base.ours)
    assert decode.ours == [], decode.ours


@torch.no_grad()
def test_static_cache_decoding_as_generate_compiles_it():
    """generate() compiles the decode step of a static-cache generation on GPUs by itself
    (inductor, CUDA graphs), the pruning hooks with it. The hooks give that step one shape and
    no changing Python state, so it compiles once (test_transformers_prune.py counts the graphs
    on every family on CPU), and it must generate the uncompiled tokens. A token may differ only
    where the uncompiled logits nearly tie (inductor fuses and reorders the sums)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    tiny = BUILDERS["llava"]()
    tiny.model.to(DEVICE)
    inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static",
               output_logits=True, return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="triton"):
        eager = tiny.model.generate(**inputs, **gen, disable_compile=True)
        torch._dynamo.reset()
        counters.clear()
        try:
            compiled = tiny.model.generate(**inputs, **gen)  # transformers' own compile config
            graphs = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
    assert graphs == 1, graphs
    start = inputs["input_ids"].shape[1]
    differ = compiled.sequences[:, start:] != eager.sequences[:, start:]
    if differ.any():
        step = int(differ.any(0).nonzero()[0])  # the first step where a token differs, in these rows:
        top2 = eager.logits[step][differ[:, step]].topk(2, dim=-1).values
        assert bool((top2[:, 0] - top2[:, 1] < 1e-3).all()), f"step {step}: not a near-tie"
    else:
        for a, b in zip(compiled.logits, eager.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offloaded, resident", [("offloaded", "dynamic"), ("offloaded_static", "static")])
@torch.no_grad()
def test_an_offloaded_cache_generates_as_the_resident_one(offloaded, resident):
    """``cache_implementation="offloaded"`` / ``"offloaded_static"`` (transformers keeps each layer's
    keys and values in host memory between its uses, prefetching the next layer's on a stream of
    its own: CUDA only) moves the pruned cache, not what it holds: the same tokens and logits as the
    same cache kept on the GPU. (New on 2026-12-02, never run: transformers offloads on CUDA alone.)"""
    tiny = BUILDERS["llava"]()
    tiny.model.to(DEVICE)
    inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
    expected, got = (pruned_generation(tiny.model, inputs, KEEP, backend="triton", max_new_tokens=4,
                                       cache_implementation=implementation, disable_compile=True)
                     for implementation in (resident, offloaded))
    assert len(got[1]) == tiny.n_images(tiny.batch)
    assert_same_generation(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3"])
@torch.no_grad()
def test_prompt_lookup_decoding_on_the_gpu_generates_as_greedy_decoding(name):
    """Prompt-lookup decoding on a pruned cache (test_transformers_prune.py replays it by hand against
    greedy decoding on every family): its drafts verified and cropped on the GPU give greedy decoding's
    tokens, and its picks. (New on 2026-12-06, never run.)"""
    tiny = BUILDERS[name]()
    tiny.model.to(DEVICE)
    inputs = _on(tiny.make_inputs(tiny.single), DEVICE)
    gen = dict(max_new_tokens=8, do_sample=False, eos_token_id=tiny.model.config.get_text_config().vocab_size - 1,
               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="triton") as handle:
        plain = tiny.model.generate(**inputs, **gen)
        picks = [s.order for s in handle.last_selection]
        looked_up = tiny.model.generate(**inputs, **gen, prompt_lookup_num_tokens=2)
        assert all(torch.equal(a, b) for a, b in zip((s.order for s in handle.last_selection), picks))
    assert torch.equal(looked_up.sequences, plain.sequences)
    for a, b in zip(looked_up.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_compiled_flex_attention_generates_as_sdpa_on_the_gpu(cache):
    """flex_attention as transformers runs it on a GPU (its kernel compiled, the mask function read inside it):
    Molmo2's base model hands its language model a prebuilt ``BlockMask``, read for its padding, and a static
    cache's decode steps get the mask that hides the slots ahead (test_transformers_prune.py runs every family
    uncompiled on CPU). The same picks and tokens as sdpa, logits within rounding. (New on 2026-12-06, never
    run.)"""
    runs = []
    for attn in ("flex_attention", "sdpa"):
        tiny = BUILDERS["molmo2"](attn=attn)
        tiny.model.to(DEVICE)
        inputs = _on(tiny.make_inputs(tiny.batch), DEVICE)
        runs.append(pruned_generation(tiny.model, inputs, KEEP, backend="triton", max_new_tokens=4,
                                      **(dict(cache_implementation="static", disable_compile=True)
                                         if cache == "static" else {})))
    assert len(runs[0][1]) == tiny.n_images(tiny.batch)
    assert_same_generation(*runs, atol=1e-4)
