"""Pruning for VLMs whose language model reads the image features through cross-attention layers
(Llama 3.2 Vision, ``mllama``), not as tokens of its sequence.

There an image is one ``<|image|>`` token in the text; its tiles' patch features (a class token
each) are the keys and values of the text model's cross-attention layers: the base model hands
the language model ``cross_attention_states`` (every image's tiles of a row, ``images × tiles ×
patches`` tokens in order) and a prepared 4-D ``cross_attention_mask`` ``(B, 1, L, images × tiles
× patches)``, built from the caller's ``(B, L, images, tiles)`` one: which text position sees which
image's tiles. Padding tiles (and the processor's padding images) are masked out there.

What the hooks change, at a prefill that brings images (one ``zspa::select_tokens`` call per
distinct budget, as for every family, with the prompt's text embeddings):

* ``cross_attention_states`` becomes each row's kept tokens, image by image in order, each
  image's in their original order: ``(B, K, D)``, ``K`` the most any row keeps (a row keeping
  fewer is padded with slots its mask hides); only an image's real tiles (those the caller's
  ``aspect_ratio_mask`` marks and some position sees) compete;
* the prepared mask takes the kept tokens' columns, so every text position sees the kept tokens
  of the images it saw (rows that saw none stay zeroed by ``full_text_row_masked_out_mask``).

The text sequence, its positions and padding, ``labels``, logits and the self-attention cache are
the unpatched model's: the pruned forward is the unpatched model attending, in its cross-attention
layers, to the kept tokens only. The cross-attention layers cache the kept tokens' keys and values,
so the mask of every later step (which the base model rebuilds at full width from the caller's) is
gathered by the same columns: that layout is kept on the cache (``cache._zspa_cross_layout``), so
``copy.deepcopy`` or pickling of the cache carries it. A static cache's cross-attention layers hold
as many slots as the unpruned tokens; the kept ones fill the first, the rest are masked.

``keep=1.0`` (or any budget no image exceeds) changes nothing: the unpatched forward, bit for bit.

Host syncs: one per prefill with images (the ids and the 2-D mask, with the tiles each image has
and the tiles some position sees, copied to the host together).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .handle import PruneHandle, _cache_of, _mask_2d, _static_length
from .selection import columns_to_device, keep_picks, padded_positions, select_images, to_device, to_host

LAYOUT_ATTR = "_zspa_cross_layout"

REUSE_CROSS_ERROR = (
    "zspa_kernels.prune: this KV cache's cross-attention layers already hold image tokens; a prefill "
    "that brings new images would append theirs to them, which the pruned layout cannot describe: "
    "run the prompt (all of its images) on a new cache."
)


@dataclass
class CrossLayout:
    """Which of the unpruned cross-attention tokens a cache's cross-attention layers hold."""

    index: torch.Tensor  # (B, K) column of each kept token among the unpruned ones
    valid: torch.Tensor  # (B, K) False on the padding of rows that keep fewer
    width_in: int  # the unpruned tokens of a row: images × tiles × patches
    width_out: int  # the cross-attention keys a layer attends to: K, or a static layer's slots

    def gather_mask(self, mask: Optional[torch.Tensor], batch: int, length: int, dtype) -> torch.Tensor:
        """The prepared 4-D cross-attention mask (None: every token seen) of the kept columns."""
        device = self.index.device
        if mask is None:
            mask = torch.zeros(batch, 1, length, self.width_in, dtype=dtype, device=device)
        if mask.shape[-1] != self.width_in:
            raise RuntimeError(
                f"cross_attention_mask: the cache's cross-attention layers hold {self.index.shape[1]} kept tokens "
                f"of {self.width_in} a row, but this mask has {mask.shape[-1]} columns; pass the prompt's "
                "cross_attention_mask (its images, as at the prefill), or run the prompt again on a new cache")
        index = self.index[:, None, None, :].expand(*mask.shape[:-1], self.index.shape[1])
        masked = torch.finfo(mask.dtype).min
        out = mask.gather(-1, index).masked_fill(~self.valid[:, None, None, :], masked)
        if self.width_out > out.shape[-1]:
            out = torch.nn.functional.pad(out, (0, self.width_out - out.shape[-1]), value=masked)
        return out


