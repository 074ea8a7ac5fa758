"""Forward hooks that run a VLM's language model on the selected visual tokens only.

``register_forward_pre_hook(with_kwargs=True)`` hooks, no model code patched (one attribute aside:
where the base model passes a dict of masks on untouched, the model's ``create_masks_for_generate``
while the handle lives, :class:`_GenerateMasks`):

* on the base model (``model.model``): remembers the keyword arguments of the call
  (``input_ids`` say where image/video tokens sit; pixel inputs or already encoded
  images say how many tokens each image has); on decode steps over a pruned cache it
  supplies the original position numbering when the caller gave none;
* on the language model: at prefill (empty cache) it selects tokens per image
  with one ``zspa::select_tokens`` call, then gathers ``inputs_embeds``, the
  ORIGINAL ``position_ids`` (every row of an M-RoPE tensor) and an explicit 2-D
  attention mask (a missing mask with gaps in the positions would be read as
  packed sequences), left-padding rows that kept different counts. A prompt whose
  images arrive on a dynamic cache it did not prefill (a cached prefix) is pruned
  the same way after the cached tokens (:meth:`PruneHandle._offset_refusal`). At decode it
  replaces the mask, which ``generate()`` keeps at the original length, by the
  pruned one plus the new tokens, and remaps ``cache_position`` (transformers
  4.x) to cache slots;
* on the ``...ForConditionalGeneration`` wrapper (a pre- and a post-hook): takes
  ``labels`` away and computes the loss from the labels of the kept positions.

Host syncs: one copy of ``input_ids`` and the 2-D mask (and ``labels``, when given) to the
host per prefill that brings images (:func:`_brings_images`; none for one without), to find the
images, the prompt and the size of the gathered sequence (its length is a shape); the integer
inputs that size the images (``families.COUNT_INPUTS``: Pixtral's ``image_sizes``, grids,
crop masks) are copied to the host asynchronously just before it and arrive with it, and a
static cache's length (kept on the device) is read right before it, with nothing queued in
between.
What the host computes from them goes back to the device from pinned memory,
asynchronously (:func:`.selection.to_device`): the host queues the selection, the
gathers and the language model without waiting for any of them. Decode steps add no
sync, static caches included: a pruned cache is known by this handle until it is reset.
Several tokens on a pruned cache: a conversation's turn without a mask reads its repeated ids
back (:meth:`PruneHandle._repeats`), and a step that brings images under another name than
``pixel_values`` whether its ids hold image tokens (:meth:`PruneHandle._merges_images`).

The language model returns ``L'`` (pruned) positions at prefill, so logits of a
pruned forward are shorter than ``input_ids``; the last position is unchanged.
"""
from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Union

import torch

from ...checks import check_options
from ...spec import as_keep, release
from .families import (COUNT_INPUTS, RUN_IDS, RUN_ROWS, Family, answer_header_runs, answer_positions, blank_token_ids,
                       cut_run, special_token_ids, split_model, template_positions, template_token_runs,
                       text_tokenizer, tokenizer_special_ids)
from .selection import (ImageSelection, columns_to_device, keep_picks, padded_positions, select_images,
                        to_device, to_host)

PROMPTS = ("question", "all_text")


def _new_pixels(kwargs: dict) -> bool:
    """Whether a call brings pixels to encode: any ``pixel_values*`` input, but for local crops without
    their images' ``pixel_values`` (transformers 5.17's generate() forwards Step3p7's and DeepSeek-OCR-2's
    ``pixel_values_local`` at every decode step, which their models read only beside ``pixel_values``)."""
    return any(k.startswith("pixel_values") and v is not None
               and not (k == "pixel_values_local" and kwargs.get("pixel_values") is None)
               for k, v in kwargs.items())


REUSE_ERROR = (
    "zspa_kernels.prune: this KV cache holds a pruned prefill. It can be extended one token at a time by the "
    "generation that built it, by new tokens alone (assisted and prompt-lookup decoding's drafts: with the "
    "conversation's attention mask, or without one at most as many as the prefill dropped), or by a "
    "conversation's next turn without images: generate() given the whole conversation's input_ids and "
    "attention_mask, no pixel inputs, and this (dynamic) cache; by hand, input_ids[:, cache.get_seq_length():] "
    "of the conversation. Anything else would run new images unpruned, or misplace tokens (a static cache, "
    "a 4-D mask, a mask whose width counts neither): run the whole conversation again without the cache. "
    "Nor is a chunked prefill (generate(prefill_chunk_size=...)) supported: pass prefill_chunk_size=None."
)
TURN_IDS_ERROR = (
    "zspa_kernels.prune: this KV cache holds a pruned prefill, and input_ids without an attention mask do not "
    "read as a conversation's next turn on it: a turn passes the conversation from the cache's length on "
    "(generate() does so when given the whole conversation), whose first {old} tokens repeat those the cache "
    "holds there (the unpruned positions {start} to {end}), and these do not. Build the conversation from the "
    "generated sequence (out.sequences, then the new turn's ids): an answer decoded and tokenized again can "
    "come out as other ids. New tokens alone, more than the {old} dropped, need the conversation's attention "
    "mask, whose width tells them from a turn; or run the whole conversation again without the cache."
)
# Both refuse what a prefill of part of a prompt would need: the selection ranks an image's tokens by the
# prompt's text (which may follow the image) and gives each image its own budget, so it needs the whole
# prompt, and each image's features apart, in one prefill on an empty cache.
CHUNKED_ERROR = (
    "zspa_kernels.prune: a chunked prefill (generate(prefill_chunk_size=...)) cannot be pruned: it feeds "
    "the prompt in parts and the images' features merged into one, and the selection needs the whole prompt "
    "and each image apart in one prefill. Pass prefill_chunk_size=None (pruning shortens the prompt anyway)."
)
CONTINUED_ERROR = (
    "zspa_kernels.prune: images arrive on a KV cache that already holds tokens of this sequence, which the "
    "hooks did not prefill (a cached prefix: prompt caching; a conversation whose earlier turns brought no "
    "image), and {why}. Run the whole prompt (conversation) again without the cache, or remove() the handle "
    "to run it unpruned."
)
LOST_ERROR = (
    "zspa_kernels.prune: this KV cache holds a pruned prefill whose layout (kept positions, mask) is lost: "
    "only the prune() handle that built it knew the layout, and that handle was removed or the cache was "
    "pickled. Run the prompt again on a new cache (copy.deepcopy, unlike pickling, keeps the layout)."
)
DRAFTS_ERROR = (
    "zspa_kernels.prune: new tokens alone on a pruned KV cache (assisted or prompt-lookup decoding's drafts) "
    "need transformers 5.14 or later, found {found}: earlier releases crop the rejected drafts to a length "
    "counted in the unpruned numbering, which a pruned cache never has, so they would stay in it. Upgrade "
    "transformers, or generate without assistant_model / prompt_lookup_num_tokens, or without pruning."
)
# transformers 5.14 crops the rejected drafts of assisted decoding by count (cache.crop(-n)), earlier releases
# to the unpruned length.
CROPS_BY_COUNT = (5, 14)
CROP_ERROR = (
    "zspa_kernels.prune: this pruned KV cache no longer holds what its generation appended: it was extended "
    "outside it, or cropped into its prompt, or cropped to a length counted in the unpruned numbering. A crop by "
    "count (cache.crop(-n)) may take back the tokens appended since the prefill, and the drafts prefilled with "
    "the prompt where the call said so (logits_to_keep = drafts + 1, as transformers 5's assisted and "
    "prompt-lookup decoding pass it; a model whose forward takes no logits_to_keep gets drafts it cannot tell "
    "from the prompt). Transformers 4.x's assisted decoding crops to the unpruned length, which a pruned cache "
    "never has. Generate without assistant_model / prompt_lookup_num_tokens there, or without pruning."
)


@dataclass
class Prefill:
    """What a family's ``on_prefill`` gets: the gather it must apply to its own inputs."""

    kwargs: dict  # the language model's keyword arguments, already gathered
    index: torch.Tensor  # (B, L') original position of each kept slot
    valid: torch.Tensor  # (B, L') False on slots added by left re-padding
    n_visual_kept: int  # visual tokens kept in the whole batch


@dataclass
class _CacheState:
    """The pruned layout of a cache built by a hooked prefill."""

    mask: torch.Tensor  # (B, L') pruned 2-D attention mask
    original_len: int  # L
    pruned_len: int  # L'
    # (..., B, 1) original position of the first new token, as generate() continues a prompt (one past its
    # last token's position; a turn's own numbering, below, after a conversation's next turn).
    next_position: torch.Tensor
    # (..., B, 1) where the model numbers a token after the prompt when the caller gives no positions, and a
    # conversation's next turn (_next_positions): next_position's but on M-RoPE rows, whose largest may pass
    # the last token's.
    restart_position: torch.Tensor
    # Tokens appended since the prefill, for caches that keep their length on the host
    # (dynamic layers): a static cache's decode steps never count in Python (see _decode_step).
    grown: int = 0
    # Static caches only: the mask of every decode step, (B, the cache's full length): the
    # pruned mask, then ones (causality hides the slots not yet written). One shape and no
    # Python counter, so a decode step compiled by generate() (it compiles static-cache decoding
    # on GPUs) is traced once, not once a step.
    decode_mask: Optional[torch.Tensor] = None
    # Static caches: the caller's ``cache_position`` of this decode step (or None), as the base model's
    # hook saw it (the language model's may carry the base model's own slots), wrapped in a tuple; the
    # language model's hook counts the appended tokens from it (see PruneHandle._base_pre_hook).
    caller_slots: Optional[tuple] = None
    # The prefill's gather: (index, valid) as ``Prefill``'s, for readers of the cache that bring masks of the
    # unpruned prompt, or none (a block diffusion decoder, block_diffusion.py).
    layout: Optional[tuple] = None
    # That decoder's masks for the canvas being denoised: (the caller's masks, tokens appended since the
    # prefill, the canvas's length, the masks built for the pruned cache), built once a canvas.
    decoder_masks: Optional[tuple] = None
    # Whether the prefill dropped tokens (keep-all: the cache is the unpatched model's, its readers left alone).
    dropped: bool = False
    # Whether the prefill dropped tokens and its decode steps' tokens are handed their slots
    # (Family.slot_position_modules).
    counts_slots: bool = False
    # Whether several tokens were appended at once (a conversation's next turn, or new tokens alone: assisted
    # decoding's drafts; PruneHandle._several_tokens): the hooks then number every later token themselves, in
    # the unpruned numbering, whatever positions the caller gives. generate() computes a turn's positions for
    # the whole conversation, and Qwen's (M-RoPE) take the image tokens past the pruned cache's length for new
    # ones: without their grids it numbers everything as text, then continues from those positions at every step.
    numbered: bool = False
    # Trailing prompt tokens the prefill scored (``logits_to_keep`` - 1 of them: assisted decoding's first drafts;
    # at keep-all, any), text attended in every row, not yet cropped: what a crop may take back from the prefill.
    scored: int = 0
    # Dynamic layers: the ids the sequence consumed, in the unpruned numbering (the prompt's, then each step's:
    # references, no copy), for a turn given without a mask (_several_tokens); None once a step came without ids.
    tokens: Optional[list] = None


