"""Pruning a block diffusion VLM (DiffusionGemma): its encoder prefills the prompt into a KV cache, then
a decoder denoises a canvas of ``canvas_length`` tokens over several steps, each reading the whole
cache; the finished canvas is encoded into the cache, and the next canvas is denoised after it.

The encoder is pruned as any family's base model and language model are (:class:`.handle.PruneHandle`):
the prompt's kept tokens are prefilled at their original positions, so every denoising step of every
canvas reads ``L'`` cached prompt tokens instead of ``L``. What differs is who reads the cache after the
prefill, and how ``generate()`` masks it:

* each finished canvas reaches the encoder as a step of ``canvas_length`` tokens (not one), with masks
  built for the unpruned length: the base handle's decode step rebuilds them from the pruned mask,
  several tokens at once (``multi_token_steps``);
* the decoder reads the cache with masks that ``generate()`` built once per canvas from the unpruned
  2-D mask (the prompt's, the canvases', then the canvas being denoised): here they are rebuilt from
  the pruned one by the decoder's own builder, once per canvas, and where the caller numbers no
  canvas position the original numbering is continued (the decoder would count cache slots).
"""
from __future__ import annotations

import inspect

import torch

from .handle import PruneHandle, _brings_images, _cache_of, _static_length

# The decoder's masks are sized by the canvases appended since the prefill, which a static cache counts on
# the device only: counted on the host (a Python integer), every canvas of generate()'s compiled steps
# would compile anew.
STATIC_ERROR = (
    "zspa_kernels.prune: a block diffusion model prunes its prompt into a dynamic cache only (generate()'s "
    "default): its decoder's masks count the canvases appended since the prefill, which a static cache keeps "
    "on the device. Leave cache_implementation unset (or \"dynamic\"), or remove() the handle to run unpruned."
)


class BlockDiffusionPruneHandle(PruneHandle):
    """:class:`PruneHandle` for a family with ``block_diffusion`` (see the module docstring)."""

    multi_token_steps = True

    def _install(self, model, base, lm) -> list:
        # base: the model holding the encoder (which merges the image features) and the decoder.
        return [
            base.encoder.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            base.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
        ]

    def _base_pre_hook(self, module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is not None:
            if _static_length(cache) is not None and _brings_images(kwargs):
                raise RuntimeError(STATIC_ERROR)
            return super()._base_pre_hook(module, args, kwargs)
        # The encoder always fills a cache (its text model makes one where none is given) for the decoder to
        # read: made here, the prefill hook knows it, so the decoder's reads of it are masked as pruned.
        from transformers import DynamicCache

        kwargs[self._cache_arg] = DynamicCache(config=self.lm.config)
        edited = super()._base_pre_hook(module, args, kwargs)
        return (args, kwargs) if edited is None else edited

    def _decoder_pre_hook(self, module, args, kwargs):
        cache = _cache_of(kwargs)
        state = self._caches.get(cache) if cache is not None else None
        if state is None:  # a cache this handle did not prune: left as it is
            return None
        canvas = kwargs.get("decoder_input_ids", args[0] if args else None)
        B, q = canvas.shape
        mask = kwargs.get("decoder_attention_mask")
        index, valid = state.layout
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # the caller's, over the unpruned prompt
            if mask.shape[1] != state.original_len + state.grown + q:
                raise ValueError(f"decoder_attention_mask: expected {state.original_len + state.grown + q} columns "
                                 f"(the unpruned prompt's {state.original_len}, the {state.grown} tokens appended "
                                 f"since, the canvas's {q}), got {mask.shape[1]}")
            head = mask[:, :state.original_len].to(index.device).gather(1, index) * valid
            tail = mask[:, state.original_len:]
        elif mask is None:  # every slot of the cache read, as unpatched: the kept ones (not the re-padding)
            head, tail = valid, valid.new_ones(B, state.grown + q)
        else:  # generate()'s masks from the prompt's 2-D mask, then ones for the canvases
            head, tail = state.mask, state.mask.new_ones(B, state.grown + q)
        memo = state.decoder_masks
        if isinstance(mask, torch.Tensor) or memo is None or memo[0] is not mask or memo[1:3] != (state.grown, q):
            # As generate() builds them (a canvas of ids stands for the embeddings: their shape is read).
            build = module.create_diffusion_decoder_attention_mask  # its cache argument: past_key_values before 5.24
            cache_arg = "cache" if "cache" in inspect.signature(build).parameters else "past_key_values"
            built = build(config=self.config, inputs_embeds=canvas.unsqueeze(-1), **{cache_arg: cache},
                          decoder_attention_mask=torch.cat([head.bool(), tail.to(head.device).bool()], dim=1))
            state.decoder_masks = (mask, state.grown, q, built)
        built = state.decoder_masks[3]  # generate() hands every denoising step of a canvas the same masks
        kwargs["decoder_attention_mask"] = built
        if kwargs.get("decoder_position_ids") is None:
            kwargs["decoder_position_ids"] = (state.next_position + state.grown
                                              + torch.arange(q, device=canvas.device))
        return args, kwargs
