"""Independent references for the prune tests: what the language model receives, and
what it computes without a cache over a given (pruned) prefix."""
from __future__ import annotations

import collections
import contextlib
import inspect

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import zspa_kernels

from zspa_kernels.integrations.transformers.families import find_family, split_model


def source_site(function, text: str) -> tuple[str, str]:
    """(file name, stripped source line) of the one line of ``function`` that holds ``text``: a sync
    site as the GPU tests name them (the file and line a synchronising call's warning points at),
    read from the code itself so that an edit of that line cannot leave a test naming a line gone."""
    import pathlib

    lines = [line.strip() for line in inspect.getsource(function).splitlines() if text in line]
    assert len(lines) == 1, (function, text, lines)
    return pathlib.Path(inspect.getsourcefile(function)).name, lines[0]


def next_turn(inputs: dict, sequences: torch.Tensor, text: torch.Tensor) -> dict:
    """A conversation's next turn, as a caller gives it with the cache of the first: the whole
    conversation's ids (the first turn's prompt and answer, then ``text``) and mask, per-token types
    padded for the text, no pixel inputs (the first turn's images are in the cache)."""
    ids = torch.cat([sequences, text], 1)
    turn = dict(input_ids=ids, attention_mask=torch.nn.functional.pad(inputs["attention_mask"],
                                                                      (0, ids.shape[1] - inputs["input_ids"].shape[1]),
                                                                      value=1))
    for name in ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids"):
        if inputs.get(name) is not None:  # the new tokens are text
            turn[name] = torch.nn.functional.pad(inputs[name], (0, ids.shape[1] - inputs[name].shape[1]))
    return turn


def masked_out(inputs: dict, kept_positions: torch.Tensor, image_token: int) -> dict:
    """``inputs`` with every image token not in ``kept_positions`` (``(B, L')``, -1 padded, as
    ``PruneHandle.last_kept_positions``) masked out of the 2-D attention mask: the unpatched model that
    a pruned one must equal where nothing counts cache slots."""
    kept = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    for row, positions in enumerate(kept_positions.cpu()):
        kept[row, positions[positions >= 0]] = True
    dropped = (inputs["input_ids"] == image_token) & ~kept
    return dict(inputs, attention_mask=inputs["attention_mask"].masked_fill(dropped, 0))


def static_cache(model, batch: int, length: int):
    """A ``StaticCache`` of ``length`` slots for ``model``'s language model, as this transformers
    version builds one (4.x also wants the batch, device and dtype up front)."""
    from transformers import StaticCache

    kwargs = dict(config=model.config.get_text_config(), max_cache_len=length)
    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:
        kwargs.update(max_batch_size=batch, device=model.device, dtype=model.dtype)
    return StaticCache(**kwargs)


def lm_of(model):
    return split_model(model, find_family(model))[1]


@contextlib.contextmanager
def capture_lm_calls(model):
    """Record the keyword arguments the language model receives (after any other hook). A language
    model that embeds its ``input_ids`` itself (Phi-4-multimodal: ``Family.embed``) is recorded with
    the embeddings its forward computes from them."""
    calls = []
    embed = find_family(model).embed

    def record(module, args, kwargs):
        kwargs = dict(kwargs)
        if embed is not None:
            with torch.no_grad():
                args, kwargs = embed(module, args, kwargs)
        calls.append(kwargs)

    hook = lm_of(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def padding_mask(mask, like: torch.Tensor = None) -> torch.Tensor:
    """The 2-D mask behind a captured mask argument (Gemma gets a dict of 4-D masks, PaliGemma one
    4-D mask: the last query row of a prefill attends to every non-padding key). None (no padding:
    transformers 5.24+'s generate() drops a mask of ones, and Gemma 4's masks are then built without
    one): ones over ``like``'s batch and length."""
    if isinstance(mask, dict):
        mask = mask["full_attention"]
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.long, device=like.device)
    if mask.dim() == 4:
        row = mask[:, 0, -1]
        return (row if row.dtype == torch.bool else row == 0).long()
    return mask


