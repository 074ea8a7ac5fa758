"""zspa_kernels.prune on VLMs whose language model reads the images through cross-attention layers
(Llama 3.2 Vision), on tiny random models (CPU, no downloads).

The reference is independent of the hooks' gather: the unpatched model whose cross-attention mask
hides every token the selection dropped (masking a key is removing it, up to summation order), run
without a cache over the prompt and the generated tokens; and each image's picks are recomputed from
the unpatched model's own cross-attention states and the question's embeddings by the reference
backend.
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.integrations.transformers import cache_kwargs, kv_cache  # noqa: E402
from zspa_kernels.integrations.transformers.handle import PruneHandle  # noqa: E402
from zspa_kernels.integrations.transformers.tiny import CROSS_ATTENTION_BUILDERS, MLLAMA_IMAGE  # noqa: E402
from zspa_kernels.spec import keep_budget  # noqa: E402

from .reference import capture_lm_calls, ops_of, source_site  # noqa: E402

NEW_TOKENS = 4
KEEP = 5  # of 17 tokens a tile
# The caller's cross_attention_mask of a decode step without cache_position: 4.x slices none (the step's
# row only), 5.17 cuts the step's row out of the whole (5.24 takes either).
OLD = transformers.__version__.startswith("4.")
ATOL = 1e-5  # removed vs masked keys, cached vs no-cache fp32 logits: same math, other summation order


@pytest.fixture(scope="module", params=sorted(CROSS_ATTENTION_BUILDERS))
def tiny(request):
    return CROSS_ATTENTION_BUILDERS[request.param]()


def _geometry(tiny, inputs):
    """(images, tiles, patches) of a row's cross-attention tokens."""
    _, _, n_images, n_tiles = inputs["cross_attention_mask"].shape
    return n_images, n_tiles, tiny.model.model.vision_model.num_patches


def _kept_columns(tiny, inputs, selection) -> torch.Tensor:
    """(B, images*tiles*patches) bool: the tokens ``selection`` kept, placed by the test's own reading of
    the inputs (an image's real tiles are its first ``aspect_ratio_mask`` ones; its tokens tile by tile)."""
    n_images, n_tiles, patches = _geometry(tiny, inputs)
    B = inputs["input_ids"].shape[0]
    kept = torch.zeros(B, n_images * n_tiles * patches, dtype=torch.bool)
    for s in selection:
        tiles = int(inputs["aspect_ratio_mask"][s.batch_row, s.image_index].sum())
        assert s.n_tokens == tiles * patches
        kept[s.batch_row, s.image_index * n_tiles * patches + s.kept] = True
    return kept


@contextlib.contextmanager
def masked_keys(tiny, kept: torch.Tensor):
    """The unpatched model whose cross-attention layers see only the ``kept`` tokens: every other
    column of the prepared mask hidden, at every call (the reference)."""
    def hide(module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        if mask is not None:
            kwargs["cross_attention_mask"] = mask.masked_fill(~kept[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    hook = tiny.model.model.language_model.register_forward_pre_hook(hide, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def _extended(inputs, tokens):
    """``inputs`` with ``tokens`` appended (every generated token sees what the last prompt token saw)."""
    out = dict(inputs)
    n = tokens.shape[1]
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(tokens.shape)], 1)
    cross = inputs["cross_attention_mask"]
    out["cross_attention_mask"] = torch.cat([cross, cross[:, -1:].expand(-1, n, -1, -1)], 1)
    return out


@torch.no_grad()
def test_keep_all_reproduces_the_unpatched_model_exactly(tiny):
    inputs = tiny.make_inputs(tiny.batch)
    expected = tiny.model(**inputs).logits
    tokens = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=1.0) as handle:
        assert torch.equal(tiny.model(**inputs).logits, expected)
        assert len(handle.last_selection) == sum(seg[0] == "image" for row in tiny.batch for seg in row)
        assert torch.equal(tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), tokens)


