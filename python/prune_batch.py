"""A left-padded batch: rows with different numbers and sizes of images, pruned in ONE
selection call (every image is a row of a padded (images, tokens, D) tensor), then
re-padded on the left to the longest kept row. Beam search works on the pruned cache.

    python python/prune_batch.py                       # tiny random LLaVA-NeXT, no downloads
    python python/prune_batch.py --model PATH --image a.jpg --image b.jpg --image c.jpg
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import kv_cache
from example_inputs import model_and_inputs, parser, report


def main() -> None:
    args = parser(__doc__).parse_args()
    # The tiny model: LLaVA-NeXT, any-resolution (an image's token count follows its size).
    model, inputs, tokenizer, processor = model_and_inputs(
        args, 3, "llava_next", rows=lambda tiny: tiny.batch, per_row=lambda images: [images[:1], images[1:]])

    with torch.no_grad():
        full = kv_cache(model(**inputs, use_cache=True)).get_seq_length()
        with zspa_kernels.prune(model, keep=args.keep, tokenizer=tokenizer) as handle:
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, num_beams=2,
                                 do_sample=False, return_dict_in_generate=True)
    report(handle, out, inputs, args.new_tokens, full, processor)


if __name__ == "__main__":
    main()