def token_types_arg(model):
    """The base model's argument marking visual tokens, where its masks depend on them (Gemma)."""
    family = find_family(model)
    return family.token_types_arg if family.build_mask is not None else None


def no_cache_logits(model, prefill: dict, decode_positions: list, tokens: torch.Tensor, rows,
                    image_features=None):
    """Logits over ``prefill``'s (pruned) inputs plus all but the last of ``tokens``,
    without a cache; ``decode_positions`` are their positions. With ``image_features``
    (Gemma: masks depend on which slots hold image tokens) the base model builds the
    masks itself from token types found by matching the prefix embeddings to them.
    Per-layer inputs (Gemma4, Gemma 3n): the prefill's, then those of ``tokens`` by their ids."""
    tokens = tokens[:, :-1]
    # Gemma4's base models embed placeholder ids as padding, Muse Glimmer's and Muse Spark's as id 0,
    # even generated ones.
    if model.config.model_type in ("gemma4", "gemma4_unified", "muse_glimmer", "muse_spark"):
        placeholders = torch.tensor([getattr(model.config, f"{kind}_token_id", None) or -1
                                     for kind in ("image", "video", "audio")])
        padding = model.config.get_text_config().pad_token_id if "gemma" in model.config.model_type else 0
        tokens = tokens.masked_fill(torch.isin(tokens, placeholders), padding)
    prefix = prefill["inputs_embeds"][rows]
    embeds = torch.cat([prefix, token_embeddings(model, tokens)], 1)
    mask = padding_mask(prefill["attention_mask"], prefill["inputs_embeds"])[rows][:, : prefix.shape[1]]
    mask = torch.cat([mask, mask.new_ones(len(rows), tokens.shape[1])], 1)
    # Positions of batch size 1 are the whole batch's (EXAONE 4.5 numbers decode steps by the cache length).
    batch = prefill["inputs_embeds"].shape[0]
    positions = torch.cat([p.expand(*p.shape[:-2], batch, -1)[..., rows, :]
                           for p in [prefill["position_ids"], *decode_positions]], -1)
    extra = {}
    if prefill.get("visual_pos_masks") is not None:  # Qwen3-VL deepstack features
        visual = prefill["visual_pos_masks"]
        expanded = visual.shape[2:]  # transformers 4.57's Qwen3-Omni: expanded over the hidden size
        if expanded:
            visual = visual[..., 0]
        owner = visual.nonzero()[:, 0]  # batch row of each deepstack feature row
        chosen = torch.isin(owner, torch.tensor(rows))
        visual = torch.nn.functional.pad(visual[rows], (0, tokens.shape[1]))
        extra["visual_pos_masks"] = visual[..., None].expand(*visual.shape, *expanded) if expanded else visual
        extra["deepstack_visual_embeds"] = [e[chosen] for e in prefill["deepstack_visual_embeds"]]
    if prefill.get("moe_mm_token_type_ids") is not None:  # ERNIE-4.5-VL: generated tokens are text
        extra["moe_mm_token_type_ids"] = torch.nn.functional.pad(prefill["moe_mm_token_type_ids"][rows],
                                                                 (0, tokens.shape[1]))
    if prefill.get("vision_mask") is not None:  # Granite 4 Vision's features, added inside the language model
        visual = prefill["vision_mask"][..., 0]
        chosen = torch.isin(visual.nonzero()[:, 0], torch.tensor(rows))
        extra["vision_mask"] = torch.nn.functional.pad(visual[rows], (0, tokens.shape[1]))[..., None]
        extra["deepstack_features"] = {layer: f[chosen] for layer, f in prefill["deepstack_features"].items()}
    if prefill.get("ple_input_ids") is not None:  # Qwen4-Exp's per-layer n-gram embeddings read the ids
        extra["ple_input_ids"] = torch.cat([prefill["ple_input_ids"][rows], tokens], 1)
    decoder = lm_of(model)
    if prefill.get("per_layer_inputs") is not None:
        if len(inspect.signature(decoder.get_per_layer_inputs).parameters) == 1:
            # Gemma 3n: by their ids, those past its per-layer table (vision, audio) as padding
            # (transformers 4.57's base model maps them, later language models do it themselves).
            outside = tokens >= model.config.get_text_config().vocab_size_per_layer_input
            generated = decoder.get_per_layer_inputs(tokens.masked_fill(outside, 0))
        else:
            generated = decoder.get_per_layer_inputs(tokens, model.get_input_embeddings()(tokens))
        extra["per_layer_inputs"] = torch.cat([prefill["per_layer_inputs"][rows], generated], 1)
    if model.config.model_type == "paligemma" and image_features is not None:
        # The prompt is PaliGemma's bidirectional prefix (type 0), the generated tokens its causal
        # suffix (type 1); transformers 4.57 reads the token types only beside labels.
        extra["token_type_ids"] = torch.cat([torch.zeros_like(mask[:, : prefix.shape[1]]),
                                             torch.ones_like(tokens)], 1)
        if "labels" in inspect.signature(model.model.forward).parameters:
            extra["labels"] = extra["token_type_ids"]
        decoder = model.model
    elif image_features is not None:
        is_image = (embeds[:, :, None] == image_features[None, None]).all(-1).any(-1)
        extra[token_types_arg(model)] = is_image.long()
        decoder = model.model
    # transformers 4.57's Gemma 3n shares KV between its last layers only through a cache (without one
    # they project their own, which checkpoints do not hold): its one forward runs over a fresh cache.
    fresh_cache = model.config.model_type == "gemma3n" and transformers.__version__.startswith("4.")
    with slots_numbered_by_the_model(model):
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         use_cache=fresh_cache, **extra).last_hidden_state
    return lm_head(model, hidden)


