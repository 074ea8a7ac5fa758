"""The supported model families: what differs between them, as one table.

A family says where the language model sits, which token ids hold visual
features, how a run of visual tokens splits into images, and what extra
per-position state its language model takes (``on_prefill``). Adding a family is
one :class:`Family` entry (plus an ``on_prefill`` when its language model reads
more than embeddings, mask and positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    lm_attr: str = "language_model"
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)
    # Visual tokens per image when every image has the same count, so that adjacent
    # images (no text between them) are still split; None: each contiguous run is one image.
    tokens_per_image: Callable[[Any], Optional[int]] = lambda config: None
    # Called after the prefill gather with the Prefill record (see handle.py).
    on_prefill: Optional[Callable[..., None]] = None

    def visual_token_ids(self, config) -> list[int]:
        ids = [getattr(config, attr, None) for attr in self.visual_token_attrs]
        return [i for i in ids if i is not None]


def _llava_tokens_per_image(config) -> int:
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def _shift_rope_deltas(prefill) -> None:
    """Qwen2/2.5-VL keep ``rope_deltas`` (M-RoPE position minus cache slot) on the base
    model for decode steps without explicit positions: a row that dropped ``d`` tokens
    has its cache slots ``d`` behind its positions."""
    deltas = getattr(prefill.base, "rope_deltas", None)
    if deltas is not None and deltas.shape[0] == prefill.dropped.shape[0]:
        prefill.base.rope_deltas = deltas + prefill.dropped.to(deltas)[:, None]


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", ("llava",), tokens_per_image=_llava_tokens_per_image),
    Family("Qwen2-VL", ("qwen2_vl",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_shift_rope_deltas),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_shift_rope_deltas),
)


def find_family(model: torch.nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise ValueError(
        f"model: zspa_kernels.prune supports {names}; got model_type={model_type!r} "
        f"({type(model).__name__})"
    )


def split_model(model: torch.nn.Module, family: Family) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(base, language_model)``: the module that merges visual features into the
    embeddings, and the text decoder it calls. Accepts the ``...ForConditionalGeneration``
    wrapper or the base model itself."""
    base = model if hasattr(model, family.lm_attr) else getattr(model, "model", None)
    lm = getattr(base, family.lm_attr, None)
    if not isinstance(lm, torch.nn.Module):
        raise ValueError(f"model: expected a {family.name} model with .{family.lm_attr} "
                         f"(or .model.{family.lm_attr}), got {type(model).__name__}")
    return base, lm


def special_token_ids(config) -> set[int]:
    """Every ``*_token_id`` / ``*_token_index`` (and lists of them) in the config tree:
    bos/eos/pad, image/video placeholders, vision start/end markers, image boundaries."""
    found: set[int] = set()
    seen: set[int] = set()

    def visit(cfg) -> None:
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                visit(value)
        for attr in ("image_token_id", "video_token_id"):  # attribute_map aliases
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                found.add(value)

    visit(config)
    return found
