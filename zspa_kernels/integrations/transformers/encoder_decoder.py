"""Pruning an encoder-decoder VLM (T5Gemma 2): the encoder reads the prompt, images merged into it, with
bidirectional attention; the decoder generates, attending to the encoder's output at every step through
cross-attention (its keys and values cached once).

The encoder is pruned as a decoder-only family's language model is (:class:`.handle.PruneHandle`): the
kept tokens at their original positions, so the encoder runs on ``L'`` tokens and every decoding step
cross-attends to ``L'`` of them instead of ``L``. The decoder's own sequence is untouched. What it reads
of the encoder's output is masked by the caller's (or ``generate()``'s) 2-D mask over the unpruned prompt:
the hooks gather that mask as the encoder's tokens were gathered, also where ``generate()`` repeated each
row for beams or several sequences (``repeat_interleave`` of the rows, the encoder's output with them).
"""
from __future__ import annotations

from typing import Optional

import torch

from .handle import PruneHandle


class EncoderDecoderPruneHandle(PruneHandle):
    """:class:`PruneHandle` for a family with ``encoder_decoder`` (see the module docstring)."""

    def _install(self, model, base, lm) -> list:
        # base: the model holding the encoder (which merges the image features) and the decoder.
        self._encoded: Optional[tuple] = None  # (index, valid, L) of the last pruned encoding
        return [
            base.encoder.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            base.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        super().remove()
        self._encoded = None

    def _prefill(self, ids, embeds, cache, inputs, kwargs) -> None:
        super()._prefill(ids, embeds, cache, inputs, kwargs)
        self._encoded = None if self._layout is None else (*self._layout, ids.shape[1])

    def _decoder_pre_hook(self, module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if self._encoded is None or states is None:
            return None
        index, valid, length = self._encoded
        mask = kwargs.get("encoder_attention_mask")
        rows = states.shape[0]
        if states.shape[1] != index.shape[1] or rows % index.shape[0]:
            return None  # an output this handle's last encoding did not make: left as it is
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] != length:
            if mask.shape[1] == states.shape[1]:
                return None  # already over the encoder's (pruned) output
            raise ValueError(f"encoder_attention_mask: expected {length} columns (the unpruned prompt's) or "
                             f"{states.shape[1]} (the pruned encoder output's), got {mask.shape[1]}")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError("encoder_attention_mask: expected a 2-D mask over the prompt (or None), got "
                             f"{type(mask).__name__}: the encoder's output was pruned, a prebuilt mask cannot be")
        repeats = rows // index.shape[0]  # generate() repeats each row for beams / several sequences
        index, valid = index.repeat_interleave(repeats, 0), valid.repeat_interleave(repeats, 0)
        if mask is None:  # every position of the output read, as unpatched: the kept ones (not the re-padding)
            pruned = valid.long()
        else:
            pruned = mask.to(index.device).gather(1, index) * valid
        kwargs["encoder_attention_mask"] = pruned.to(mask.dtype if mask is not None else torch.long)
        return args, kwargs