# The token types that generate() passes a base model beside the ids, besides a family's own
# (Family.token_types_arg).
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")
# The per-token inputs that generate() passes a base model beside the ids (sliced as the ids), cut with them
# where a conversation's next turn repeats tokens the cache holds (PruneHandle._several_tokens); and a family's
# token types.
TURN_INPUTS = ("input_ids", "position_ids", *TOKEN_TYPE_INPUTS)

# transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``.
CACHE_ARGS = ("cache", "past_key_values")


# Inputs that bring images besides ``pixel_values*``: pixels under other names (Phi-4-multimodal's, Fuyu's up
# to transformers 5.17, DeepSeek-VL-Hybrid's high-resolution copy), and images already encoded, by the
# caller (Idefics2/3 and SmolVLM up to 5.17 take the connector's output) or by generate() (5.24+ runs the
# vision tower ahead of the prefill).
IMAGE_INPUTS = ("image_pixel_values", "image_patches", "high_res_pixel_values", "image_hidden_states",
                "mm_encoder_outputs")


def _brings_images(kwargs: dict) -> bool:
    """Whether a call brings images or videos for the model to merge. Without any, the model embeds a
    prompt's image tokens as text (transformers 5's assisted decoding gives an assistant model the
    prompt's ids alone), and the hooks leave it so."""
    return _new_pixels(kwargs) or any(
        v is not None and not (isinstance(v, dict) and all(e is None for e in v.values()))
        for v in map(kwargs.get, IMAGE_INPUTS))


def _chunk_features(kwargs: dict) -> bool:
    """Whether the encoded features a call brings are a chunked prefill's: transformers' generate()
    (5.24+, ``prefill_chunk_size``) passes each chunk the features of the placeholders it holds, all
    images' rows in one, as pooled features alone (its ``_slice_mm_encoder_output``), where the encoder's
    own output also holds its hidden states (or its image codes). Read as given, they would make one
    image of several. (A caller's own ``mm_encoder_outputs`` of that form, pooled features of one image
    alone, reads the same and is refused too: pass the encoder's output as it returns it.)"""
    for output in (kwargs.get("mm_encoder_outputs") or {}).values():
        if output is None or not hasattr(output, "keys"):
            continue
        pooled = output.get("pooler_output")
        flat = (isinstance(pooled, (list, tuple)) and len(pooled) == 1
                or isinstance(pooled, torch.Tensor) and pooled.dim() == 3 and pooled.shape[0] == 1)
        if flat and set(output.keys()) <= {"pooler_output", "deepstack_features"}:
            return True
    return False


def _cache_of(kwargs: dict):
    return next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)


def kv_cache(output):
    """The KV cache of a model or ``generate()`` output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)``: transformers 5.24 renamed the cache
    argument ``past_key_values`` to ``cache``. A conversation's next turn passes the last turn's cache so."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _seq_length(cache):
    """``cache.get_seq_length()`` as transformers 5.24 answers it: where the first layer is a
    linear-attention one (a convolution's or a recurrence's state: LFM2, Qwen3.5, Nemotron-H), the
    first attention layer's length. 5.25 answers with the first layer's own count, which a
    linear-attention layer keeps in a device tensor: read back, a host sync at every decode step,
    where the attention layer's keys hold the same length on the host (dynamic layers)."""
    from transformers.cache_utils import CacheLayerMixin

    layers = getattr(cache, "layers", None)
    if layers and not isinstance(layers[0], CacheLayerMixin):
        first = next((i for i, layer in enumerate(layers) if isinstance(layer, CacheLayerMixin)), None)
        if first is not None:
            return cache.get_seq_length(first)
    return cache.get_seq_length()


def _is_empty(cache) -> bool:
    """A host sync where the cache keeps its length on the device (static layers): only asked
    once a prompt, or of a cache this handle did not prune (see :func:`_host_length`)."""
    return bool(_seq_length(cache) == 0)


class _CacheWatch:
    """Kept on every cache a hooked prefill pruned (``cache._zspa_watch``, set by
    :meth:`PruneHandle._watch`): the handles that know the cache's pruned layout, held weakly, as
    the cache itself is (no cycle: a dropped cache is freed at once).

    * ``copy.deepcopy`` of the cache (prompt caching, branching a generation) deep-copies the
      watch, and that gives the copy the original's layout with each of those handles: the copy
      then continues the pruned sequence, or refuses a new prompt, exactly as the original does
      (an untracked copy decoded at the pruned cache's slot numbers: silently wrong logits).
      The copy's state is a copy too; a reset or a step of the copy never touches the original.
    * On a cache that keeps its length on the device, :meth:`reset` is also ``cache.reset``: it
      drops those handles' state of the cache, then calls the class's own ``reset``.
    * ``lost``: the cache holds a pruned prefill whose layout no handle knows any more. A pickled
      cache (a generate() output saved, or sent to another process) unpickles so if a handle held
      its layout; :meth:`PruneHandle.remove` marks the caches it held so. The hooks of a later
      handle refuse to extend such a cache (:data:`LOST_ERROR`) until it is emptied."""

    __slots__ = ("owner", "handles", "lost")

    def __init__(self, cache, lost: bool = False):
        self.owner, self.handles, self.lost = weakref.ref(cache), weakref.WeakSet(), lost

    def reset(self, *args, **kwargs):
        cache = self.owner()
        if cache is None:  # reset() looked up on a cache nobody holds any more: nothing to reset
            return None
        for handle in list(self.handles):
            handle._caches.pop(cache, None)
        self.lost = False
        return type(cache).reset(cache, *args, **kwargs)

    def __deepcopy__(self, memo):
        original = self.owner()
        copied = memo.get(id(original)) if original is not None else None
        if copied is None:  # the watch copied without its cache: nothing to follow
            return self
        watch = _CacheWatch(copied, self.lost)
        for handle in list(self.handles):
            state = handle._caches.get(original)
            if state is not None:  # its tensors are shared: no step writes them in place
                handle._caches[copied] = replace(state, caller_slots=None,
                                                 tokens=None if state.tokens is None else list(state.tokens))
                watch.handles.add(handle)
        return watch

    def __reduce__(self):
        cache = self.owner()
        held = self.lost or (cache is not None and any(cache in h._caches for h in self.handles))
        return _CacheWatch, (cache, held)


def _refuse_lost(cache) -> None:
    """Raise :data:`LOST_ERROR` on a cache that holds a pruned prefill no handle knows (its length
    is read back for such a cache only); once it is found empty, it is a cache like any other."""
    watch = cache.__dict__.get("_zspa_watch")
    if isinstance(watch, _CacheWatch) and watch.lost:
        if not _is_empty(cache):
            raise RuntimeError(LOST_ERROR)
        watch.lost = False


def _host_length(cache) -> Optional[int]:
    """``cache``'s length where the host holds it (dynamic layers: their keys' shape), else None:
    a static layer keeps it in a device tensor, and reading that back waits for the GPU."""
    length = _seq_length(cache)
    return None if isinstance(length, torch.Tensor) else int(length)


def _static_length(cache) -> Optional[int]:
    """The full length of a cache whose layers are allocated ahead (static, hybrid: the caches
    ``generate()`` compiles decoding for), else None (dynamic layers grow)."""
    if not getattr(cache, "is_compileable", False):
        return None
    lengths = []
    for layer in getattr(cache, "layers", ()):
        n = getattr(layer, "max_cache_len", None)
        if isinstance(n, int) and n > 0:
            # UnlimitedOCR's reference sliding-window layers hold a prompt in slots of their own ahead of
            # their window (prefill_max_cache_len of them): the positions their masks index span both.
            lengths.append(n + getattr(layer, "prefill_max_cache_len", 0))
    return max(lengths) if lengths else None


def _appended(state: "_CacheState", cache, position: Optional[torch.Tensor]) -> torch.Tensor:
    """Tokens appended to a static cache since its pruned prefill, without a count of this
    handle's, from the caller's ``position`` (generate()'s ``cache_position``, transformers 4.x),
    which counts the original positions; without it, the cache's length, which the model itself reads to
    number the new slot (a device tensor on full-attention layers; 5.x sliding-window layers keep
    a Python integer, and a compiled step guards on it, pruned or not)."""
    if position is not None:
        return position[:1] - state.original_len
    return cache.get_seq_length() - state.pruned_len


