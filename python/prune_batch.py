"""A left-padded batch: rows with different numbers and sizes of images, pruned in ONE
selection call (every image is a row of a padded (images, tokens, D) tensor), then
re-padded on the left to the longest kept row. Beam search works on the pruned cache.

    python python/prune_batch.py                       # tiny random LLaVA-NeXT, no downloads
    python python/prune_batch.py --model PATH --image a.jpg --image b.jpg --image c.jpg
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import kv_cache
from example_inputs import (checkpoint_inputs, load_checkpoint, load_images, parser,
                            report)


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.model:
        model, processor = load_checkpoint(args.model)
        images = load_images(args.image, 3)
        inputs = checkpoint_inputs(processor, model, [images[:1], images[1:]])
        tokenizer = processor.tokenizer
    else:
        from zspa_kernels.integrations.transformers.tiny import llava_next

        tiny = llava_next()  # any-resolution: an image's token count follows its size
        model, inputs, tokenizer, processor = tiny.model, tiny.make_inputs(tiny.batch), None, None

    with torch.no_grad():
        full = kv_cache(model(**inputs, use_cache=True)).get_seq_length()
        with zspa_kernels.prune(model, keep=args.keep, tokenizer=tokenizer) as handle:
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, num_beams=2,
                                 do_sample=False, return_dict_in_generate=True)
    report(handle, out, inputs, args.new_tokens, full, processor)


if __name__ == "__main__":
    main()
