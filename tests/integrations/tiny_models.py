"""Tiny randomly initialised VLMs built from configs (no downloads), with matching inputs.

Each builder returns ``(model, make_inputs)``; ``make_inputs(rows)`` turns a list of
rows, each a list of segments (``("text", n)`` or ``("image", size)``), into the
keyword arguments of ``model(...)``/``model.generate(...)`` with left padding.
"""
from __future__ import annotations

import torch

VOCAB = 128
PAD = 0
TEXT_IDS = (1, 90)  # ordinary text tokens are drawn from this range


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_IDS, (n,), generator=gen).tolist()


def _left_pad(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _finish(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    model.config._attn_implementation = attn
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = attn
    return model.eval()


def llava(attn: str = "sdpa", seed: int = 0):
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

    def make_inputs(rows, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        ids, n_images = [], 0
        for segments in rows:
            row = []
            for kind, n in segments:
                if kind == "text":
                    row += _text(n, gen)
                else:
                    row += [image_token] * tokens
                    n_images += 1
            ids.append(row)
        out = _left_pad(ids)
        out["pixel_values"] = torch.randn(n_images, 3, 16, 16, generator=gen)
        return out

    return model, make_inputs
