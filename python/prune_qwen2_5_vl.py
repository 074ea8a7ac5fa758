"""Qwen2.5-VL with ZSPAPrune: two images and a video in one prompt, each budgeted alone.

Qwen's M-RoPE positions are 3-D; the hooks keep every kept token's original position, so
the language model sees the same geometry minus the dropped tokens.

    python python/prune_qwen2_5_vl.py                  # tiny random Qwen2.5-VL, no downloads
    python python/prune_qwen2_5_vl.py --model PATH --image a.jpg --image b.jpg --keep 0.1
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import kv_cache
from example_inputs import model_and_inputs, parser, report


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = [[("text", 3), ("image", (8, 8)), ("image", (4, 8)), ("video", (2, 8, 8)),
             ("text", 6)]]  # the tiny model's: image grids (h, w) and the video's (t, h, w), in patches
    model, inputs, tokenizer, processor = model_and_inputs(args, 2, "qwen2_5_vl", rows=lambda _: rows)

    with torch.no_grad():
        full = kv_cache(model(**inputs, use_cache=True)).get_seq_length()
        # relevance="max": each token's best match over the question's tokens, not the mean.
        with zspa_kernels.prune(model, keep=args.keep, relevance="max",
                                tokenizer=tokenizer) as handle:
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
    report(handle, out, inputs, args.new_tokens, full, processor)


if __name__ == "__main__":
    main()
