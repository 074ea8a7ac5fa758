"""Pruning a vision-language-action model with a flow-matching action expert (PI0, PI0.5): the VLM (a PaliGemma)
prefills the prefix, each camera's image then the task, into a KV cache once; the action expert, a transformer
of its own layer for layer beside the VLM's language model, then denoises a chunk of actions over that cache at
every step of ``sample_actions`` (which crops the cache back to the prefix after each step), or once in a
``forward``.

The prefix is pruned as any family's prompt is (:class:`.handle.PruneHandle`): the kept tokens at their original
positions, so the VLM runs on ``L'`` tokens and every denoising step reads ``L'`` cached tokens instead of ``L``.
What differs is how the hooks see the prefix, and who reads the cache after it:

* The model hands the VLM embeddings, the images merged in (``embed_prefix``), after embedding the prompt's ids
  with the image tokens' replaced (by 0, as padding is). The image tokens are the positions where the VLM's
  embeddings differ from what its input embeddings gave those ids: exactly the positions the features were
  written to, whatever id stood there.
* The expert reads the cache with a mask that the model built from the caller's 2-D mask over the unpruned
  prefix (a mask of the wrong length for the pruned cache, which transformers cuts without a word). The hooks
  build it again by the model's rule (the prefix, PI0's state token with it, one bidirectional block; the action
  chunk a block after it) from that mask gathered as the prefix was. The expert's positions are the model's:
  it numbers the chunk after the unpruned prefix. Where the caller gives no mask, the expert would count the
  pruned cache's slots; it gets the unpruned numbering instead.
"""
from __future__ import annotations

import inspect

import torch

from .handle import PruneHandle, _cache_of, _host_length

# The expert's mask and positions continue the prefix; a cache that holds more than the prefix (a step's chunk
# left in it) has no unpruned counterpart to number or mask them by.
UNCROPPED_ERROR = (
    "zspa_kernels.prune: the action expert reads a pruned prefix cache that holds {held} tokens past the prefix: "
    "crop it back to the prefix after each denoising step, as sample_actions() does "
    "(cache.crop(prefix_length - cache.get_seq_length()))"
)
# Called on its own, the expert brings masks and positions of the caller's making, which the hooks cannot map.
DIRECT_ERROR = (
    "zspa_kernels.prune: the action expert was called on a pruned prefix cache outside the model's forward; "
    "call the model (sample_actions() or forward()), whose masks the hooks rebuild for the pruned prefix, or "
    "remove() the handle"
)


class ActionExpertPruneHandle(PruneHandle):
    """:class:`PruneHandle` for a family with ``action_expert`` (see the module docstring)."""

    def _install(self, model, base, lm) -> list:
        # base: the model holding the VLM and the expert (PI0Model); lm: the VLM's language model.
        self._embedded = None  # (ids, embeddings): what the VLM's input embeddings last gave
        self._prefix_mask = None  # (the caller's 2-D mask or None,) of this call of the model holding the expert
        return [
            base.vlm.get_input_embeddings().register_forward_hook(self._note_embedded),
            base.vlm.register_forward_pre_hook(self._vlm_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_post_hook, with_kwargs=True),
            base.register_forward_pre_hook(self._note_prefix_mask, with_kwargs=True),
            base.dit.register_forward_pre_hook(self._expert_pre_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        super().remove()
        self._embedded = self._prefix_mask = None

    def _note_embedded(self, module, args, output):
        self._embedded = (args[0], output) if args else None

    def _note_prefix_mask(self, module, args, kwargs):
        self._prefix_mask = (kwargs.get("attention_mask"),)

    def _vlm_pre_hook(self, module, args, kwargs):
        embedded, self._embedded = self._embedded, None
        embeds = kwargs.get("inputs_embeds")
        given_ids = kwargs.get("input_ids", args[0] if args else None)
        if (given_ids is None and embeds is not None and embedded is not None and _cache_of(kwargs) is None
                and embedded[0].shape == embeds.shape[:2]):
            ids, table = embedded
            merged = (embeds != table.to(embeds.dtype)).any(-1).to(ids.device)
            return self._prompt(args, kwargs, ids.masked_fill(merged, self.visual_ids[0]), None, merged=True)
        return self._base_pre_hook(module, args, kwargs)

    def _expert_pre_hook(self, module, args, kwargs):
        recorded, self._prefix_mask = self._prefix_mask, None
        cache = _cache_of(kwargs)
        state = self._caches.get(cache) if cache is not None else None
        if state is None or not state.dropped:  # not a cache this handle pruned; keep-all: read as unpatched
            return None
        if recorded is None:
            raise RuntimeError(DIRECT_ERROR)
        length = _host_length(cache)
        if length is not None and length != state.pruned_len:
            raise RuntimeError(UNCROPPED_ERROR.format(held=length - state.pruned_len))
        chunk = kwargs.get("inputs_embeds", args[0] if args else None)
        B, q = chunk.shape[:2]
        index, valid = state.layout
        mask = recorded[0]
        if mask is None:  # every slot read, as unpatched: the kept ones (not the re-padding)
            head = valid.long()
        elif mask.dim() != 2 or mask.shape[1] != state.original_len:
            raise ValueError(f"attention_mask: expected ({B}, {state.original_len}), a 2-D mask over the unpruned "
                             f"prefix the cache was prefilled from, got {tuple(mask.shape)}")
        else:
            head = mask.to(index.device).gather(1, index) * valid
        from transformers.masking_utils import create_causal_mask

        device = chunk.device
        chunk_size = self.config.chunk_size
        # The model's blocks: the prefix (and whatever precedes the action chunk in this call), then the chunk.
        blocks = torch.cat([torch.zeros(state.pruned_len + q - chunk_size, dtype=torch.long, device=device),
                            torch.ones(chunk_size, dtype=torch.long, device=device)])[None].repeat(B, 1)
        build = dict(config=self.config.dit_config, inputs_embeds=chunk, block_sequence_ids=blocks,
                     attention_mask=torch.cat([head.to(device), head.new_ones(B, q, device=device)], dim=1))
        build["cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"] = cache
        kwargs["attention_mask"] = create_causal_mask(**build)
        if kwargs.get("position_ids") is None:  # the expert would count the pruned cache's slots
            kwargs["position_ids"] = (torch.arange(q, device=device) + state.original_len)[None]
        return args, kwargs
