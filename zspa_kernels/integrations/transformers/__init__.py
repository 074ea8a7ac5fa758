"""ZSPAPrune for Hugging Face transformers VLMs: ``zspa_kernels.prune(model, ...)``."""
from __future__ import annotations

import warnings
from typing import Union

import torch

from ...spec import DEFAULT_CORE_RATIO
from .action_expert import ActionExpertPruneHandle
from .block_diffusion import BlockDiffusionPruneHandle
from .cross_attention import CrossAttentionPruneHandle
from .encoder_decoder import EncoderDecoderPruneHandle
from .families import FAMILIES, find_family
from .handle import PruneHandle, cache_kwargs, kv_cache
from .selection import ImageSelection


def prune(
    model: torch.nn.Module,
    keep: Union[int, float] = 64,
    core_ratio: float = DEFAULT_CORE_RATIO,
    relevance: str = "mean",
    prompt: str = "question",
    backend: str = "auto",
    tokenizer=None,
) -> PruneHandle:
    """Run ``model``'s language model on ZSPAPrune-selected visual tokens only.

    Installs forward hooks (nothing is patched); ``generate()`` and ``forward()`` then
    prefill with ``keep`` tokens per image and decode from the shorter KV cache; ``labels``
    are gathered with the kept positions. Every argument is checked before any hook is
    installed; a model type outside ``FAMILIES`` raises ``ValueError``.

    Args:
        model: a supported VLM (``...ForConditionalGeneration`` or its base model), or a
            PEFT wrapper of one (``PeftModel``: the hooks go on ``get_base_model()``, which
            the adapter's forward and ``generate()`` run through).
        keep: visual tokens kept per image: an int count, or a float fraction in (0, 1]
            of each image's tokens (rounded half up, at least 1: ``spec.keep_budget``).
        core_ratio: share of the budget chosen by prompt relevance alone (the rest:
            greedy max-min diversity seeded by that core).
        relevance: ``"mean"`` (cosine to the mean-pooled prompt) or ``"max"``.
        prompt: ``"question"`` (text after the first image, or before it when none
            follows; special tokens removed) or ``"all_text"`` (every attended non-visual
            token). A training call's answer (the ``labels`` that mark part of a row's
            question text; where they mark all of it, the assistant turns of the chat
            template of ``tokenizer``) is left out of either, so training selects as
            generation will; labels over all of a row's question text with no assistant
            turn found in it warn. Without labels, text after the template's last assistant
            header (a scored candidate answer) is no ``"question"`` either, and in either mode
            nor are the trailing tokens a call scores (``logits_to_keep`` - 1 of them: the first
            drafts assisted and prompt-lookup decoding prefill with the prompt).
            ``ImageSelection.prompt_tokens`` records the positions used.
        backend: ``zspa::select_tokens`` backend (``"auto"``, ``"reference"``, ...).
        tokenizer: optional, a tokenizer or the processor holding one: its special
            tokens (named, extra, and every added token marked special) and the tokens it
            decodes to whitespace or control characters alone (the newlines processors write
            around images and between rows of tiles, Fuyu's ``<0x04>``) are also left out of
            ``"question"``, and so are the text of its chat template (``USER:``,
            ``ASSISTANT:``, ``<start_of_turn>model``, a default system prompt), the
            timestamp before a Qwen3-VL video's first frame and the words and robot state
            PI0.5's processor writes around the task.
            Image markers that the config does not name (most families' tile, slice and
            begin/end markers) are known only to it: where the family's processors write
            such markers (``Family.unnamed_markers``), ``prompt="question"`` without it warns.

    Returns:
        A :class:`PruneHandle`: a context manager with ``.remove()``; after each pruned
        prefill ``handle.last_selection`` lists an :class:`ImageSelection` per image
        (batch-row order, then image order), and ``handle.last_kept_positions`` maps the
        positions of its (shorter) outputs to the input positions they came from.
        Decode a pruned KV cache before the handle is removed: the unpatched model reads it as
        the start of the unpruned sequence, at shifted positions, and nothing can warn it.
    """
    unwrap = getattr(model, "get_base_model", None)  # peft's PeftModel (LoRA adapters, unmerged)
    wrapped = unwrap() if callable(unwrap) else None
    if isinstance(wrapped, torch.nn.Module):
        model = wrapped
    family = find_family(model)
    handle = (CrossAttentionPruneHandle if family.cross_attention
              else BlockDiffusionPruneHandle if family.block_diffusion
              else EncoderDecoderPruneHandle if family.encoder_decoder
              else ActionExpertPruneHandle if family.action_expert else PruneHandle)
    handle = handle(model, family, keep, core_ratio, relevance, prompt, backend, tokenizer)
    if prompt == "question" and tokenizer is None and family.writes_unnamed_markers(model.config):
        warnings.warn(f"prune(): {family.name} processors write image markers (or row breaks) that model.config "
                      "does not name; without tokenizer= they count as question text, and a question written "
                      "before its image can then be ranked by them alone: pass the processor, "
                      "prune(model, ..., tokenizer=processor)", UserWarning, stacklevel=2)
    return handle


__all__ = ["prune", "PruneHandle", "ImageSelection", "FAMILIES", "cache_kwargs", "kv_cache"]