@contextlib.contextmanager
def slots_numbered_by_the_model(model):
    """The modules that read ``position_ids`` as cache slots (``Family.slot_position_modules``: MiniMax-M3's
    sparse attention) handed none, so that the model numbers the slots itself (MiniMax-M3's attention:
    the keys' last ``q``), while its rotary embedding reads the positions given: the no-cache truth
    of a pruned run, whose tokens fill the slots in order and keep their original positions."""
    find = find_family(model).slot_position_modules
    hooks = [] if find is None else [
        m.register_forward_pre_hook(lambda m, args, kwargs: (args, {k: v for k, v in kwargs.items()
                                                                    if k != "position_ids"}), with_kwargs=True)
        for m in find(lm_of(model))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def token_embeddings(model, tokens: torch.Tensor) -> torch.Tensor:
    """The embeddings the base model gives generated ``tokens``: its text table's, but Gemma 3n's
    base model embeds the ids of its vision and audio ranges with their own tables (each an offset
    past the text ids), generated or not."""
    embeds = model.get_input_embeddings()(tokens)
    if model.config.model_type != "gemma3n":
        return embeds
    for embedder in (model.model.embed_vision, model.model.embed_audio):
        inside = (tokens >= embedder.vocab_offset) & (tokens < embedder.vocab_offset + embedder.vocab_size)
        own = embedder(input_ids=torch.where(inside, tokens, embedder.vocab_offset))
        embeds = torch.where(inside[..., None], own.to(embeds.dtype), embeds)
    return embeds


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The wrapper's logits of the base model's ``hidden`` states: its LM head, its division by the
    text config's ``logits_scaling`` where the wrapper divides (Granite 4 Vision; HyperCLOVAX vision
    v2 multiplies), its product with the wrapper's ``logit_scale`` where it has one (Cohere
    Compass), with the text config's ``logit_scale`` where the wrapper reads it (Aya Vision from
    transformers 5.25) or with its ``output_multiplier`` (Muse Glimmer/Spark), then the text
    config's final soft-capping where the wrapper applies it (Gemma3/4 do; PaliGemma's wrapper only
    from transformers 5.24 on, though PaliGemma 2's config always sets it; Inkling2's by a module).
    Inkling's divides the hidden states by ``logits_mup_width_multiplier`` first, and cuts the
    logits to ``unpadded_vocab_size``; Chameleon's sets its image codes' logits to the lowest value."""
    source = inspect.getsource(type(model).forward)
    if "logits_mup_width_multiplier" in source:  # Inkling divides the hidden states first
        hidden = hidden / model.config.get_text_config().logits_mup_width_multiplier
    head = model.get_output_embeddings()
    if head is None:  # Nemotron-H Omni: the wrapper holds its causal LM, which holds the head
        head = model.language_model.get_output_embeddings()
    logits = head(hidden)
    unpadded = getattr(model.config.get_text_config(), "unpadded_vocab_size", None)
    if unpadded is not None and "unpadded_vocab_size" in source:  # Inkling: the head's padding rows cut
        logits = logits[..., :unpadded]
    if "* self.config.text_config.logits_scaling" in source:  # HyperCLOVAX vision v2 multiplies
        logits = logits * model.config.get_text_config().logits_scaling
    elif "logits_scaling" in source:  # Granite 4 Vision
        logits = logits / model.config.get_text_config().logits_scaling
    if getattr(model, "logit_scale", None) is not None:  # Cohere Compass
        logits = logits * model.logit_scale
    elif "* self.config.text_config.logit_scale" in source:  # Aya Vision from transformers 5.25 (Cohere's)
        logits = logits * model.config.get_text_config().logit_scale
    if "vocabulary_mapping.image_tokens" in source:  # Chameleon: no image code is generated
        logits[..., model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
    if "output_multiplier" in source:  # Muse Glimmer/Spark, ahead of their soft-cap
        logits = logits * model.config.get_text_config().output_multiplier
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None or not ("final_logit_softcapping" in source or hasattr(model, "logit_softcap")):
        return logits
    return torch.tanh(logits / cap) * cap


def image_features_of(model, inputs):
    """The visual feature rows the unpatched model merges in, where masks depend on them."""
    key = token_types_arg(model)
    if inputs.get(key) is None:
        return None
    with capture_lm_calls(model) as calls, torch.no_grad():
        model(**inputs)
    return calls[0]["inputs_embeds"][inputs[key].bool()]


def unpruned_decode_positions(model, inputs, new_tokens: int, **gen):
    """Positions the unpatched model gives each generated token (they do not depend on
    the tokens' values). Where ``generate()`` passes none (HyperCLOVAX vision v2), the language
    model numbers a token by its cache's length: the prompt's, padding included, plus the step."""
    with capture_lm_calls(model) as calls, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, **gen)
    length = inputs["input_ids"].shape[1]
    return [c["position_ids"] if c["position_ids"] is not None else torch.full((1, 1), length + step)
            for step, c in enumerate(calls[1:])]


def pruned_generation(model, inputs, keep, backend: str = "auto", **gen):
    """A pruned greedy ``generate()`` of ``inputs``, logits kept: ``(output, each image's pick order)``."""
    with zspa_kernels.prune(model, keep=keep, backend=backend) as handle:
        out = model.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True, **gen)
    return out, [s.order for s in handle.last_selection]


def assert_same_generation(got, expected, atol: float) -> None:
    """Two :func:`pruned_generation` results: the same picks and ids, logits within ``atol``."""
    (out, orders), (ref, ref_orders) = got, expected
    assert len(orders) == len(ref_orders) and all(torch.equal(a, b) for a, b in zip(orders, ref_orders))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


class DispatchedOps(TorchDispatchMode):
    """Counts the ops that reach torch's dispatcher while active, by name (``calls``): kernels and views, not
    metadata reads (a tensor's shape or size); an op's own ops (a custom op's implementation) run outside the
    mode, uncounted."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def ops_of(handle, method: str):
    """While inside, each call of ``handle``'s ``method`` appends its ops (:class:`DispatchedOps`) to the list
    yielded; the pre-hooks look the method up at every call."""
    counted, wrapped = [], getattr(handle, method)

    def counting(*args, **kwargs):
        with DispatchedOps() as mode:
            out = wrapped(*args, **kwargs)
        counted.append(mode.calls)
        return out

    setattr(handle, method, counting)
    try:
        yield counted
    finally:
        delattr(handle, method)
