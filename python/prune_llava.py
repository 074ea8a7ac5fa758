"""LLaVA-1.5 with ZSPAPrune: one call, then generate() runs on the kept visual tokens.

    python python/prune_llava.py                       # tiny random LLaVA, no downloads
    python python/prune_llava.py --model PATH --image cat.jpg --keep 64
"""
import torch

import zspa_kernels
from zspa_kernels.integrations.transformers import cache_kwargs, kv_cache
from example_inputs import model_and_inputs, parser, report

FOLLOW_UP = "What colors does it have?"


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
            # A follow-up question on the same pruned cache, inside the block that pruned it: the whole
            # conversation's ids and mask, no pixel inputs (the image is in the cache, as kept).
            turn = next_turn(out, inputs, tokenizer, FOLLOW_UP)
            second = model.generate(**turn, **cache_kwargs(model, kv_cache(out)), max_new_tokens=args.new_tokens,
                                    do_sample=False, return_dict_in_generate=True)
    # generate() feeds every new token but the last through the model.
    unpruned = second.sequences.shape[1] - 1
    print(f"follow-up {FOLLOW_UP!r} on the same cache: {unpruned} tokens unpruned, "
          f"{kv_cache(second).get_seq_length()} pruned")
    answer = second.sequences[0, turn["input_ids"].shape[1]:]
    print(f"row 0 follow-up answer: {processor.decode(answer, skip_special_tokens=True) if processor else answer.tolist()}")


def next_turn(out, inputs: dict, tokenizer, question: str) -> dict:
    """The conversation so far (prompt and answer) and LLaVA-1.5's next user turn. The tiny model has no
    tokenizer: its answer's ids stand for the new text there."""
    if tokenizer is not None:
        text = tokenizer(f" USER: {question} ASSISTANT:", add_special_tokens=False, return_tensors="pt")
        new = text.input_ids.to(out.sequences.device).expand(out.sequences.shape[0], -1)
    else:
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
    ids = torch.cat([out.sequences, new], 1)
    mask = inputs["attention_mask"]
    return dict(input_ids=ids, attention_mask=torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - mask.shape[1])], 1))


if __name__ == "__main__":
    main()
