"""Pruning an encoder-decoder VLM (T5Gemma 2): the encoder reads the prompt, images merged into it, with
bidirectional attention; the decoder generates, attending to the encoder's output at every step through
cross-attention (its keys and values cached once).

The encoder is pruned as a decoder-only family's language model is (:class:`.handle.PruneHandle`): the
kept tokens at their original positions, so the encoder runs on ``L'`` tokens and every decoding step
cross-attends to ``L'`` of them instead of ``L``. The decoder's own sequence is untouched. What it reads
of the encoder's output is masked by the caller's (or ``generate()``'s) 2-D mask over the unpruned prompt:
the hooks gather that mask as the encoder's tokens were gathered, also where ``generate()`` repeated each
row for beams or several sequences (``repeat_interleave`` of the rows, the encoder's output with them).

Where the encoder merges the images itself (T5Gemma 2), its own ``input_ids`` say where they are. Where
the model merges them and hands the encoder embeddings alone (Florence-2, whose ``generate()`` merges them
outside any forward), the ids are those the model's input embeddings last embedded, if they match the
embeddings' shape: the prompt's, as the model embeds them right before it merges the images and calls the
encoder (the decoder embeds its tokens with a table of its own). Where the encoder numbers its tokens
itself, from 0, with a table of learned absolute positions (Florence-2's BART: its forward takes no
``position_ids``), the hooks read that table at the kept tokens' original positions instead.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .handle import PruneHandle


class EncoderDecoderPruneHandle(PruneHandle):
    """:class:`PruneHandle` for a family with ``encoder_decoder`` (see the module docstring)."""

    def _install(self, model, base, lm) -> list:
        # base: the model holding the encoder and the decoder: T5Gemma 2's (its encoder merges the image
        # features; lm is the encoder's text model), or Florence-2's (it merges them; lm is its BART's encoder).
        self._encoded: Optional[tuple] = None  # (index, valid, L) of the last pruned encoding
        self._embedded: Optional[torch.Tensor] = None  # the ids the model's input embeddings last embedded
        self._positions: Optional[torch.Tensor] = None  # the kept tokens' positions, for a learned table
        encoder = getattr(base, "encoder", None) or lm
        decoder = getattr(base, "decoder", None) or base.language_model.decoder
        hooks = [
            encoder.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
        ]
        if encoder is lm:  # handed embeddings alone: the prompt's ids are the ones the model embedded
            hooks.append(model.get_input_embeddings().register_forward_pre_hook(self._note_embedded))
        self._learned_positions = ("position_ids" not in inspect.signature(lm.forward).parameters
                                   and isinstance(getattr(lm, "embed_positions", None), torch.nn.Embedding))
        if self._learned_positions:
            hooks.append(lm.embed_positions.register_forward_hook(self._kept_positions))
        return hooks

    def remove(self) -> None:
        super().remove()
        self._encoded = self._embedded = self._positions = None

    def _note_embedded(self, module, args):
        self._embedded = args[0] if args else None

    def _base_pre_hook(self, module, args, kwargs):
        self._positions = None
        embedded, self._embedded = self._embedded, None
        ids, embeds = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        if ids is None and embeds is not None and embedded is not None and embedded.shape == embeds.shape[:2]:
            # The encoder runs on the embeddings of these ids, the images merged in by the model.
            return self._prompt(args, kwargs, embedded, None, merged=True)
        return super()._base_pre_hook(module, args, kwargs)

    def _prefill(self, ids, embeds, cache, inputs, kwargs, offset: int = 0) -> None:
        super()._prefill(ids, embeds, cache, inputs, kwargs, offset)  # offset 0: the encoder takes no cache
        self._encoded = None if self._layout is None else (*self._layout, ids.shape[1])
        if self._learned_positions:  # the encoder takes no positions: its table is read at them
            self._positions = kwargs.pop("position_ids", None)  # none where nothing was selected

    def _kept_positions(self, module, args, output):
        """The learned position table's rows at the kept tokens' original positions (``(B, L')``), where the
        encoder would number its ``L'`` tokens from 0, as the unpatched table's forward reads them."""
        positions, self._positions = self._positions, None
        if positions is None:
            return None
        return torch.nn.Embedding.forward(module, positions + getattr(module, "offset", 0))  # BART: 2

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