def _holds_cross_states(cache, layers) -> bool:
    """Whether a dynamic layer of ``layers`` already holds keys (a static one is allocated ahead and
    keeps its length on the device: generate() resets a static cache it reuses)."""
    for i in layers:
        layer = cache.layers[i] if i < len(getattr(cache, "layers", ())) else None
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and not getattr(layer, "is_compileable", False) and keys.numel() > 0:
            return True
    return False


class CrossAttentionPruneHandle(PruneHandle):
    """:class:`PruneHandle` for a family with ``cross_attention`` (see the module docstring).

    ``last_selection`` lists an :class:`~.selection.ImageSelection` per image of the last prefill
    with images (its ``order`` indexes the image's real tiles' tokens, tile by tile);
    ``last_kept_positions`` is None: no position of the sequence is dropped."""

    def _install(self, model, base, lm) -> list:
        self._text_config = lm.config
        self._cross_layers = sorted(getattr(lm.config, "cross_attention_layers", None) or ())
        vision = getattr(base, "vision_model", None)
        self._patches = getattr(vision, "num_patches", None)
        if not isinstance(self._patches, int):
            raise ValueError(f"model: the {self.family.name} base model has no vision_model.num_patches; "
                             "cannot tell where each image's tokens are")
        hooks = [
            base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
        ]
        if model is not base:  # the wrapper's labels, for the prompt (the sequence keeps its length: no loss to redo)
            hooks += [model.register_forward_pre_hook(self._note_labels, with_kwargs=True),
                      model.register_forward_hook(self._forget_labels, with_kwargs=True)]
        return hooks

    def _base_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs = dict(kwargs, input_ids=input_ids)
        return None

    def _lm_pre_hook(self, module, args, kwargs):
        inputs, self._inputs = self._inputs or {}, None
        cache = _cache_of(kwargs)
        states = kwargs.get("cross_attention_states")
        step = kwargs.get("inputs_embeds")
        if step is None:
            step = kwargs.get("input_ids")
        if states is None:
            layout = getattr(cache, LAYOUT_ATTR, None) if cache is not None else None
            if layout is None or step is None:
                return None
            kwargs["cross_attention_mask"] = layout.gather_mask(
                kwargs.get("cross_attention_mask"), step.shape[0], step.shape[1], module.dtype)
            return args, kwargs
        # A prompt with images.
        self.last_selection = []
        if cache is not None:
            if _holds_cross_states(cache, self._cross_layers):
                raise RuntimeError(REUSE_CROSS_ERROR)
            cache.__dict__.pop(LAYOUT_ATTR, None)
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = inputs.get("input_ids")
        if ids is None or step is None or ids.shape != step.shape[:2]:
            return None  # no token ids to find the prompt in: run unpruned
        layout = self._select(module, ids, states, inputs, kwargs)
        if layout is None:
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # the language model's default, as it reads it
            use_cache = getattr(self._text_config, "use_cache", False)
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = kwargs[self._cache_arg] = DynamicCache(config=self._text_config)
        if cache is not None:
            full = _static_length(cache) if self._cross_layers else None
            if full is not None:
                layer = cache.layers[self._cross_layers[0]]
                layout.width_out = int(getattr(layer, "max_cache_len", full))
            setattr(cache, LAYOUT_ATTR, layout)
        B = layout.index.shape[0]
        flat = states.reshape(B, layout.width_in, states.shape[-1])
        kwargs["cross_attention_states"] = flat.gather(1, layout.index[..., None].expand(-1, -1, flat.shape[-1]))
        kwargs["cross_attention_mask"] = layout.gather_mask(
            kwargs.get("cross_attention_mask"), B, ids.shape[1], states.dtype)
        return args, kwargs

    def _select(self, module, ids, states, inputs, kwargs) -> Optional[CrossLayout]:
        """Select every image's tokens; the layout of the kept ones, or None where nothing is dropped."""
        B, L = ids.shape
        D = states.shape[-1]
        device = states.device
        raw = inputs.get("cross_attention_mask")  # the caller's (B, L, images, tiles)
        ratio = inputs.get("aspect_ratio_mask")  # (B, images, tiles)
        pixels = inputs.get("pixel_values")  # (B, images, tiles, C, H, W)
        source = next((t for t in (raw, ratio, pixels) if isinstance(t, torch.Tensor)), None)
        if source is None:
            raise ValueError(f"cross_attention_mask: {self.family.name} pruning needs it (or aspect_ratio_mask, or "
                             "pixel_values) to tell the images of a row apart; got none")
        n_images, n_tiles = (source.shape[2:4] if source is raw else source.shape[1:3])
        width = n_images * n_tiles * self._patches
        if states.numel() != B * width * D:
            raise ValueError(f"cross_attention_states: expected {B} rows of {n_images} images x {n_tiles} tiles x "
                             f"{self._patches} tokens of {D} features, got shape {tuple(states.shape)}")
        real = torch.ones(B, n_images, n_tiles, dtype=torch.bool, device=device)
        if isinstance(ratio, torch.Tensor):
            real = real & ratio.to(device).bool()
        if isinstance(raw, torch.Tensor):
            real = real & raw.to(device).bool().any(1)
        real_h = to_host(real)  # there once the sync below returns
        mask = _mask_2d(kwargs.get("attention_mask"), B, L, device)
        # The one host sync: the prompt's tokens, and the tiles of every image.
        ids_h, mask_h, labels_h, _ = self._host_copy(inputs, ids, mask, device)  # no typed markers
        marks_h = torch.isin(ids_h, torch.tensor(self.visual_ids, dtype=ids_h.dtype))
        mark_rows, mark_cols = marks_h.nonzero(as_tuple=True)
        marks = mark_cols.tolist()  # an image is one mark
        prompt_h = self._prompt_tokens(ids_h, marks_h, mask_h, mark_rows.tolist(), marks, marks, labels_h)
        # Each image with a real tile (row-major) and the columns of its real tiles' tokens: all images at once.
        rows_t, images_t = real_h.any(2).nonzero(as_tuple=True)
        if rows_t.numel() == 0:
            return None
        rows = rows_t.tolist()
        real_tokens = real_h[rows_t, images_t].repeat_interleave(self._patches, dim=1)  # (I, tiles x patches)
        columns = images_t[:, None] * (n_tiles * self._patches) + torch.arange(real_tokens.shape[1])
        sizes_t = real_tokens.sum(1)
        sizes = sizes_t.tolist()
        prompt_pos, prompt_valid, prompt_tokens = self._prompt_positions(prompt_h, rows, device)
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            prompt = embeds.gather(1, prompt_pos[..., None].expand(-1, -1, D))
        else:
            prompt = module.get_input_embeddings()(ids.to(device).gather(1, prompt_pos))
        flat = states.reshape(B, width, D)
        cols_d = columns_to_device(padded_positions(columns[real_tokens], sizes_t), width, device)
        rows_d = to_device(rows_t, device)
        selection, picks = select_images(flat, rows, cols_d[:, :-1], sizes, prompt.to(flat.dtype), prompt_valid,
                                         self.keep, self.core_ratio, self.relevance, self.backend, prompt_tokens, rows_d)
        self.last_selection = selection
        if all(s.order.shape[0] == s.n_tokens for s in selection):
            return None  # nothing dropped: the unpatched forward, padding tiles and all
        # Every image's kept columns at once, ascending in their row (images in order, then their picks' columns).
        lengths = [0] * B  # host integers: each order's length is known without the device
        for s in selection:
            lengths[s.batch_row] += s.order.shape[0]
        kept = keep_picks(torch.zeros(B, width, dtype=torch.bool), rows_d, cols_d, picks)
        valid = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        position = torch.arange(width, device=device)
        ranked = torch.where(kept, position, position + width).argsort(dim=1)[:, :valid.shape[1]]
        valid = to_device(valid, device)
        return CrossLayout(ranked.masked_fill(~valid, 0), valid, width, valid.shape[1])
