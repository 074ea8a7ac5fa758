"""The Python API: ``zspa_kernels.select_tokens``, a thin layer over the op."""
from __future__ import annotations

from typing import Optional

import torch

from .checks import check_lengths_range, check_prompt_values, check_python_types
from .spec import DEFAULT_CORE_RATIO


def select_tokens(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    k: int,
    core_ratio: float = DEFAULT_CORE_RATIO,
    lengths: Optional[torch.Tensor] = None,
    prompt_mask: Optional[torch.Tensor] = None,
    relevance: str = "mean",
    backend: str = "auto",
    pick_order: bool = False,
    strict: bool = False,
) -> torch.Tensor:
    """Choose ``k`` visual tokens per row by ZSPAPrune (prompt relevance + max-min diversity).

    Args:
        visual: ``(B, N, D)`` visual tokens in the language model's embedding space
            (fp32, fp16 or bf16). Row ``b`` uses its first ``lengths[b]`` tokens.
        prompt: the prompt, pooled ``(B, D)`` or per text token ``(B, T, D)``; same dtype
            and device as ``visual``.
        k: token budget per row (``>= 1``). Rows with fewer valid tokens keep them all.
        core_ratio: share ``alpha`` of the budget taken by relevance alone
            (``k_core = floor(alpha * min(k, n) + 0.5)``); the rest is filled by greedy
            max-min diversity seeded with the core. ``0`` is pure diversity (DivPrune).
        lengths: optional int32/int64 ``(B,)`` valid token counts in ``[1, N]``.
        prompt_mask: optional bool ``(B, T)`` marking valid rows of a per-token prompt.
        relevance: ``"mean"`` (cosine to the mean-pooled prompt, the paper's rule) or
            ``"max"`` (best cosine over the prompt tokens). Finite rows pool to a finite mean
            however close to float32's limit they lie (``spec.pool_shift``).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; ``auto`` may be
            overridden by the ``ZSPA_BACKEND`` environment variable.
        pick_order: return indices in pick order (core by falling relevance, then
            diversity picks) instead of ascending order.
        strict: also check values that need a device-to-host sync: ``lengths`` range on
            accelerators, non-finite prompts, rows without a valid prompt token, a ``"mean"``
            prompt whose sum leaves float32's range (checked
            after the op, which has validated everything else; their selection is
            well defined, so nothing is returned unchecked).

    Returns:
        ``(B, k)`` int64 kept indices, ascending (or in pick order), padded with ``-1``.
    """
    check_python_types(visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend, pick_order, strict)
    # numpy integers and reals reach the op as Python's (a SymInt k stays symbolic)
    k, core_ratio = k if isinstance(k, torch.SymInt) else int(k), float(core_ratio)
    kept = torch.ops.zspa.select_tokens(
        visual, prompt, k, core_ratio, lengths, prompt_mask, relevance, backend, pick_order
    )
    if strict:
        if visual.device.type != "cpu":  # the op checks lengths on the CPU (no sync there)
            check_lengths_range(visual, lengths)
        check_prompt_values(prompt, prompt_mask)
    return kept
