"""The (image, question) pairs a fidelity run measures, and the model inputs made from them.

Sources: a JSON-lines file (one ``{"image": PATH, "question": TEXT}`` object a line;
relative paths are read from the file's folder), a folder of images with one question,
or the offline default (:mod:`.offline`). A bad sample (missing or unreadable image,
empty question, a line that is not such an object) is reported with its line number
(or file name) and skipped; it never stops the run.
"""
from __future__ import annotations

import inspect
import json
import pathlib
from dataclasses import dataclass
from typing import Optional

import torch

SKIMAGE = "skimage:"  # image paths with this prefix name a scikit-image sample photo


@dataclass(frozen=True)
class Sample:
    label: str  # where it came from, for reports: "data.jsonl line 3", "cat.png"
    image: str  # a file path, or "skimage:<name>"
    question: str


def open_image(image: str):
    """The image as RGB, fully decoded (so that an unreadable file fails here)."""
    from PIL import Image

    if image.startswith(SKIMAGE):
        from skimage import data

        return Image.fromarray(getattr(data, image[len(SKIMAGE):])()).convert("RGB")
    with Image.open(image) as file:
        return file.convert("RGB")


def _problem(sample: Sample) -> Optional[str]:
    """Why ``sample`` cannot be measured, or None."""
    if sample.question is None:
        return 'no "question"'
    if not isinstance(sample.question, str):
        return f'"question": expected a string, got {type(sample.question).__name__}'
    if not sample.question.strip():
        return "empty question"
    if not sample.image.startswith(SKIMAGE) and not pathlib.Path(sample.image).is_file():
        return f"image not found: {sample.image}"
    try:
        open_image(sample.image)
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the sample unusable
        return f"unreadable image {sample.image}: {exc}"
    return None


def _keep_if_good(sample: Sample, good: list[Sample], bad: list[str]) -> None:
    problem = _problem(sample)
    if problem is None:
        good.append(sample)
    else:
        bad.append(f"{sample.label}: {problem}")


def read_jsonl(path: pathlib.Path) -> tuple[list[Sample], list[str]]:
    """Samples of a JSON-lines file, and one message per bad line (blank lines are skipped). UTF-8, with or
    without a byte-order mark (editors that save one would cost the first line)."""
    good, bad = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:  # an image, or any other binary file
        raise ValueError(f"--data: expected a JSON-lines file (UTF-8 text) or a folder of images, got {path.name!r}, "
                         "which is not text; a single image: put it in a folder and pass --question") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"{label}: not JSON ({exc.msg})")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            bad.append(f'{label}: expected an object with "image" (a path) and "question"')
            continue
        image = pathlib.Path(item["image"])
        image = image if image.is_absolute() else path.parent / image
        _keep_if_good(Sample(label, str(image), item.get("question")), good, bad)
    return good, bad


def read_folder(folder: pathlib.Path, question: Optional[str]) -> tuple[list[Sample], list[str]]:
    """Every file of ``folder`` (sorted by name) with the one ``question``."""
    if not question or not question.strip():
        raise ValueError("--question: a folder of images needs one question for all of them")
    good: list[Sample] = []
    bad: list[str] = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        _keep_if_good(Sample(file.name, str(file), question), good, bad)
    return good, bad


def read_samples(data: str, question: Optional[str] = None) -> tuple[list[Sample], list[str]]:
    """``data``: a JSON-lines file, or a folder of images (then ``question`` is required)."""
    path = pathlib.Path(data)
    if path.is_dir():
        return read_folder(path, question)
    if not path.is_file():
        raise ValueError(f"--data: expected a JSON-lines file or a folder of images, got {data!r}")
    if question is not None:
        raise ValueError("--question: only for a folder of images; a JSON-lines file has a question per line")
    return read_jsonl(path)


class Prompts:
    """Model inputs of a batch of samples: each question in the processor's chat template
    (or ``template``, a ``str.format`` pattern with ``{question}``), one image each,
    rows left-padded as ``generate()`` needs (the processor's own padding side is left as it is)."""

    def __init__(self, processor, model, template: Optional[str] = None):
        self.processor = processor
        self.template = template
        takes = inspect.signature(model.forward).parameters
        # Tokenizers that return token_type_ids for models that take none (generate() refuses them); labels, which
        # PaliGemma's processor returns for every prompt (all -100 without a suffix): a prompt has no answer to score.
        self.drop = {"labels"} | (set() if "token_type_ids" in takes else {"token_type_ids"})
        # Models that read the processor's mm_token_type_ids (Cosmos3-Edge's 3-D positions need them), which
        # processors return only when asked.
        self.kwargs = {"return_mm_token_type_ids": True} if "mm_token_type_ids" in takes else {}
        # Lists the model takes by name (UnlimitedOCR's crop counts and grids, which its processor keeps as lists);
        # other non-tensor outputs of a processor are its own business.
        self.lists = {name for name in takes if name not in self.drop}

    def text(self, question: str) -> str:
        if self.template is not None:
            return self.template.format(question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, samples: list[Sample]) -> dict:
        images = [[open_image(s.image)] for s in samples]
        texts = [self.text(s.question) for s in samples]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt", **self.kwargs)
        finally:  # the caller's processor, as it was
            tokenizer.padding_side = side
        return {k: v for k, v in inputs.items() if k not in self.drop and (
            isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and k in self.lists))}

    def usable(self, samples: list[Sample], bad: list[str]) -> list[Sample]:
        """The samples the processor accepts one by one; a message in ``bad`` for each other."""
        good = []
        for sample in samples:
            try:
                self([sample])
            except Exception as exc:  # noqa: BLE001 - whatever the processor refuses is skipped
                bad.append(f"{sample.label}: the processor refused it: {exc}")
            else:
                good.append(sample)
        return good
