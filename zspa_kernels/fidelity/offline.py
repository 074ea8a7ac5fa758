"""The offline default of ``zspa fidelity``: scikit-image photos, a few questions, and a
small LLaVA-1.5 architecture with RANDOM weights (no download).

It shows what the tool measures and how long it takes; its numbers say nothing about
answer quality (random weights answer nothing). The model is the tiny LLaVA config of
:mod:`zspa_kernels.models` (CLIP ViT at 336 px, 576 visual tokens, a 2-layer Llama) with
the demo's processor (CLIP preprocessing, a word-level tokenizer built in code), whose
vocabulary is extended by the words of these questions.
"""
from __future__ import annotations

import torch

from .samples import SKIMAGE, Sample

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
QUESTIONS = ("What is in this picture?", "Which colour is the main object?")
LABEL = "random-weight LLaVA-1.5 architecture (tiny)"


def samples() -> list[Sample]:
    return [Sample(f"skimage {photo}: {question}", SKIMAGE + photo, question)
            for photo in PHOTOS for question in QUESTIONS]


def build(device: torch.device, dtype: torch.dtype):
    """``(model, processor, template)`` of the offline default."""
    from tokenizers import AddedToken
    from transformers import LlavaForConditionalGeneration

    from .. import demo, models

    processor = demo.build_processor()
    tokenizer = processor.tokenizer
    words = {w.strip("?.,").lower() for q in QUESTIONS for w in q.split()} - set(tokenizer.get_vocab())
    tokenizer.add_tokens([AddedToken(w, single_word=True) for w in sorted(words)])
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids: LLaVA takes none
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = models.llava_config("tiny", vocab_size=len(tokenizer), image_token_index=image_token)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    generation = model.generation_config
    generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    generation.suppress_tokens = [image_token]  # an answer holds no image placeholders
    return model, processor, demo.prompt_template(processor)  # LLaVA-1.5's: the processor has no chat template