@pytest.mark.parametrize("keep", [KEEP, 0.3])
@torch.no_grad()
def test_a_pruned_forward_is_the_unpatched_model_seeing_the_kept_tokens_only(tiny, keep):
    """Same sequence, same logits shape; the cross-attention layers get each row's kept tokens (rows
    keeping fewer padded), and the logits are those of the unpatched model with the dropped keys masked."""
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as full:
        unpruned = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=keep) as handle, capture_lm_calls(tiny.model) as cut:
        got = tiny.model(**inputs).logits
    selection = handle.last_selection
    assert handle.last_kept_positions is None  # no position of the sequence is dropped
    assert [(s.batch_row, s.image_index) for s in selection] == [
        (r, i) for r, row in enumerate(tiny.batch) for i in range(sum(seg[0] == "image" for seg in row))]
    for s in selection:
        assert s.order.shape[0] == keep_budget(keep, s.n_tokens) < s.n_tokens
    kept = _kept_columns(tiny, inputs, selection)
    B, N = kept.shape
    D = full[0]["cross_attention_states"].shape[-1]
    states, cut_states = full[0]["cross_attention_states"].reshape(B, N, D), cut[0]["cross_attention_states"]
    assert cut_states.shape == (B, int(kept.sum(1).max()), D)
    for r in range(B):
        n = int(kept[r].sum())
        assert torch.equal(cut_states[r, :n], states[r, kept[r]])
        hidden = cut[0]["cross_attention_mask"][r, 0, :, n:]  # the padding: hidden from every position
        assert bool((hidden == torch.finfo(hidden.dtype).min).all())
    with masked_keys(tiny, kept):
        expected = tiny.model(**inputs).logits
    assert got.shape == unpruned.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, unpruned, atol=1e-3)  # the images do reach the text


@torch.no_grad()
def test_each_image_keeps_what_the_op_picks_on_its_real_tiles_for_the_question(tiny):
    """The picks, recomputed apart: each image's real tiles' tokens (from the unpatched call's states),
    the question's embeddings (attended text after the row's first image, no special ids), the op."""
    inputs = tiny.make_inputs(tiny.batch)
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    n_images, n_tiles, patches = _geometry(tiny, inputs)
    ids, attended = inputs["input_ids"], inputs["attention_mask"].bool()
    B = ids.shape[0]
    states = full[0]["cross_attention_states"].reshape(B, n_images, n_tiles * patches, -1)
    config = tiny.model.config.get_text_config()
    special = torch.tensor([0, config.bos_token_id, config.eos_token_id, MLLAMA_IMAGE])
    embed = tiny.model.get_input_embeddings()
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="reference") as handle:
        tiny.model(**inputs)
    for s in handle.last_selection:
        r, i = s.batch_row, s.image_index
        after = (ids[r] == MLLAMA_IMAGE).long().cumsum(0) > 0
        question = (attended[r] & after & ~torch.isin(ids[r], special)).nonzero()[:, 0]
        assert torch.equal(s.prompt_tokens, question)
        tiles = int(inputs["aspect_ratio_mask"][r, i].sum())
        order = zspa_kernels.select_tokens(states[r, i, None, : tiles * patches], embed(ids[r, question])[None],
                                           KEEP, backend="reference", pick_order=True)[0]
        assert torch.equal(s.order, order)


def _static_generate(tiny) -> None:
    if not tiny.static_generate:
        pytest.skip("the unpatched model's generate() fails on a static cache on this transformers")


@pytest.mark.parametrize("mode", ["greedy", "static"])
@torch.no_grad()
def test_cached_generation_equals_the_masked_model_without_a_cache(tiny, mode):
    """Every decode step's mask, rebuilt by the base model at full width, is gathered as the prefill's:
    each generated token's logits are the no-cache masked model's over the prompt and the tokens before."""
    if mode == "static":
        _static_generate(tiny)
    inputs = tiny.make_inputs(tiny.batch)
    gen = dict(do_sample=False, **(dict(cache_implementation="static") if mode == "static" else {}))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, output_logits=True,
                                  return_dict_in_generate=True, **gen)
        selection = handle.last_selection
    L = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, L:]
    with masked_keys(tiny, _kept_columns(tiny, inputs, selection)):
        ref = tiny.model(**_extended(inputs, tokens), use_cache=False).logits
    for t, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[:, L - 1 + t], atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref[:, L - 1:-1].argmax(-1))


