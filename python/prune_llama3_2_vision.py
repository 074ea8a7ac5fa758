"""Llama 3.2 Vision with ZSPAPrune: the images are read by cross-attention layers, not as tokens.

Each image is one <|image|> token in the text; its tiles' features (1601 a tile at 560 px) are the
keys and values of the text model's cross-attention layers. prune() keeps the text sequence as it
is and hands those layers each image's kept tokens (all its tiles one budget), so what shrinks is
their keys, values and cache, not the prefill's positions.

    python python/prune_llama3_2_vision.py             # tiny random Llama 3.2 Vision, no downloads
    python python/prune_llama3_2_vision.py --model PATH --image a.jpg --keep 0.1
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import kv_cache
from example_inputs import model_and_inputs, parser


def cross_attention_tokens(model, cache) -> int:
    """The tokens a cross-attention layer of ``cache`` holds (its keys' length)."""
    layer = model.config.get_text_config().cross_attention_layers[0]
    return cache.layers[layer].keys.shape[-2]


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = [[("text", 3), ("image", 2), ("text", 4), ("image", 4), ("text", 6)]]  # the tiny model's: 2 and 4 tiles
    model, inputs, tokenizer, processor = model_and_inputs(args, 1, "mllama", rows=lambda _: rows)

    with torch.no_grad():
        full = cross_attention_tokens(model, kv_cache(model(**inputs, use_cache=True)))
        with zspa_kernels.prune(model, keep=args.keep, tokenizer=tokenizer) as handle:
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
    for sel in handle.last_selection:
        print(f"row {sel.batch_row} image {sel.image_index}: kept {len(sel.kept)} of "
              f"{sel.n_tokens} tokens ({sel.n_core} by relevance), first: {sel.kept[:8].tolist()}")
    pruned = cross_attention_tokens(model, kv_cache(out))
    print(f"cross-attention cache: {full} tokens unpruned, {pruned} pruned (each of its layers)")
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    for r, tokens in enumerate(new):
        text = processor.decode(tokens, skip_special_tokens=True) if processor else tokens.tolist()
        print(f"row {r} answer: {text}")


if __name__ == "__main__":
    main()