def _next_positions(positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the tokens after a prompt are numbered, (..., B, 1) each, from the unpruned prompt's positions
    (..., B, L) and mask (B, L): as generate() continues it (one past the last attended token's position,
    row by row), and as the model numbers a token it is given no positions for, a conversation's next turn
    among them (on M-RoPE's three rows, all of them one past the largest position of any: the rope_deltas
    rule; a text row before them as generate()'s). The two differ where a prompt's largest M-RoPE position
    is not its last token's: transformers 5.x numbers the text after a Qwen2-VL or Qwen2.5-VL video on from
    the video's height and width, while its frames' temporal positions step on (by one; Qwen2.5-VL's by
    tokens_per_second · second_per_grid_ts)."""
    attended = mask != 0
    last = (torch.arange(mask.shape[1], device=mask.device) * attended).amax(1)  # each row's last attended token
    following = positions.gather(-1, last[:, None].expand(*positions.shape[:-1], 1)) + 1
    if positions.dim() < 3 or positions.shape[0] < 3:
        return following, following
    largest = positions[-3:].masked_fill(~attended, -1).amax(-1, keepdim=True).amax(0, keepdim=True)
    return following, torch.cat([following[:-3], (largest + 1).expand(3, -1, -1)])


def _crop_back(state: "_CacheState", length: int) -> None:
    """A cache cropped back to ``length`` (transformers 5.14+'s assisted and prompt-lookup decoding remove the
    rejected drafts so, by count): to its prefill and the first tokens appended since, or into the prefill's
    trailing drafts (``scored``, the first round's). What it holds is still a pruned prompt and a continuation
    of it, numbered as before: the layout is cut to match (views, no copy). Anything else (cut into the pruned
    prompt itself) is refused (:data:`CROP_ERROR`)."""
    cut = state.pruned_len - length
    if cut > 0:
        if state.grown or cut > state.scored:
            raise RuntimeError(CROP_ERROR)
        state.original_len, state.pruned_len, state.scored = state.original_len - cut, length, state.scored - cut
        state.mask, state.next_position = state.mask[:, :length], state.next_position - cut
        state.restart_position = state.restart_position - cut
        if state.layout is not None:
            state.layout = tuple(t[:, :length] for t in state.layout)
    state.grown = length - state.pruned_len
    if state.tokens is not None:
        keep, kept = state.original_len + state.grown, []
        for ids in state.tokens:
            if keep <= 0:
                break
            kept.append(ids[:, :keep])
            keep -= ids.shape[1]
        state.tokens = kept


def _count_inputs_on_host(inputs: dict) -> dict:
    """``inputs`` with the integer tensors that a family's image counts read (COUNT_INPUTS)
    on the host: copies queued without waiting, ahead of the prefill's one sync, which they
    arrive with (read back one by one, each would be a sync of its own)."""
    return dict(inputs, **{name: to_host(inputs[name]) for name in COUNT_INPUTS
                           if isinstance(inputs.get(name), torch.Tensor)})


class Images(NamedTuple):
    """Where a prefill's images are (host), image by image in row-major order: ``rows[i]``, its batch row;
    ``cols[i]``, its positions, ascending, ``sizes[i]`` of them; ``firsts[i]`` and ``lasts[i]``, the first and the last of them; ``padded``,
    every image's positions as the rows of one zero-padded ``(I, N_max)`` tensor. Made in a fixed number of ops
    whatever the number of images (:meth:`PruneHandle._find_images`)."""
    rows: list[int]
    cols: list[torch.Tensor]
    sizes: list[int]
    firsts: list[int]
    lasts: list[int]
    padded: torch.Tensor


def _spanned(shape: torch.Size, rows: list[int], firsts: list[int], lasts: list[int], spans=()) -> torch.Tensor:
    """Host bool ``shape`` (B, L): True from ``firsts[i]`` to ``lasts[i]`` in row ``rows[i]``, and over each
    ``(row, first, last)`` of ``spans``. A fixed number of ops whatever their number: +1 where a span starts, -1
    after it ends, and the running sum."""
    at = torch.tensor([[r, f, l + 1] for r, f, l in zip(rows, firsts, lasts)]
                      + [[int(r), int(f), int(l) + 1] for r, f, l in spans], dtype=torch.long).T
    edges = torch.zeros(shape[0], shape[1] + 1, dtype=torch.int32)
    one = torch.ones((), dtype=torch.int32)
    edges.index_put_((at[0], at[1]), one, accumulate=True)
    edges.index_put_((at[0], at[2]), -one, accumulate=True)
    return edges.cumsum(1)[:, :-1] > 0


def _prebuilt(mask) -> bool:
    """Whether the language model was handed prebuilt masks (4-D, or a dict of them by attention kind),
    which a family's ``build_mask`` rebuilds for the pruned layout; a 2-D mask (or none) the language model
    turns into masks itself, from the pruned 2-D mask then (DiffusionGemma's encoder on transformers 5.24
    passes the 2-D mask of a forward call on: it builds its masks and drops them)."""
    return isinstance(mask, dict) or _is_block_mask(mask) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def _is_block_mask(mask) -> bool:
    """Whether ``mask`` is flex_attention's ``BlockMask`` (what transformers builds for a model run with
    ``attn_implementation="flex_attention"``): a prebuilt mask, as a 4-D one."""
    # One exists only once its module is loaded: no import here (it runs at every decode step), none at load either
    # (the module takes ~0.3 s to import, and a torch before 2.5 has none).
    flex = sys.modules.get("torch.nn.attention.flex_attention")
    return flex is not None and isinstance(mask, flex.BlockMask)


class _DeferredMasks(dict):
    """The dict a prompt's base model carries to its language model in place of the masks it would build
    (Family.passes_mask_dicts): its items are the base model's own ``"mask"`` (2-D or None), ``"token_types"``
    and whether labels came with the call (``"labelled"``), for the language model's hook, which builds the
    masks once, for the layout the language model runs on (the pruned one, or else the prompt's own). The
    items are its whole state: what moves a call's tensors between devices (accelerate's hooks) rebuilds
    a dict as ``type(d)(items)``."""


def _mask_2d(mask, batch: int, length: int, device) -> torch.Tensor:
    """The 2-D padding mask of a prefill, as long; recovered from the 4-D mask (or the
    dict of them) that generate() builds ahead of the forward for static caches, or that a base
    model builds for its language model (PaliGemma, Molmo2, Inkling), or from flex_attention's
    ``BlockMask`` in their place."""
    if isinstance(mask, dict):
        # A mask whose rows see every key: full attention, or a kind of its own (Dots3-Note's indexed
        # attention); a sliding or chunked one's last row sees its window only.
        whole = [m for kind, m in mask.items() if "sliding" not in kind and "chunked" not in kind]
        mask = mask.get("full_attention", whole[0] if whole else next(iter(mask.values())))
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if _is_block_mask(mask):  # flex_attention's: its mask function, read at the last query row (device ops only)
        rows, keys = torch.arange(batch, device=device), torch.arange(length, device=device)
        head = torch.zeros((), dtype=torch.long, device=device)
        last = torch.full((), mask.seq_lengths[0] - 1, dtype=torch.long, device=device)  # a fill: no copy
        row = torch.vmap(torch.vmap(mask.mask_mod, in_dims=(None, None, None, 0)), in_dims=(0, None, None, None))
        return row(rows, head, last, keys).long()
    if mask.dim() == 4:  # the last query row attends to every non-padding key
        row = mask[:, 0, -1, :length]
        return (row if row.dtype == torch.bool else row == 0).long()
    return mask.long()


class _GenerateMasks:
    """``create_masks_for_generate`` on a model whose base model carries a dict of masks to its language
    model (Family.passes_mask_dicts), while its handle lives; ``remove()`` takes it away as a hook's
    handle would. generate() calls it on a static cache ahead of every forward, to build the masks
    outside the step it compiles; the hooks then built them again for the pruned layout, so a pruned
    prompt and each decode step on its cache paid two builds (transformers builds Gemma's masks with
    ``torch.vmap``: milliseconds of host time a step). Here those steps get the 2-D mask back in a
    :class:`_DeferredMasks`, and the language model's hook builds the masks once: for a prompt (several
    tokens on a cache the handle did not prune: pruned then, or built as the base model would), and for
    every step on a cache the handle pruned. Other calls (a step on a cache it did not prune) get the
    model's own builder."""

    def __init__(self, model: torch.nn.Module, handle: "PruneHandle"):
        import transformers.masking_utils

        self.model, self.handle = model, weakref.ref(handle)
        self.build = getattr(type(model), "create_masks_for_generate", transformers.masking_utils.create_masks_for_generate)
        model.create_masks_for_generate = self

    def __call__(self, *args, **kwargs):
        handle = self.handle()
        cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        embeds = next((kwargs[k] for k in ("inputs_embeds", "input_embeds") if kwargs.get(k) is not None), None)
        pruned = handle is not None and cache is not None and cache in handle._caches
        prompt = handle is not None and not pruned and embeds is not None and embeds.shape[1] > 1
        if args or not (pruned or prompt):
            return self.build(*args, **kwargs)
        token_types = kwargs.get(handle.family.token_types_arg)
        return _DeferredMasks(mask=kwargs.get("attention_mask"), token_types=token_types, labelled=False)

    def remove(self) -> None:
        if self.model.__dict__.get("create_masks_for_generate") is self:
            del self.model.create_masks_for_generate


class PruneHandle:
    """Hooks installed by :func:`zspa_kernels.prune`; ``remove()`` or leave the ``with`` block."""

    # Whether a step on a pruned cache may append several tokens: one at a time where generate() decodes
    # token by token (several would be assisted decoding, or a new prompt on the cache: refused); a block
    # diffusion model's generate() appends each finished canvas (block_diffusion.py).
    multi_token_steps = False

    def __init__(self, model: torch.nn.Module, family: Family, keep: Union[int, float],
                 core_ratio: float, relevance: str, prompt: str, backend: str,
                 tokenizer=None):
        # Everything is checked before the model is touched: a refused call leaves it as it was.
        keep = as_keep(keep)
        if prompt not in PROMPTS:
            raise ValueError(f"prompt: expected one of {PROMPTS}, got {prompt!r}")
        check_options(core_ratio, relevance, backend)  # the op's own checks, at prune() time
        named = special_token_ids(model.config)
        special = named | (set() if tokenizer is None else tokenizer_special_ids(tokenizer))
        visual_ids = family.visual_token_ids(model.config)
        if not visual_ids:  # the hooks would find no image in any prompt: every prefill would run unpruned
            raise ValueError(f"model.config: names no {family.name} visual token id "
                             f"({', '.join(family.visual_token_attrs)}: None); cannot tell which tokens are visual")
        base, lm = split_model(model, family)
        if getattr(lm, "_zspa_pruned", False):
            raise ValueError("model: already pruned by zspa_kernels.prune; remove() that handle first")

        self.family = family
        self.keep, self.core_ratio, self.relevance, self.prompt, self.backend = (
            keep, float(core_ratio), relevance, prompt, backend)
        self.base, self.lm, self.config = base, lm, model.config
        self.visual_ids = visual_ids
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        self._tokenizer = None if tokenizer is None else text_tokenizer(tokenizer)
        self._blank: dict[int, bool] = {}  # token id -> it decodes to whitespace or control characters alone
        # The chat template's own text (role headers, generation prompt): no question. Its runs end at the
        # ids the config names (image markers, bos): a processor writes an image's markers, and text around
        # them (Gemma3's newlines), where the template writes one placeholder.
        self._template = [] if tokenizer is None else template_token_runs(tokenizer, set(visual_ids) | named)
        # What the template writes before an assistant's answer: where a training row's answer begins.
        self._answer_headers = [] if tokenizer is None else answer_header_runs(tokenizer, set(visual_ids) | named)
        params = inspect.signature(lm.forward).parameters
        self._cache_arg = next((k for k in CACHE_ARGS if k in params), CACHE_ARGS[-1])
        self._takes_cache = any(k in params for k in CACHE_ARGS)  # an encoder-decoder's encoder takes none
        self.last_selection: list[ImageSelection] = []
        self._layout: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (index, valid) of the last prompt
        self._inputs: Optional[dict] = None  # the base model's keyword arguments of this call
        self._merged = False  # whether that call's inputs_embeds hold its images, merged by the model
        self._transformers = release("transformers")
        self._several = False  # this call appends several tokens to a pruned cache (_several_tokens)
        self._deferred: Optional[_DeferredMasks] = None  # set only inside the language model's hook (_lm_pre_hook)
        self._gather: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (index, valid)
        self._labels: Optional[torch.Tensor] = None  # taken from the wrapper, for the loss after it
        self._given_labels: Optional[torch.Tensor] = None  # the wrapper's labels of this call, for the prompt
        self._scored = 0  # trailing tokens the wrapper's call scores (logits_to_keep - 1): no prompt
        self._logits_to_keep: Optional[int] = None  # this pruned prefill's, for _lm_post_hook
        # The cache slots of this language model call's tokens where it runs on a pruned layout, for the
        # modules that read them (Family.slot_position_modules); None otherwise.
        self._slots: Optional[torch.Tensor] = None
        self._loss_kwargs: dict = {}
        self._caches: "weakref.WeakKeyDictionary[object, _CacheState]" = weakref.WeakKeyDictionary()
        self._hooks = self._install(model, base, lm)  # may still refuse: the model is marked after it
        lm._zspa_pruned = True

    def _install(self, model, base, lm) -> list:
        """Register the hooks; returns their handles. A refusal must come before the first one."""
        hooks = [
            base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_post_hook, with_kwargs=True),
        ]
        # The wrapper with the LM head computes the loss from labels (it may also be the module
        # that merges the image features, where there is no separate base model).
        if (model is not base or model.get_output_embeddings() is not None
                or "labels" in inspect.signature(model.forward).parameters):  # Nemotron-H Omni: its LM's head
            hooks += [
                model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
                model.register_forward_hook(self._top_post_hook, with_kwargs=True),
            ]
        if self.family.passes_mask_dicts:
            hooks.append(_GenerateMasks(model, self))
        if self.family.slot_position_modules is not None:
            hooks += [m.register_forward_pre_hook(self._slot_pre_hook, with_kwargs=True)
                      for m in self.family.slot_position_modules(lm)]
        return hooks

    @property
    def last_kept_positions(self) -> Optional[torch.Tensor]:
        """``(B, L')`` long, on the model's device: for each position of the last pruned prompt's
        outputs (logits, hidden states, attentions, cache slots), the position in ``input_ids`` it
        came from (after a cached prefix: in the ``input_ids`` the model was called with, the tokens from
        the cache's length on); ``-1`` on the left padding added where rows kept different counts. Ascending
        along each row, so ``labels.gather`` by it, or scoring an answer by its input positions,
        reads the right logits whatever the padding side. None when the last prompt ran unpruned
        (no images, or no ``input_ids``)."""
        if self._layout is None:
            return None
        index, valid = self._layout
        return index.masked_fill(~valid, -1)

    # -- lifecycle -------------------------------------------------------------------------
    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for cache in list(self._caches.keys()):  # one handle a model: their layouts go with this one
            watch = cache.__dict__.get("_zspa_watch")
            if isinstance(watch, _CacheWatch):
                watch.handles.discard(self)
                watch.lost = True
        if self._hooks:
            self.lm._zspa_pruned = False
        self._hooks = []
        self._caches = weakref.WeakKeyDictionary()
        self._inputs = self._gather = self._labels = self._given_labels = None

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------
    def _top_pre_hook(self, module, args, kwargs):
        """Take ``labels`` away from the wrapper: its logits will cover the kept positions
        only, so the loss is computed after the forward from the gathered labels. With
        ``keep=1.0`` nothing is dropped and the wrapper computes its own loss, as unpatched
        (a router's auxiliary loss, a family's own padding rule included)."""
        self._gather = self._labels = None
        self._note_labels(module, args, kwargs)
        keeps_all = isinstance(self.keep, float) and self.keep == 1.0
        routed = kwargs.get("output_router_logits")
        if routed is None:
            routed = getattr(self.config.get_text_config(), "output_router_logits", False)
        if routed and self.family.weighs_router_logits() and not keeps_all:
            raise ValueError(
                f"output_router_logits: the {self.family.name} load-balancing loss weighs the router logits of "
                "the kept tokens by the unpruned attention mask, whose length differs; prune with keep=1.0, "
                "or turn output_router_logits off")
        if keeps_all:
            return None
        self._labels = kwargs.pop("labels", None)
        self._loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        return args, kwargs

    def _note_labels(self, module, args, kwargs):
        """Keep the wrapper's ``labels`` of this call, and the count of trailing tokens it scores
        (``logits_to_keep`` - 1), for the prompt (:meth:`_prompt_tokens`)."""
        self._given_labels = kwargs.get("labels")
        keep = kwargs.get("logits_to_keep")
        self._scored = keep - 1 if isinstance(keep, int) and keep > 1 else 0

    def _forget_labels(self, module, args, kwargs, output):
        self._given_labels, self._scored = None, 0

    def _top_post_hook(self, module, args, kwargs, output):
        self._forget_labels(module, args, kwargs, output)
        labels, self._labels = self._labels, None
        if labels is None:
            return None
        if self._gather is not None:
            # Labels follow their tokens (dropped image placeholders lose theirs); a row's
            # first token is predicted by no position, not by the re-padding before it.
            index, valid = self._gather
            first = valid & ~torch.nn.functional.pad(valid, (1, 0))[:, :-1]
            labels = labels.to(index.device).gather(1, index).masked_fill(~valid | first, -100)
        logits = output[0] if isinstance(output, tuple) else output.logits  # return_dict=False: a tuple
        # The LM head's width, as the wrappers pass it: Apertus 1.5 cuts its head below the vocabulary.
        loss = module.loss_function(logits, labels, vocab_size=logits.shape[-1], **self._loss_kwargs)
        if isinstance(output, tuple):
            return (loss, *output)  # as the model returns it: the loss first
        output.loss = loss
        return output

    def _base_pre_hook(self, module, args, kwargs):
        # The arguments are kept for the language model's hook of this call, which takes them (they
        # hold the cache: kept any longer, they would keep its memory after the caller let it go).
        self._inputs, self._several, self._merged = None, False, False
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        state = self._caches.get(cache) if cache is not None else None
        if state is None:
            if cache is not None:
                _refuse_lost(cache)  # before the base model numbers its tokens by the cache's length
            if _chunk_features(kwargs):  # before the base model merges them
                raise RuntimeError(CHUNKED_ERROR)
            return self._prompt(args, kwargs, input_ids, cache)
        step = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        q = step.shape[1]
        several = (q != 1 and not self.multi_token_steps) or _new_pixels(kwargs)
        if state.decode_mask is None:  # dynamic layers: the length is a host integer
            # A crop by a device count (5.17's assisted decoding) leaves a tensor: read back then, only then.
            length = int(_seq_length(cache))
            if length == 0:  # emptied since the prefill: a new sequence
                del self._caches[cache]
                return self._prompt(args, kwargs, input_ids, cache)
            if length != state.pruned_len + state.grown:
                if length > state.pruned_len + state.grown:
                    raise RuntimeError(CROP_ERROR)  # extended outside this generation's steps
                _crop_back(state, length)
        elif several and _is_empty(cache):  # read back once a prompt
            del self._caches[cache]
            return self._prompt(args, kwargs, input_ids, cache)
        turn = False
        if several:
            # Several tokens on a cache this handle pruned: a conversation's next turn, or new tokens alone
            # (assisted decoding's drafts); a prompt with images on it would misplace tokens, or run them
            # unpruned, unsaid.
            if _new_pixels(kwargs) or self.multi_token_steps or self._merges_images(kwargs, input_ids):
                raise RuntimeError(REUSE_ERROR)
            args, q, turn = self._several_tokens(state, args, kwargs, q)
            self._several = True
        carried = False
        if state.decode_mask is None:
            appended = state.grown
            carried = self._carry_masks(args, kwargs)
            if state.tokens is not None and not turn:
                if input_ids is None:
                    state.tokens = None
                else:
                    state.tokens.append(input_ids)
        else:
            # A static cache's decode step, known without reading its length back: this handle
            # pruned the cache, and a reset drops its state (_CacheWatch.reset, set at the prefill).
            # No tensor op here unless positions are to be supplied: where this module is the one
            # generate() compiles (a wrapper that is its own base model), Dynamo traces its hooks as
            # frames of their own, and an op in one is a graph of its own beside the step's.
            state.caller_slots = (kwargs.get("cache_position"),)
            if kwargs.get("position_ids") is not None:
                return None
            appended = _appended(state, cache, kwargs.get("cache_position"))
        if turn:  # numbered from here on as the model numbers a turn (M-RoPE: from the prompt's largest position)
            state.next_position = state.restart_position
        state.numbered = state.numbered or several
        if kwargs.get("position_ids") is None or (state.numbered and state.dropped):
            # Continue the original numbering; the model would count cache slots instead. Given no positions,
            # as the model numbers such tokens unpruned (one or several); drafts, as generate() numbers them.
            # At keep-all the cache is the unpatched model's, and so are the positions the caller computes.
            base = state.restart_position if kwargs.get("position_ids") is None else state.next_position
            kwargs["position_ids"] = base + appended
            if q > 1:
                kwargs["position_ids"] = kwargs["position_ids"] + torch.arange(q, device=step.device)
            return args, kwargs
        return (args, kwargs) if carried or turn else None

    def _merges_images(self, kwargs: dict, input_ids: Optional[torch.Tensor]) -> bool:
        """Whether several tokens on a pruned cache bring images the model merges at placeholders among them:
        images encoded ahead of the call (transformers 5.24+'s generate() encodes a turn's pixels so, and
        passes no pixel input) or pixels under other names, whose model merges them only where the ids hold
        image tokens (Phi-4-multimodal's come at every step, drafts too). Read back only where images come
        (one host sync, beside the model's own check of the same ids). Given embeddings without ids: yes,
        as the model then finds the placeholders by their embeddings, which the hooks do not read here."""
        if not _brings_images(kwargs):
            return False
        if input_ids is None:
            return True
        return bool(torch.isin(input_ids, torch.tensor(self.visual_ids, device=input_ids.device)).any())

    def _several_tokens(self, state: _CacheState, args: tuple, kwargs: dict, q: int) -> tuple[tuple, int, bool]:
        """Several text tokens on a cache this handle pruned: new tokens alone (assisted and prompt-lookup
        decoding's drafts, or a caller's own), or a conversation's next turn. generate() given the whole
        conversation and the cache numbers the cache's slots as the conversation's first tokens: it passes
        the conversation from the cache's length on, so the pruned cache (shorter by the ``dropped`` tokens)
        gets the last ``dropped`` tokens it already holds, then the new ones; its mask and positions count
        the whole conversation (the unpruned numbering the hooks continue). The mask's width says which
        tokens are new. Without a mask (5.24+'s generate() drops one of ones), the count does: at most
        ``dropped`` tokens are new ones alone (a turn repeats ``dropped`` tokens, then adds some); more are a
        turn, whose first ``dropped`` must repeat those the sequence consumed there (read back: one host sync
        a turn). What a turn repeats is cut from every per-token input here, before the base model embeds
        it. Returns the arguments, the new token count and whether it is a turn. Refused
        (:data:`REUSE_ERROR`) otherwise: a static cache (its steps' masks are the cache's full length), a 4-D
        mask, a mask whose width reads as neither."""
        mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        old = state.original_len - state.pruned_len
        if state.decode_mask is not None:
            raise RuntimeError(REUSE_ERROR)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            new = mask.shape[1] - state.original_len - state.grown
            if old and new == q:
                return self._new_tokens(args, q)
            if q - new != old or old >= q:
                raise RuntimeError(REUSE_ERROR)
        elif mask is not None:
            raise RuntimeError(REUSE_ERROR)
        elif q <= old:
            return self._new_tokens(args, q)
        elif old and not self._repeats(state, input_ids, old):
            start = state.original_len + state.grown - old
            raise RuntimeError(TURN_IDS_ERROR.format(old=old, start=start, end=start + old - 1))
        if old:
            batch = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
            per_token = {*TURN_INPUTS, self.family.token_types_arg}
            for key, value in kwargs.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "inputs_embeds":
                    kwargs[key] = value[:, old:]
                elif key == "cache_position" and value.shape == (q,):
                    kwargs[key] = value[old:]
                elif key in per_token and value.dim() >= 2 and value.shape[-1] == q and value.shape[-2] in (batch, 1):
                    kwargs[key] = value[..., old:]  # positions: M-RoPE rows too
            if args:
                args = (args[0][:, old:], *args[1:])
        if state.tokens is not None:
            state.tokens = None if input_ids is None else [*state.tokens, input_ids[:, old:]]
        return args, q - old, True

    def _new_tokens(self, args: tuple, q: int) -> tuple[tuple, int, bool]:
        """New tokens alone on a pruned cache: appended at the unpruned positions that follow it, as a decode
        step's token is; generate() crops the rejected drafts by count (:func:`_crop_back`)."""
        if self._transformers < CROPS_BY_COUNT:
            raise RuntimeError(DRAFTS_ERROR.format(found=".".join(map(str, self._transformers))))
        return args, q, False

    @staticmethod
    def _repeats(state: _CacheState, input_ids: Optional[torch.Tensor], old: int) -> bool:
        """Whether ``input_ids`` begin with the ``old`` ids the sequence consumed from the pruned cache's length
        on (the unpruned positions ``pruned_len + grown`` up to ``original_len + grown``)."""
        if input_ids is None or state.tokens is None:
            return False
        consumed = torch.cat([t.to(input_ids.device) for t in state.tokens], 1)
        if consumed.shape != (input_ids.shape[0], state.original_len + state.grown):
            return False
        start = state.pruned_len + state.grown
        return torch.equal(input_ids[:, :old], consumed[:, start:start + old])  # read back: the turn's one sync

    def _prompt(self, args, kwargs, input_ids, cache, merged: bool = False):
        """A prompt: its arguments kept for the language model's hook, and its masks left to that hook where
        the base model would build them (a fresh sequence's, or several tokens with images after a cached prefix,
        which the hooks prune after it: :meth:`_carry_masks`). Token types that stop short
        of the tokens the call scores (transformers' assisted decoding prefills the prompt with its first
        drafts, and extends ``token_type_ids`` alone over them) are read as text there, as the model reads them;
        the whole sequence's token types (generate() passes them after a cached prefix) are read from the ids'
        first position on. ``merged``: the images are in the call's ``inputs_embeds`` already, merged
        by the model before it (no image input comes with them); else the call's inputs say whether it brings any
        (:func:`_brings_images`)."""
        self._inputs, self._merged = dict(kwargs, input_ids=input_ids), merged
        length = 0 if cache is None else _host_length(cache)
        if input_ids is not None:
            short = (input_ids.shape[0], input_ids.shape[1] - self._scored)
            whole = (input_ids.shape[0], (length or 0) + input_ids.shape[1])
            for name in {*TOKEN_TYPE_INPUTS, self.family.token_types_arg} - {None}:
                types = self._inputs.get(name)
                if not isinstance(types, torch.Tensor):
                    continue
                if self._scored and types.shape == short:
                    self._inputs[name] = torch.nn.functional.pad(types, (0, self._scored))
                elif length and types.shape == whole:
                    self._inputs[name] = types[:, length:]
        if input_ids is None or length is None or (length and not (input_ids.shape[1] > 1 and _brings_images(kwargs))):
            return None  # a static cache's prompt, or a dynamic cache's next tokens without images: the model's masks
        return (args, kwargs) if self._carry_masks(args, kwargs) else None

    def _carry_masks(self, args, kwargs) -> bool:
        """Where the base model carries a dict of masks to its language model as it is (Family.passes_mask_dicts)
        and would build masks from a 2-D one (or none, given by keyword), hand it an empty dict to carry, and
        leave the masks to the language model's hook, which builds them once: the base model would build them
        for the prompt as given (a prompt's whole length, a decode step's unpruned one), and the hook again
        for the pruned layout. Returns whether it did."""
        if not self.family.passes_mask_dicts or len(args) > 1 or _prebuilt(kwargs.get("attention_mask")):
            return False
        labelled = kwargs.get("labels") is not None or self._labels is not None
        kwargs["attention_mask"] = _DeferredMasks(mask=kwargs.get("attention_mask"), labelled=labelled,
                                                  token_types=kwargs.get(self.family.token_types_arg))
        return True

    def _lm_pre_hook(self, module, args, kwargs):
        deferred = kwargs.get("attention_mask")
        if not isinstance(deferred, _DeferredMasks):
            return self._lm_pre_with_embeds(module, args, kwargs)
        # The base model's own mask, as the hooks read a prompt's; a pruned prefill builds the masks
        # (_prefill), and every other prompt gets those the base model would have built.
        kwargs["attention_mask"], self._deferred = deferred["mask"], deferred
        try:
            args, kwargs = self._lm_pre_with_embeds(module, args, kwargs) or (args, kwargs)
            if self._deferred is not None:
                embeds, token_types = kwargs["inputs_embeds"], deferred["token_types"]
                kwargs["attention_mask"] = self.family.build_mask(
                    self.config, embeds, deferred["mask"], _cache_of(kwargs), kwargs.get("position_ids"),
                    None if token_types is None else token_types.to(embeds.device), kwargs.get("cache_position"),
                    deferred["labelled"])
        finally:
            self._deferred = None
        return args, kwargs

    def _lm_pre_with_embeds(self, module, args, kwargs):
        cache = _cache_of(kwargs)
        if self.family.embed is None or (cache is not None and cache in self._caches):
            return self._lm_pre(module, args, kwargs, cache)
        # A language model that embeds its input_ids itself (Family.embed): a prompt's embeddings go in
        # computed, and the hook works on them; it edits the arguments in place. A decode step on a pruned
        # cache (one text token) is embedded by the model, as unpatched (a compiled step: one graph).
        args, kwargs = self.family.embed(module, args, kwargs)
        self._lm_pre(module, args, kwargs, cache)
        return args, kwargs

    def _slot_pre_hook(self, module, args, kwargs):
        """A module that reads ``position_ids`` as cache slots (Family.slot_position_modules) gets the
        slots of a pruned run's tokens: the language model's ``position_ids`` are their original
        positions there."""
        if self._slots is None:
            return None
        kwargs["position_ids"] = self._slots[None]
        return args, kwargs

    def _lm_pre(self, module, args, kwargs, cache):
        inputs, self._inputs = self._inputs or {}, None
        merged, self._merged = self._merged, False
        self._logits_to_keep = self._slots = None
        state = self._caches.get(cache) if cache is not None else None
        if state is not None:  # the base pre-hook has dropped every emptied cache's state: a decode step
            self._decode_step(state, kwargs)
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        offset = 0  # the tokens a cache this handle did not prefill holds before this prompt
        if cache is not None:
            _refuse_lost(cache)  # the language model called without the base model
            length = _host_length(cache)
            if length is not None:
                empty = length == 0
            elif embeds is not None and embeds.shape[1] == 1:  # one token holds no image: nothing to select
                self.last_selection, self._layout = [], None
                return None
            else:  # on the device: read it for a prompt only (right before the ids' copy)
                empty = _is_empty(cache)
            if not empty:
                # A cache this handle did not prune, mid-sequence: left as it is, unless images come
                # with several tokens: a prompt after the text the cache holds, pruned after it, or
                # refused (never run unpruned, unsaid).
                if not (embeds is not None and embeds.shape[1] > 1 and (merged or _brings_images(inputs))):
                    return None
                why = self._offset_refusal(cache, length, kwargs.get("attention_mask"), embeds.shape[1])
                if why is not None:
                    raise RuntimeError(CONTINUED_ERROR.format(why=why))
                offset = length
        ids = inputs.get("input_ids")
        self.last_selection, self._layout = [], None
        if embeds is None or ids is None or ids.shape != embeds.shape[:2]:
            return None  # no token ids to find the images in: run unpruned
        if not (merged or _brings_images(inputs)):
            return None  # no images merged, as the model runs it: its image tokens are text, nothing to select
        self._prefill(ids, embeds, cache, inputs, kwargs, offset)
        return args, kwargs

    def _offset_refusal(self, cache, length: Optional[int], mask, q: int) -> Optional[str]:
        """Why a prompt of ``q`` tokens with images cannot be pruned after the ``length`` tokens ``cache``
        holds (a cache this handle did not prefill), or None where it can: the prefill then runs on the new
        tokens alone, numbered and masked after the cached ones (:meth:`_prefill`'s ``offset``). The handles
        of other layouts never get here with a cached prefix: their families build their masks (action
        expert, block diffusion), their encoder takes no cache, or their language model's hook is their own
        (cross-attention). The families whose pruned prefill builds their masks (Gemma 3 and 4, Molmo2: image blocks
        attended both ways) build them behind the prefix, read as text (:meth:`_prefill`), where the language model
        gets the base model's 2-D mask or a prebuilt one, which they build again (its 2-D mask read back from it)."""
        family = self.family
        if length is None or _static_length(cache) is not None:
            return "the cache is static (allocated ahead, its length kept on the device): the hooks prune after a " \
                   "dynamic cache only"
        if family.typed_answers:
            return (f"{family.name} attends its whole prompt (its images and the text before the answer) both ways, "
                    "so a cached part of it never saw the rest: no prompt after it is one the model was made for")
        layers = getattr(cache, "layers", None)
        if layers is not None:
            from transformers import cache_utils

            # A DummyLayer holds nothing (Gemma 4's layers that share another layer's keys and values).
            sequences = (cache_utils.CacheLayerMixin, getattr(cache_utils, "DummyLayer", ()))
            if not all(isinstance(layer, sequences) for layer in layers):
                return ("the cache's linear-attention layers hold a state, not a sequence the hooks can append a "
                        "pruned prompt to")
        if family.build_mask is None and mask is not None and not (
                isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length + q):
            return ("the language model got a prebuilt mask where the hooks need a 2-D one over the cached and the "
                    "new tokens (or none)")
        return None

    def _lm_post_hook(self, module, args, kwargs, output):
        """A language model asked for ``logits_to_keep`` positions (Gemma4's base model passes it on)
        leaves the slicing to the wrapper, which slices only hidden states as long as ``input_ids``
        (transformers 5.24's Gemma4): a pruned prefill's are shorter, and its LM head would run over
        every kept position (``generate()`` asks for one). Slice them here, as asked."""
        keep, self._logits_to_keep = self._logits_to_keep, None
        self._slots = None
        hidden = getattr(output, "last_hidden_state", None)
        if keep is None or hidden is None or hidden.shape[1] <= keep:
            return None
        output.last_hidden_state = hidden[:, -keep:]
        return output

    # -- prefill ---------------------------------------------------------------------------
    def _find_images(self, ids: torch.Tensor, visual: torch.Tensor, inputs: dict):
        """Where every image is (:class:`Images`): its batch row and its token positions. Runs of visual tokens (of one id: an image next to a video is
        two runs) go to the family, which returns each image's token count: the runs
        themselves, or counts that cut the row-major sequence of visual tokens otherwise
        (adjacent images; row-break tokens inside an image)."""
        tok_rows, tok_cols = visual.nonzero(as_tuple=True)
        tok_ids = ids[tok_rows, tok_cols]
        # Columns counted without the tokens that stand inside a run without ending it (Family.run_joiners:
        # the Qwen Omni thinkers' audio chunks between a video's chunks): adjacent there, one run.
        joiners = self.family.run_joiner_ids(self.config)
        steps = tok_cols if not joiners else (
            ~torch.isin(ids, torch.tensor(joiners, dtype=ids.dtype))).long().cumsum(1)[tok_rows, tok_cols]
        new_run = torch.ones_like(tok_cols, dtype=torch.bool)
        new_run[1:] = ((tok_rows[1:] != tok_rows[:-1]) | (steps[1:] != steps[:-1] + 1)
                       | (tok_ids[1:] != tok_ids[:-1]))
        starts = new_run.nonzero()[:, 0]
        runs = starts.diff(append=torch.tensor([tok_cols.numel()])).tolist()
        # Each run's batch row (Fuyu's 5.x patches, one tensor for every image, leave its images one a row)
        # and token id (images back to back: fewer image runs than images given).
        run_ids = tok_ids[starts].tolist()
        counts = self._counts(runs, run_ids, dict(inputs, **{RUN_ROWS: tok_rows[starts].tolist(), RUN_IDS: run_ids}))
        if sum(counts) != tok_cols.numel() or min(counts, default=1) < 1:
            raise ValueError(
                f"model: the inputs hold {tok_cols.numel()} {self.family.name} image tokens, "
                f"but the images given imply {sum(counts)} ({counts}); cannot tell where each "
                "image's tokens are")
        # Each image's first and last token, in a fixed number of ops whatever the images' number.
        sizes = torch.tensor(counts)
        last = sizes.cumsum(0) - 1
        first = last - sizes + 1
        first_rows = tok_rows[first]
        if bool((first_rows != tok_rows[last]).any()):
            raise ValueError(f"model: a {self.family.name} image's tokens span two batch rows; "
                             "cannot tell where each image's tokens are")
        rows, firsts, lasts = torch.stack([first_rows, tok_cols[first], tok_cols[last]]).tolist()
        return Images(rows, list(tok_cols.split(counts)), counts, firsts, lasts, padded_positions(tok_cols, sizes))

    def _counts(self, runs: list[int], run_ids: list[int], inputs: dict) -> list[int]:
        """Each image's token count, in row-major order: the family's split of the runs; with a
        ``video_token_counts``, of the image runs and of the video runs apart, merged back in
        order (no count may span two runs)."""
        family = self.family
        if family.video_token_counts is None:
            return family.image_token_counts(self.config, inputs, runs)
        video = [i == self.config.video_token_id for i in run_ids]
        split = {}
        for kind, split_runs in ((False, family.image_token_counts), (True, family.video_token_counts)):
            of_kind = [n for n, v in zip(runs, video) if v == kind]
            split[kind] = iter(split_runs(self.config, inputs, of_kind) if of_kind else [])
        counts = []
        for run, kind in zip(runs, video):
            cut = cut_run(run, split[kind])
            if cut is None:
                raise ValueError(f"model: a run of {run} {family.name} {'video' if kind else 'image'} tokens does "
                                 "not split into whole images/frames; cannot tell where each one's tokens are")
            counts += cut
        if any(next(rest, None) is not None for rest in split.values()):
            raise ValueError(f"model: the {family.name} images/frames given imply more tokens than the inputs "
                             "hold; cannot tell where each one's tokens are")
        return counts

    def _host_copy(self, inputs: dict, ids: torch.Tensor, mask: torch.Tensor, device):
        """The prefill's one host sync: ``(ids, mask, labels, typed)`` on the host, one copy; ``labels``
        are the caller's (the wrapper's, or the base model's where it takes them), None when none were
        given; ``typed``: the positions the caller's token types mark (nonzero), read where they mark the
        processor's image tokens (``Family.typed_markers``) or an answer (``Family.typed_answers``), None
        where the family's types mark neither or none were given."""
        def per_position(name: str, value):  # a tensor of the ids' shape, or None where none was given
            if not isinstance(value, torch.Tensor):
                return None
            if value.shape != ids.shape:
                raise ValueError(f"{name}: expected the shape of input_ids, {tuple(ids.shape)}, got {tuple(value.shape)}")
            return value

        labels = per_position("labels", self._given_labels if self._given_labels is not None else inputs.get("labels"))
        types_arg = self.family.token_types_arg
        typed = self.family.typed_markers or self.family.typed_answers
        types = per_position(types_arg, inputs.get(types_arg)) if typed else None
        rows = [ids.to(device), mask.to(ids.dtype)] + [t.to(device, ids.dtype) for t in (labels, types) if t is not None]
        host = torch.stack(rows).cpu()
        return (host[0], host[1], None if labels is None else host[2],
                None if types is None else host[-1] != 0)

    def _video_spans(self, ids_h, images: Images, inputs) -> list[tuple[int, int, int]]:
        """The family's (row, first, last) span of each video, from its frames (``video_spans``)."""
        if self.family.video_spans is None:
            return []
        attr = self.family.frame_token_attr
        video = None if attr is None else getattr(self.config, attr, None)
        first_ids = ids_h[torch.tensor(images.rows), torch.tensor(images.firsts)].tolist()
        frames, previous = [], {}
        # Row-major: each frame with the end of what came before it in its row; no video token: the frames are images.
        for r, c, first_id, last in zip(images.rows, images.cols, first_ids, images.lasts):
            if video is None or first_id == video:
                frames.append((r, c, previous.get(r, 0)))
            previous[r] = last + 1
        return self.family.video_spans(self.config, inputs, ids_h, frames, self._tokenizer)

    def _prompt_tokens(self, ids_h, visual_h, mask_h, rows, firsts, lasts, labels_h=None, spans=(), marked_h=None,
                       answered_h=None):
        """Which positions form the prompt vector (host bool ``(B, L)``).

        ``all_text``: every attended token that is neither visual nor inside an image
        (row breaks, tile markers between its tokens). ``question``: of those, drop every
        special token id named in the config (bos/eos/pad, visual markers; plus, when a
        tokenizer was given, its special tokens, the tokens it decodes to whitespace
        or control characters alone and its chat template's text), and keep the text after the
        row's first image; a row whose question stands wholly before its first image (nothing
        left after it) uses the text before it instead. The whitespace and the template matter
        there: processors write newlines after images (Gemma3 after every one), and templates a
        generation prompt after the question (``<start_of_turn>model``), which would otherwise
        stand for the whole question.

        ``spans``: (row, first, last) of each video whose processor writes text between its
        frames (Qwen3-VL's timestamps): inside it, as row breaks are inside an image.
        ``marked_h``: the processor's image tokens by the caller's token types (``_host_copy``): no
        question text, as the markers the config names are not. ``answered_h``: an answer by the caller's
        token types (PaliGemma's suffix): no question, and with labels over all the text, the answer.

        ``labels_h`` (training): in a row whose question text is part labelled (``!= -100``)
        and part not, the labelled part is the answer, and no prompt in either mode: the
        selection is made as at inference, where the answer is not written yet. In a row whose
        question text is all labelled (a loss over every token, as most VLM collators make), the
        answers are the text after each occurrence of the chat template's assistant header
        (``tokenizer=``: :func:`~.families.answer_header_runs`) to the end of its turn; where none is
        found (or no template was given) it warns. A row with no question text labelled has no answer.
        Without labels, the text after a row's last assistant header (a candidate answer scored after the
        generation prompt) is no question: generation from that prompt has none yet. Nor, in either mode, are
        the trailing tokens the call scores (``logits_to_keep`` - 1 of them, :meth:`_note_labels`): the
        first drafts of assisted and prompt-lookup decoding, which transformers 5 prefills with the prompt,
        or an answer scored so; generation from that prompt has none of them either."""
        inside = _spanned(visual_h.shape, rows, firsts, lasts, spans)
        text = ~visual_h & ~inside & mask_h.bool()
        if 0 < self._scored < text.shape[1]:  # the call scores them: an answer, or assisted decoding's drafts
            text[:, -self._scored:] = False
        if self.prompt == "all_text" and labels_h is None:
            return text
        # Words: no special token, marker or template text (blanks are no words, but no end of one either).
        words = text & ~torch.isin(ids_h, self.special_ids)
        if marked_h is not None:
            words &= ~marked_h
        if self._template:
            words &= ~template_positions(ids_h, self._template)
        question = words
        if self._tokenizer is not None:
            blank = blank_token_ids(self._tokenizer, ids_h[question].unique().tolist(), self._blank)
            question = question & ~torch.isin(ids_h, torch.tensor(blank, dtype=ids_h.dtype))
        if labels_h is not None:
            labelled = labels_h != -100
            split = (question & labelled).any(1, keepdim=True) & (question & ~labelled).any(1, keepdim=True)
            answer = labelled & split
            imaged = torch.zeros_like(split)
            imaged[sorted({int(r) for r in rows})] = True
            # Rows with images whose labels cover all their question text.
            whole = (question & labelled).any(1, keepdim=True) & ~split & imaged
            if bool(whole.any()):
                # An answer after the template's header, to the end of its turn (the next special token,
                # template text or image); every assistant turn, as labels over them alone would mark.
                turns = answer_positions(ids_h, self._answer_headers, ~words)
                if answered_h is not None:
                    turns |= answered_h
                turns &= labelled & whole
                answer |= turns
                self._warn_unmarked_answers(whole & ~(turns & question).any(1, keepdim=True))
            text, question = text & ~answer, question & ~answer
        elif self._answer_headers and self.prompt == "question":
            # Text after the last assistant header (an answer scored as a continuation of the generation
            # prompt): no question, as generation from the same prompt has none yet. Earlier answers stay.
            question = question & ~answer_positions(ids_h, self._answer_headers, ~words, last=True)
        if answered_h is not None and self.prompt == "question":  # an answer typed so: none at generation
            question = question & ~answered_h
        if self.prompt == "all_text":
            return text
        after = question & (visual_h.long().cumsum(1) > 0)
        return torch.where(after.any(1, keepdim=True), after, question)

    def _warn_unmarked_answers(self, rows: torch.Tensor) -> None:
        """Rows (bool ``(B, 1)``) whose labels cover all their question text and hold no answer that
        the chat template tells apart: their labelled text, an answer or not, is ranked as question."""
        if not bool(rows.any()):
            return
        how = ("no answer after the chat template's assistant header was found in it" if self._answer_headers else
               "pass prune(model, ..., tokenizer=processor) holding the chat template to leave its assistant "
               "turns out")
        # One message whatever the rows: Python shows it once, not at every step of a training loop.
        warnings.warn(f"prune(): labels cover every question token of a row with images (a loss over all its "
                      f"text); {how}: an answer there is ranked as question, which generation, with no answer "
                      "written yet, cannot do", UserWarning)

    def _prompt_positions(self, prompt_h: torch.Tensor, rows: list[int], device):
        """The prompt's positions of each row, left-aligned: ``(B, T)`` positions and validity on
        ``device``, and each row's positions on the host (ImageSelection.prompt_tokens); ``rows`` are
        the batch rows of the images, each of which needs a prompt unless the core is empty."""
        counts = prompt_h.sum(1)
        if self.core_ratio > 0 and bool((counts[sorted(set(rows))] == 0).any()):
            raise ValueError(f"prompt: a row with images has no {self.prompt!r} text to rank its "
                             "visual tokens by; add text, or prune with core_ratio=0 (diversity only)")
        t_max = max(1, int(counts.max()))
        prompt_pos = torch.zeros(prompt_h.shape[0], t_max, dtype=torch.long)
        prompt_valid = torch.arange(t_max)[None] < counts[:, None]
        at = prompt_h.nonzero()[:, 1]  # row-major: each row's positions in turn, ascending
        prompt_pos[prompt_valid] = at
        prompt_tokens = list(at.split(counts.tolist()))
        return to_device(prompt_pos, device), to_device(prompt_valid, device), prompt_tokens

    def _prefill(self, ids, embeds, cache, inputs, kwargs, offset: int = 0) -> None:
        """Select each image's tokens of a prompt and hand the language model the kept ones. ``offset``: the
        tokens the cache holds before the prompt (a prefix the hooks did not prefill, :meth:`_offset_refusal`
        allowing): the prompt's tokens are numbered and stored after them, and its mask spans them too."""
        B, L, D = embeds.shape
        device = embeds.device
        mask = _mask_2d(kwargs.get("attention_mask"), B, offset + L, device)
        prefix_mask, mask = mask[:, :offset], mask[:, offset:]
        sizing = _count_inputs_on_host(inputs)  # there once the sync below returns
        # The one host sync: where the images are, and which tokens form the prompt.
        ids_h, mask_h, labels_h, typed_h = self._host_copy(inputs, ids, mask, device)
        marked_h = typed_h if self.family.typed_markers else None
        answered_h = typed_h if self.family.typed_answers else None
        visual_h = torch.isin(ids_h, torch.tensor(self.visual_ids, dtype=ids_h.dtype))
        if not visual_h.any():  # a text-only prompt: nothing to select (and no images to size)
            return
        if self.family.typed_markers and marked_h is None and self._tokenizer is None and self.prompt == "question":
            warnings.warn(f"prune(): {self.family.name} inputs without {self.family.token_types_arg}: the "
                          "processor's image markers that model.config does not name count as question text; "
                          f"pass the processor's {self.family.token_types_arg}, or prune(model, ..., "
                          "tokenizer=processor)", UserWarning)
        images = self._find_images(ids_h, visual_h, sizing)
        rows = images.rows
        prompt_h = self._prompt_tokens(ids_h, visual_h, mask_h, rows, images.firsts, images.lasts, labels_h,
                                       self._video_spans(ids_h, images, sizing), marked_h, answered_h)
        prompt_pos, prompt_valid, prompt_tokens = self._prompt_positions(prompt_h, rows, device)
        features = embeds if self.family.select_on is None else self.family.select_on(kwargs, embeds)
        prompt = features.gather(1, prompt_pos[..., None].expand(-1, -1, D))

        sizes = images.sizes
        cols_d = columns_to_device(images.padded, L, device)
        rows_d = to_device(torch.tensor(rows), device)
        selection, picks = select_images(features, rows, cols_d[:, :-1], sizes, prompt, prompt_valid, self.keep,
                                         self.core_ratio, self.relevance, self.backend, prompt_tokens, rows_d)
        self.last_selection = selection

        dropped_row = [0] * B  # host integers: each order's length is known without the device
        for s in selection:
            dropped_row[s.batch_row] += s.n_tokens - s.order.shape[0]
        dropped = any(dropped_row)
        if not dropped:
            # Nothing dropped (keep-all): the original layout, padding included, so logits
            # (and a loss from labels, left as given) are the unpatched model's bit for bit.
            index = torch.arange(L, device=device)[None].expand(B, L)
            valid, new_len = torch.ones(B, L, dtype=torch.bool, device=device), L
        else:
            # Keep every attended non-visual position plus the picks of every image; the old
            # left padding goes too, so a short row does not hold the batch at its full width.
            keep = keep_picks(~visual_h & (mask_h != 0), rows_d, cols_d, picks)
            kept_len = (mask_h != 0).sum(1) - torch.tensor(dropped_row)
            new_len = int(kept_len.max())
            # Kept positions first, ascending (keys are unique), then right-align each row.
            pos = torch.arange(L, device=device)
            ranked = torch.where(keep, pos, pos + L).argsort(dim=1)
            src = torch.arange(new_len, device=device)[None] - to_device(new_len - kept_len, device)[:, None]
            valid = src >= 0
            index = ranked.gather(1, src.clamp_min(0))
            self._gather = (index, valid)
            logits_to_keep = kwargs.get("logits_to_keep")
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                self._logits_to_keep = logits_to_keep
        self._layout = (index, valid)

        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # passed on as None by several base models: the LM's default, as the LM reads it
            use_cache = getattr(self.lm.config, "use_cache", False) and not (
                self.lm.training and getattr(self.lm, "gradient_checkpointing", False))
        if cache is None and use_cache and self._takes_cache:
            from transformers import DynamicCache

            cache = kwargs[self._cache_arg] = DynamicCache(config=self.lm.config)
        kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, D))
        new_mask = mask.gather(1, index) * valid
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(offset, offset + L, device=device)[None].expand(B, L)
        positions = positions.expand(*positions.shape[:-2], B, L)
        numbering = _next_positions(positions, mask)  # from the unpruned prompt: dropped tokens count
        positions = positions.gather(-1, index.expand(*positions.shape[:-2], B, new_len))
        slots = torch.arange(offset, offset + new_len, device=device)
        if kwargs.get("cache_position") is not None:  # transformers 4.x: cache slots
            kwargs["cache_position"] = slots
        if self.family.slot_position_modules is not None and dropped:
            self._slots = slots
            # The left padding copies its row's first kept token (masked out); numbered back from it, its
            # keys differ from that token's, so that no block of padding ties exactly with the token's own
            # block where a module ranks blocks of slots by their keys (MiniMax-M3's indexer: a tie is
            # broken by where topk finds it, which differs between a static cache and a dynamic one).
            positions = positions + src.clamp_max(0)
        kwargs["position_ids"] = positions
        prebuilt = self._deferred is not None or _prebuilt(kwargs.get("attention_mask"))
        sequence_mask = torch.cat([prefix_mask, new_mask], 1) if offset else new_mask  # the cache's, after the prompt
        kwargs["attention_mask"] = sequence_mask
        if self.family.build_mask is not None and prebuilt:
            self._deferred = None  # built here, once, for the pruned layout
            # The caller's token types, kept like the embeddings: none given, none passed on (the
            # base model then builds causal masks, and so does the family's builder).
            token_types = inputs.get(self.family.token_types_arg)
            if token_types is not None:
                token_types = token_types.to(device).gather(1, index) * valid
                if offset:  # behind the prefix's, as text (0): the builders index them by cache slot, from the first
                    token_types = torch.nn.functional.pad(token_types, (offset, 0))
            labelled = inputs.get("labels") is not None or self._labels is not None
            kwargs["attention_mask"] = self.family.build_mask(
                self.config, kwargs["inputs_embeds"], sequence_mask, cache, positions, token_types, slots, labelled)
        if self.family.on_prefill is not None:
            n_kept = sum(s.order.shape[0] for s in selection)
            self.family.on_prefill(Prefill(kwargs, index, valid, n_kept))
        if cache is not None:
            # The trailing tokens a crop may take back: text attended in every row, that the call scored (drafts);
            # at keep-all, any (the cache is the unpatched model's, and so is its numbering).
            text = (~visual_h & mask_h.bool()).all(0)
            tail = int(text.flip(0).cumprod(0).sum())
            scored = min(tail, self._scored if dropped else L)
            # After a cached prefix, its ids are not known here: -1 stands for them (a turn's repeated ids, which
            # _repeats compares, lie past the kept prompt's start); no reader of the cache takes the layout.
            tokens = [ids.new_full((B, offset), -1), ids] if offset else [ids]
            state = _CacheState(sequence_mask, offset + L, offset + new_len, *numbering,
                                layout=None if offset else (index, valid), dropped=dropped,
                                counts_slots=self._slots is not None, scored=scored, tokens=tokens)
            full = _static_length(cache)
            if full is not None:
                state.decode_mask = torch.cat([new_mask, new_mask.new_ones(B, full - new_len)], dim=1)  # offset 0 here
                state.tokens = None  # no turn on a static cache
            self._caches[cache] = state
            self._watch(cache, reset=full is not None)

    def _watch(self, cache, reset: bool) -> None:
        """Put ``cache`` under its :class:`_CacheWatch`, which hands this handle's state of it on to
        a deep copy. With ``reset``, the watch also drops that state when the cache is reset
        (``generate()`` resets a static cache it reuses): set at the prefill, for static caches
        only. Their length is kept on the device, so a decode step never reads it back to tell
        itself from a new sequence (a dynamic cache's length is a host integer, and its reset is
        seen for free); and nothing a decode step reads changes from one step to the next (see
        _CacheState.decode_mask)."""
        watch = cache.__dict__.get("_zspa_watch")
        if not isinstance(watch, _CacheWatch):
            watch = cache._zspa_watch = _CacheWatch(cache)
        watch.handles.add(self)
        if reset and callable(getattr(cache, "reset", None)) and "reset" not in cache.__dict__:
            cache.reset = watch.reset

    # -- decode ----------------------------------------------------------------------------
    def _decode_step(self, state: _CacheState, kwargs) -> None:
        # A language model that embeds its input_ids itself (Family.embed) gets a step's ids: only their
        # shape and device are read here (such a family builds no masks: Family.__post_init__).
        step = kwargs.get("inputs_embeds")
        if step is None:
            step = kwargs["input_ids"]
        q = step.shape[1]
        several, self._several = self._several, False
        if q != 1 and not (self.multi_token_steps or several):
            raise RuntimeError(REUSE_ERROR)
        if state.decode_mask is not None:  # a static cache: the same shapes at every step
            cache = _cache_of(kwargs)
            caller, state.caller_slots = state.caller_slots, None
            mask = state.decode_mask
            # The slots only where they are read: no tensor op otherwise (where the language model's forward
            # breaks Dynamo's graph, as Phi-4-multimodal's does, this hook is traced as a frame of its own,
            # and an op in it is a graph of its own).
            build = self.family.build_mask is not None and (
                self._deferred is not None or _prebuilt(kwargs.get("attention_mask")))
            # flex_attention reads a mask's offsets when the attention runs: transformers 5 numbers a step's query
            # by the cache's length tensor, which the layer has grown by then, so its causal part lets the query
            # see the next (empty) slot. generate() hides the slots ahead with a 2-D mask as long as the
            # sequence; this fixed-width one hides them the same way.
            flex = getattr(self.lm.config, "_attn_implementation", None) == "flex_attention"
            if kwargs.get("cache_position") is not None or build or state.counts_slots or flex:
                # The caller's slots, as the base model's hook saw them; none seen: the language model
                # was called without the base model.
                appended = _appended(state, cache, kwargs.get("cache_position") if caller is None else caller[0])
                slots = torch.arange(q, device=step.device) + (appended + state.pruned_len)
                if kwargs.get("cache_position") is not None:
                    kwargs["cache_position"] = slots
                if state.counts_slots:
                    self._slots = slots
                if flex:
                    mask = mask * (torch.arange(mask.shape[1], device=mask.device) <= slots[-1])
                if build:  # decode tokens are text: no image blocks
                    self._deferred = None
                    mask = self.family.build_mask(self.config, step, mask, cache, kwargs.get("position_ids"), None,
                                                  slots, False)
            kwargs["attention_mask"] = mask
            return
        grown, past = state.grown, state.pruned_len + state.grown
        state.grown += q
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] != state.original_len + grown + q:
                # Narrower: the caller counts fewer tokens than the cache holds (a crop to an unpruned length).
                raise RuntimeError(CROP_ERROR if mask.shape[1] < state.original_len + grown + q else REUSE_ERROR)
            tail = mask[:, state.original_len:].to(state.mask.dtype)
        else:  # None, or the 4-D masks of a static cache: new tokens are all attended
            tail = state.mask.new_ones(state.mask.shape[0], grown + q)
        mask = torch.cat([state.mask, tail], dim=1)
        slots = torch.arange(past, past + q, device=step.device)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = slots
        if state.counts_slots:
            self._slots = slots
        prebuilt = self._deferred is not None or _prebuilt(kwargs.get("attention_mask"))
        if self.family.build_mask is not None and prebuilt:
            self._deferred = None  # text: no image blocks
            mask = self.family.build_mask(self.config, step, mask, _cache_of(kwargs),
                                          kwargs.get("position_ids"), None, slots, False)
        kwargs["attention_mask"] = mask
