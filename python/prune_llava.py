"""LLaVA-1.5 with ZSPAPrune: one call, then generate() runs on the kept visual tokens.

    python python/prune_llava.py                       # tiny random LLaVA, no downloads
    python python/prune_llava.py --model PATH --image cat.jpg --keep 64
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import kv_cache
from example_inputs import model_and_inputs, parser, report


def main() -> None:
    args = parser(__doc__).parse_args()
    model, inputs, tokenizer, processor = model_and_inputs(args, 1, "llava")

    with torch.no_grad():
        full = kv_cache(model(**inputs, use_cache=True)).get_seq_length()
        # The one line: hooks on the language model; leave the block to remove them.
        with zspa_kernels.prune(model, keep=args.keep, tokenizer=tokenizer) as handle:
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
    report(handle, out, inputs, args.new_tokens, full, processor)


if __name__ == "__main__":
    main()
