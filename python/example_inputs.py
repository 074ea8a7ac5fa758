"""Model and inputs for the examples: a tiny random model (default, no downloads) or a
local checkpoint with its processor and an image (``--model PATH --image FILE``)."""
from __future__ import annotations

import argparse

import torch

from zspa_kernels.integrations.transformers import kv_cache

QUESTION = "What is shown in this picture?"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", help="local checkpoint folder (default: a tiny random model)")
    p.add_argument("--image", action="append", help="image file (repeat for more; default: a gradient)")
    p.add_argument("--keep", type=keep_value, default=0.25,
                   help="an int token count (>= 1) or a fraction in (0, 1] per image, as prune() reads keep")
    p.add_argument("--new-tokens", type=positive_count, default=16, help="tokens generated per answer (>= 1)")
    return p


def positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int count >= 1, got {text!r}")
    return value


def keep_value(text: str):
    """``--keep`` as ``prune(keep=...)`` reads it: "16" a count, "1.0" every token, "0.25" a fraction."""
    from zspa_kernels.arguments import parse_keep

    try:
        return parse_keep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("keep: ")) from None


def model_and_inputs(args, n_images: int, tiny: str, rows=lambda built: built.single,
                     per_row=lambda images: [images]):
    """``(model, inputs, tokenizer, processor)``: the ``--model`` checkpoint with its processor, its
    ``--image`` files (else ``n_images`` made up) split into rows by ``per_row``; or, by default, the tiny
    random model ``tiny`` (a builder's name in ``integrations.transformers.tiny``) with its ``rows``."""
    if args.image and not args.model:
        raise SystemExit("--image: only with --model (the tiny random model has an image size of its own)")
    if args.model:
        images = load_images(args.image, n_images)  # before the checkpoint loads: a bad file is refused at once
        model, processor = load_checkpoint(args.model)
        inputs = checkpoint_inputs(processor, model, per_row(images))
        return model, inputs, processor.tokenizer, processor
    from zspa_kernels.integrations.transformers import tiny as builders

    built = getattr(builders, tiny)()
    return built.model, built.make_inputs(rows(built)), None, None


def load_checkpoint(path: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from zspa_kernels.arguments import checkpoint_problem

    if checkpoint_problem(path):  # a name that is no folder would be downloaded from the Hub
        raise SystemExit(f"--model: {checkpoint_problem(path)}")

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(path, torch_dtype="auto").to(device).eval()
    return model, processor


def checkpoint_inputs(processor, model, images_per_row: list[list], question: str = QUESTION) -> dict:
    """Prompts, one per row, each with its images before the question: in the processor's chat template, or
    where it has none as ``zspa demo`` prompts (:func:`zspa_kernels.demo.prompt_template`), one image token an
    image."""
    from zspa_kernels.demo import prompt_template

    template, texts = prompt_template(processor), []
    for images in images_per_row:
        if template is not None:
            token = getattr(processor, "image_token", "<image>")
            texts.append(template.replace(token, token * len(images)).format(question=question))
            continue
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
    inputs = processor(images=images_per_row, text=texts, padding=True, return_tensors="pt")
    return inputs.to(model.device)


def load_images(paths, count: int) -> list:
    from PIL import Image

    if paths:
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except FileNotFoundError:
                raise SystemExit(f"--image: {path}: no such file") from None
            except OSError as exc:  # PIL.UnidentifiedImageError among them
                raise SystemExit(f"--image: {path}: not an image PIL can read ({type(exc).__name__})") from None
        return images
    ramp = torch.linspace(0, 255, 336).to(torch.uint8)
    pixels = torch.stack([ramp[None].expand(336, -1), ramp[:, None].expand(-1, 336),
                          ramp.flip(0)[None].expand(336, -1)], -1)
    return [Image.fromarray(pixels.roll(i * 40, 0).numpy()) for i in range(count)]


def report(handle, out, inputs: dict, new_tokens: int, unpruned_len: int, processor=None) -> None:
    """What was kept per image, the KV cache saving, and the answers."""
    for sel in handle.last_selection:
        print(f"row {sel.batch_row} image {sel.image_index}: kept {len(sel.kept)} of "
              f"{sel.n_tokens} tokens ({sel.n_core} by relevance), first: {sel.kept[:8].tolist()}")
    # generate() feeds every new token but the last through the model.
    pruned_len = kv_cache(out).get_seq_length() - (new_tokens - 1)
    print(f"KV cache after prefill: {unpruned_len} tokens unpruned, {pruned_len} pruned")
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    for r, tokens in enumerate(new):
        text = processor.decode(tokens, skip_special_tokens=True) if processor else tokens.tolist()
        print(f"row {r} answer: {text}")