@torch.no_grad()
def test_a_conversation_continues_on_its_pruned_cache(tiny):
    """A conversation's next turn: generate() given the whole conversation (prompt, answer, new text; its
    masks, the new tokens seeing what the last prompt token saw) and the first turn's cache, no pixel
    inputs. The sequence is the unpatched one; its cross-attention layers hold the kept tokens, and the
    turn's logits are the no-cache masked model's over the whole conversation."""
    inputs = tiny.make_inputs(tiny.batch)
    L = inputs["input_ids"].shape[1]
    gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
               return_dict_in_generate=True)
    pixels = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        first = tiny.model.generate(**inputs, **gen)
        selection = handle.last_selection
        answer = first.sequences[:, L:]
        turn = {k: v for k, v in _extended(inputs, torch.cat([answer, answer], 1)).items() if k not in pixels}
        second = tiny.model.generate(**turn, **cache_kwargs(tiny.model, kv_cache(first)), **gen)
    tokens = second.sequences[:, L:]
    with masked_keys(tiny, _kept_columns(tiny, inputs, selection)):
        ref = tiny.model(**_extended(inputs, tokens), use_cache=False).logits
    start = turn["input_ids"].shape[1] - 1
    for t, logits in enumerate(second.logits):
        torch.testing.assert_close(logits, ref[:, start + t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_beam_search_equals_the_masked_models(tiny):
    """generate() expands each row into its beams before the prefill (each selects alike) and reorders
    the cache's rows at every step: the kept columns of a row's beams are the same, so the layout holds."""
    inputs = tiny.make_inputs(tiny.batch)
    beams = 3
    gen = dict(max_new_tokens=NEW_TOKENS, num_beams=beams, num_return_sequences=2, do_sample=False,
               output_scores=True, return_dict_in_generate=True)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        out = tiny.model.generate(**inputs, **gen)
    expanded = {k: v.repeat_interleave(beams, 0) for k, v in inputs.items()}
    with masked_keys(tiny, _kept_columns(tiny, expanded, handle.last_selection)):
        ref = tiny.model.generate(**inputs, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=0)


@torch.no_grad()
def test_each_batch_row_equals_that_row_alone(tiny):
    """Rows of other image counts and tile counts (padding images, padded kept tokens) change nothing."""
    inputs = tiny.make_inputs(tiny.batch)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        batch = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, output_logits=True,
                                    return_dict_in_generate=True, do_sample=False)
        for r in range(len(tiny.batch)):
            alone_inputs = tiny.make_inputs([tiny.batch[r]], seeds=[r])
            alone = tiny.model.generate(**alone_inputs, max_new_tokens=NEW_TOKENS, output_logits=True,
                                        return_dict_in_generate=True, do_sample=False)
            assert torch.equal(alone.sequences[0, alone_inputs["input_ids"].shape[1]:],
                               batch.sequences[r, inputs["input_ids"].shape[1]:])
            for a, b in zip(alone.logits, batch.logits):
                torch.testing.assert_close(a[0], b[r], atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_selection_makes_as_many_ops_for_one_image_as_for_many(tiny):
    """The prefill's selection and layout (after its one host sync, where the GPU waits for each op) work on
    all images of a batch at once, in a fixed number of ops: the row with the most images, twice and six times
    over (not once: torch takes shortcuts on dimensions of size 1)."""
    row = max(tiny.batch, key=lambda r: sum(seg[0] == "image" for seg in r))
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle, ops_of(handle, "_select") as counted:
        for n in (2, 6):
            tiny.model(**tiny.make_inputs([row] * n, seeds=[0] * n))
            assert len(handle.last_selection) == n * sum(seg[0] == "image" for seg in row) > 0
    few, many = counted
    more, fewer = many - few, few - many
    assert not more and not fewer, f"ops that grow with the images: {dict(more)}; that shrink: {dict(fewer)}"


@torch.no_grad()
def test_a_deep_copy_or_a_pickle_of_a_pruned_cache_continues_its_sequence(tiny):
    """The layout travels with the cache: a hand-written decode loop on a deep copy, or on an unpickled
    copy, gives the original's logits bit for bit under any handle (the one that pruned it removed: unhooked,
    as for every family, a pruned cache meets the unpruned mask); a new prompt with images on a cache that
    holds the pruned ones is refused."""
    inputs = tiny.make_inputs(tiny.batch)
    B = inputs["input_ids"].shape[0]
    with capture_lm_calls(tiny.model) as full:
        tiny.model(**inputs)
    lm = tiny.model.model.language_model
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        out = tiny.model(**inputs, use_cache=True)
        cache, first = kv_cache(out), out.logits[:, -1:]
        copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
        # (Through the whole model, transformers' own code fails first there, unpatched too, each
        # release otherwise.)
        with pytest.raises(RuntimeError, match="already hold image tokens"):
            lm(input_ids=inputs["input_ids"], cross_attention_states=full[0]["cross_attention_states"],
               **cache_kwargs(lm, copy.deepcopy(cache)), use_cache=True)

    def decode(cache):
        mask, cross, steps = inputs["attention_mask"], inputs["cross_attention_mask"], [first]
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            cross = torch.cat([cross, cross[:, -1:]], 1)
            steps.append(tiny.model(input_ids=steps[-1].argmax(-1), attention_mask=mask,
                                    cross_attention_mask=cross[:, -1:] if OLD else cross, **cache_kwargs(tiny.model, cache),
                                    use_cache=True).logits[:, -1:])
        return torch.cat(steps, 1)

    with zspa_kernels.prune(tiny.model, keep=KEEP):
        expected = decode(cache)
        for other in copies:
            assert torch.equal(decode(copy.deepcopy(other)), expected)


@torch.no_grad()
def test_a_static_cache_holds_the_kept_tokens_first_and_masks_its_other_slots(tiny):
    """generate() sizes a static cache's cross-attention layers for the unpruned tokens (5.24); a reused
    one is reset, and its prompt pruned again."""
    _static_generate(tiny)
    inputs = tiny.make_inputs(tiny.batch)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with zspa_kernels.prune(tiny.model, keep=KEEP):
        dynamic = tiny.model.generate(**inputs, **gen)
        static = tiny.model.generate(**inputs, cache_implementation="static", **gen)
        again = tiny.model.generate(**inputs, cache_implementation="static", **gen)
    assert torch.equal(static, dynamic) and torch.equal(again, dynamic)


@torch.no_grad()
def test_a_text_only_prompt_runs_unpruned(tiny):
    inputs = tiny.make_inputs([[("text", 7)]])
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        assert torch.equal(tiny.model(**inputs).logits, expected)
        assert handle.last_selection == []


@torch.no_grad()
def test_a_row_with_images_and_no_question_is_refused_unless_diversity_only(tiny):
    inputs = tiny.make_inputs([[("text", 3), ("image", 2)]])
    inputs["input_ids"][0, :3] = 1  # bos only: no question text
    with zspa_kernels.prune(tiny.model, keep=KEEP), pytest.raises(ValueError, match="^prompt: a row with images"):
        tiny.model(**inputs)
    with zspa_kernels.prune(tiny.model, keep=KEEP, core_ratio=0.0) as handle:
        tiny.model(**inputs)
        assert handle.last_selection[0].n_core == 0


@torch.no_grad()
def test_a_bfloat16_model_keep_all_is_exact_and_pruned_matches_its_masked_reference():
    tiny = CROSS_ATTENTION_BUILDERS["mllama"]()
    tiny.model.to(torch.bfloat16)
    inputs = tiny.make_inputs(tiny.batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    expected = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=1.0):
        assert torch.equal(tiny.model(**inputs).logits, expected)
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        got = tiny.model(**inputs).logits
    with masked_keys(tiny, _kept_columns(tiny, inputs, handle.last_selection)):
        reference = tiny.model(**inputs).logits
    # bf16 sums in another order (~2e-3 here), far under what the dropped tokens change (~0.1)
    torch.testing.assert_close(got, reference, atol=0.01, rtol=0)
    assert (got.float() - expected.float()).abs().max() > 0.05


def test_a_refused_model_is_left_unpruned():
    """A refusal at install time (no tile geometry to split the images by) leaves no hook and no mark."""
    tiny = CROSS_ATTENTION_BUILDERS["mllama"]()
    vision = tiny.model.model.vision_model
    patches = vision.num_patches
    del vision.num_patches
    with pytest.raises(ValueError, match="^model: the Llama 3.2 Vision base model has no vision_model.num_patches"):
        zspa_kernels.prune(tiny.model, keep=KEEP)
    vision.num_patches = patches
    with zspa_kernels.prune(tiny.model, keep=KEEP) as handle:
        tiny.model(**tiny.make_inputs(tiny.single))
        assert handle.last_selection


# -- on a GPU (bench/run_gpu.sh's checks; skipped elsewhere) ---------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(tiny) -> dict:
    tiny.model.to("cuda")
    return {k: v.to("cuda") for k, v in tiny.make_inputs(tiny.batch).items()}


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@torch.no_grad()
def test_fused_backends_prune_like_the_reference_on_the_gpu(backend, monkeypatch):
    """Keep-all is the unpatched model bit for bit; every selection call replays against the fp64
    oracle, and where the picks equal the reference backend's, so do the logits."""
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    tiny = CROSS_ATTENTION_BUILDERS["mllama"]()
    inputs = _on_gpu(tiny)
    unpatched = tiny.model(**inputs).logits
    with zspa_kernels.prune(tiny.model, keep=1.0, backend=backend):
        assert torch.equal(tiny.model(**inputs).logits, unpatched)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="reference") as ref:
        expected = tiny.model(**inputs).logits
    calls, op = [], torch.ops.zspa.select_tokens

    def recording(*args):
        calls.append((args, op(*args)))
        return calls[-1][1]

    monkeypatch.setattr(torch.ops.zspa, "select_tokens", recording)
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend=backend) as handle:
        got = tiny.model(**inputs).logits
    assert calls and all(args[7] == backend for args, _ in calls)
    for (visual, prompt, k, core_ratio, lengths, mask, relevance, _, pick_order), picks in calls:
        assert pick_order and picks.device.type == "cuda"
        for b in range(visual.shape[0]):
            row = Row(visual[b].double().cpu().numpy(), prompt[b].double().cpu().numpy(), mask[b].cpu().numpy(),
                      int(lengths[b]), k, core_ratio, relevance)
            replay(row, picks[b].tolist(), TOLERANCE[backend][visual.dtype])
    if all(torch.equal(a.order, b.order) for a, b in zip(handle.last_selection, ref.last_selection)):
        assert torch.equal(got, expected)


@gpu
@torch.no_grad()
def test_the_hooks_wait_for_the_gpu_once_a_prefill_and_never_at_a_decode_step():
    """cross_attention.py's promise: this package's code syncs once a prefill with images (the ids and
    the mask, the tiles arriving with them; the copy PruneHandle._host_copy makes for both handles) and never at a decode step (torch.cuda.set_sync_debug_mode
    names every synchronising call; transformers' own are the model's, pruned or not)."""
    import linecache
    import pathlib
    import warnings

    tiny = CROSS_ATTENTION_BUILDERS["mllama"]()
    inputs = _on_gpu(tiny)
    package = pathlib.Path(zspa_kernels.__file__).parent
    with zspa_kernels.prune(tiny.model, keep=KEEP, backend="triton") as handle:
        tiny.model.generate(**inputs, max_new_tokens=1, do_sample=False)  # compiles the kernels
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tiny.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert handle.last_selection
    ours = [(pathlib.Path(w.filename).name, linecache.getline(w.filename, w.lineno).strip()) for w in caught
            if "synchronizing CUDA operation" in str(w.message) and package in pathlib.Path(w.filename).parents]
    assert ours == [source_site(PruneHandle._host_copy, ".cpu()")], ours  # the copy both handles make
