"""Tiny randomly initialised VLMs built from configs (no downloads), with matching inputs.

Each builder returns ``(model, make_inputs)``; ``make_inputs(rows)`` turns a list of
rows, each a list of segments (``("text", n)`` or ``("image", size)``), into the
keyword arguments of ``model(...)``/``model.generate(...)`` with left padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VOCAB = 128
PAD = 0
TEXT_IDS = (1, 90)  # ordinary text tokens are drawn from this range


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_IDS, (n,), generator=gen).tolist()


def _generators(rows, seeds) -> list[torch.Generator]:
    """One generator per row, so a row's content depends only on its own seed: the
    same row built alone (``seeds=[r]``) equals row ``r`` of the batch."""
    seeds = range(len(rows)) if seeds is None else seeds
    return [torch.Generator().manual_seed(1000 + s) for s in seeds]


def _left_pad(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TinyVLM:
    model: torch.nn.Module
    make_inputs: Callable[..., dict]  # (rows, seeds=None) -> model kwargs
    single: list  # one row: text, image, text
    batch: list  # rows of different lengths and image counts/sizes


def _finish(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    model.set_attn_implementation(attn)
    # Decode until max_new_tokens: an early eos would make step-by-step comparisons ragged.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


def llava(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=4),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
                                eos_token_id=2),
        image_token_id=image_token, image_seq_length=16, pad_token_id=PAD,
    )
    model = _finish(LlavaForConditionalGeneration(config), attn)
    tokens = 16  # (16 / 4) ** 2 patches, CLS dropped

    def make_inputs(rows, seeds=None) -> dict:
        ids, pixels = [], []
        for segments, gen in zip(rows, _generators(rows, seeds)):
            row = []
            for kind, n in segments:
                if kind == "text":
                    row += _text(n, gen)
                else:
                    row += [image_token] * tokens
                    pixels.append(torch.randn(3, 16, 16, generator=gen))
            ids.append(row)
        return dict(_left_pad(ids), pixel_values=torch.stack(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 1), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])


BUILDERS = {"llava": llava}
