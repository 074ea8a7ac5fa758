"""The measurement: the unpruned model once per sample, then the pruned model at every
(keep, core ratio) grid point, on the same batches.

Every finished pass is appended to a journal (``measurements.jsonl``: a run record,
then one record per pass) and the unpruned next-token log-probabilities are saved
beside it, so an interrupted run resumes where it stopped: finished grid points are
neither measured again nor lost. A partial pass leaves no record.

Per sample and pass: the argmax of the next-token logits at the first answer position,
the greedy answer (``generate()``, ``new_tokens`` tokens, cut after an end-of-sequence
token), and KL(unpruned || pruned) of the next-token distributions in fp64. Per pass: prefill
time and the bytes of the KV caches the prefills build (left padding included, as allocated).
Prefill time: per batch the median of three synchronised wall-clock prefills after a
warm-up (``benchmark.wall_median_ms``), summed over batches.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .. import benchmark as hb
from ..arguments import parse_keep
from ..integrations.transformers import kv_cache
from ..models import cache_bytes, prefill

JOURNAL = "measurements.jsonl"
UNPRUNED_LOGPROBS = "unpruned-logprobs.pt"
# Run-record fields that may differ when a run is resumed (the rest must match): the start time, and the CPU's load.
# The machine may not: the speed-ups divide the unpruned pass's times by each pruned pass's.
UNCHECKED = ("started",)
UNCHECKED_ENVIRONMENT = ("load_average_1min",)
# Values read from each parameter for the model's digest, spread over the whole tensor.
DIGEST_SAMPLES = 64


def keep_key(keep) -> tuple:
    """A budget as a key: keep=1 (one token) and keep=1.0 (every token) are two budgets, though ``1 == 1.0``."""
    return isinstance(keep, float), keep


@dataclass(frozen=True, eq=False)
class GridPoint:
    keep: Union[int, float]
    core_ratio: float

    def _key(self) -> tuple:
        return *keep_key(self.keep), self.core_ratio

    def __eq__(self, other) -> bool:
        return isinstance(other, GridPoint) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def matches(self, record: dict) -> bool:
        return self == GridPoint(record["keep"], record["core_ratio"])


def parse_keeps(text: str) -> list[Union[int, float]]:
    """``"32,64,0.25"``: token counts (ints) or fractions of each image's tokens."""
    keeps = []
    for item in text.split(","):
        try:
            keep = parse_keep(item)  # as zspa bench, the examples and prune() read it
        except ValueError as exc:
            raise ValueError(f"--keep: expected comma-separated counts or fractions in (0, 1], "
                             f"got {item!r} ({exc})") from None
        keeps.append(keep)
    return keeps


def parse_core_ratios(text: str) -> list[float]:
    ratios = []
    for item in text.split(","):
        try:
            ratio = float(item)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--core-ratio: expected comma-separated numbers in [0, 1], got {item!r}")
        ratios.append(ratio)
    return ratios


def model_digest(model) -> str:
    """A digest of ``model``: its config (where it was loaded from aside) and, for every parameter, its name, shape,
    dtype and ``DIGEST_SAMPLES`` values spread over it (parameters on the meta device, offloaded, by name, shape and
    dtype alone). Two checkpoints with one config but other weights (a fine-tune) differ in it; the values are read
    back in one copy."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version"):  # a moved folder holds the same model
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    samples = []
    for name, param in model.named_parameters():
        digest.update(f"{name} {tuple(param.shape)} {param.dtype}\n".encode())
        if param.is_meta or param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // DIGEST_SAMPLES)][:DIGEST_SAMPLES].double())
    if samples:
        device = samples[0].device
        digest.update(torch.cat([s.to(device) for s in samples]).cpu().numpy().tobytes())
    return digest.hexdigest()


class JournalError(ValueError):
    """The output folder's journal cannot be resumed (its message names ``--out`` and what to do)."""


class JournalMismatch(JournalError):
    """The output folder holds the journal of a run with another model, settings, samples or machine."""


def _checked(run: dict) -> dict:
    """The fields of a run record that a resumed run must repeat."""
    checked = {k: v for k, v in run.items() if k not in UNCHECKED}
    if isinstance(checked.get("environment"), dict):
        checked["environment"] = {k: v for k, v in checked["environment"].items() if k not in UNCHECKED_ENVIRONMENT}
    return checked


def _differences(old: dict, new: dict, prefix: str = ""):
    """The keys whose values differ, nested dicts' as ``outer.inner`` (``environment.device``)."""
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield prefix + key


class Journal:
    """The JSON-lines record of a run in ``out_dir``: appended and flushed pass by pass."""

    def __init__(self, out_dir: pathlib.Path, run: dict):
        self.path = out_dir / JOURNAL
        self.records = self._read()
        if not self.records:
            self.append(run)
            return
        old, new = _checked(self.records[0]), _checked(run)
        if old != new:
            differ = sorted(_differences(old, new))
            raise JournalMismatch(f"--out: {self.path} holds measurements of another run (it differs in "
                                  f"{', '.join(differ)}); choose another --out, or delete it to start again")

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise JournalError(f"--out: {self.path} line {number} is not JSON; delete the file "
                                       "to start again") from None
                # The last line was cut short by an interruption: drop it.
                self.path.write_text("".join(lines[:-1]), encoding="utf-8")
        return records

    @property
    def run(self) -> dict:
        return self.records[0]

    def unpruned(self):
        return next((r for r in self.records if r["kind"] == "unpruned"), None)

    def point(self, point: GridPoint):
        return next((r for r in self.records if r["kind"] == "pruned" and point.matches(r)), None)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row in fp64 from log-probabilities; exactly 0 where they are equal.

    The inputs are float32 log-softmaxes, whose exponentials sum to 1 only up to float32 rounding:
    renormalised in fp64 first, and the fp64 rounding left on nearly equal rows (KL is never below 0)
    clamped, so that a tiny model that barely reads its image gives 0, not -2e-8."""
    logp, logq = torch.log_softmax(logp.double(), -1), torch.log_softmax(logq.double(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1).clamp_min(0.0)


def samples_digest(samples: Sequence) -> str:
    """A digest of the samples, for a resumed run to refuse others: each one's repr (label, image, question),
    then the bytes of every image that is a file, so that a photo replaced under the same name is another
    sample (its unpruned answers were measured on the old one)."""
    digest = hashlib.sha256("\n".join(map(repr, samples)).encode())
    for sample in samples:
        image = getattr(sample, "image", None)
        if isinstance(image, str) and os.path.isfile(image):
            digest.update(hashlib.sha256(pathlib.Path(image).read_bytes()).digest())
    return digest.hexdigest()


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set() if eos is None else set([eos] if isinstance(eos, int) else eos)


def forced_steps(model) -> int:
    """Decoder steps that generate() forces before an answer's first token of its own: an encoder-decoder's
    ``forced_bos_token_id`` (BART's, and so Florence-2's language model's) makes its first token that id,
    whatever the logits. First-token agreement and KL are measured after them, the answer leaves them out (a
    forced end-of-sequence at the length cap is not asked for: measure_pass)."""
    forced = getattr(model.generation_config, "forced_bos_token_id", None)
    return int(getattr(model.config, "is_encoder_decoder", False) and forced is not None)


def _answers(new_ids: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """Generated ids of each row, up to and including its first end-of-sequence token."""
    out = []
    for row in new_ids.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


def _to_model(value, param: torch.Tensor):
    """An encoded input on the model's device, floating tensors in its dtype; lists and tuples of
    them likewise; anything else (UnlimitedOCR's crop counts are lists of ints) as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_model(v, param) for v in value)
    return value


@torch.no_grad()
def measure_pass(model, batches: Sequence[list], encode: Callable[[list], dict], new_tokens: int,
                 on_batch: Callable[[int], None], handle=None) -> tuple[dict, torch.Tensor]:
    """One pass over all batches: ``(record, next-token log-probs (samples, vocab))``.
    ``handle``: the active ``prune()`` handle of a pruned pass (its selections are counted)."""
    param = next(model.parameters())
    device = param.device
    eos = _eos_ids(model)
    forced = forced_steps(model)
    prefill_ms, kv, kept, visual = 0.0, 0, 0, 0
    first, answers, logprobs = [], [], []
    for batch in batches:
        inputs = {k: _to_model(v, param) for k, v in encode(batch).items()}
        last = {}

        def timed():
            last["out"] = prefill(model, inputs)

        prefill_ms += hb.wall_median_ms(timed, device)
        out = last.pop("out")
        kv += cache_bytes(kv_cache(out))
        if handle is not None:
            kept += sum(s.order.shape[0] for s in handle.last_selection)
            visual += sum(s.n_tokens for s in handle.last_selection)
        # The prefill's next-token distribution, unless generate() forces that token (then its own, below).
        step = None if forced else torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        del out
        # No forced end-of-sequence at the length cap (BART's forced_eos_token_id, Florence-2's): an answer
        # ends where the model ends it, or after new_tokens tokens of its own.
        generated = model.generate(**inputs, max_new_tokens=new_tokens + forced, do_sample=False, num_beams=1,
                                   forced_eos_token_id=None,
                                   **(dict(output_logits=True, return_dict_in_generate=True) if forced else {}))
        if forced:  # the distribution the answer's first own token comes from: generate()'s, after the forced ones
            step = torch.log_softmax(generated.logits[forced].float(), dim=-1)
            generated = generated.sequences
        logprobs.append(step.cpu())
        first += step.argmax(-1).tolist()
        # After the prompt; an encoder-decoder's generate() returns the decoder's tokens, from its start token.
        start = 1 if getattr(model.config, "is_encoder_decoder", False) else inputs["input_ids"].shape[1]
        answers += _answers(generated[:, start + forced:], eos)
        on_batch(len(batch))
    record = {"prefill_ms": prefill_ms, "kv_cache_bytes": kv,
              "first_tokens": first, "answers": answers}
    if handle is not None:
        record.update(visual_tokens=visual, visual_tokens_kept=kept)
    return record, torch.cat(logprobs)


def refuse_unmeasurable(model) -> None:
    """Raise ``ValueError`` for a model that ``prune()`` takes but whose answers are no token-by-token
    generation from a next-token distribution, which this measurement compares (a block diffusion model's, a
    vision-language-action model's)."""
    from ..models import refuse_non_autoregressive

    refuse_non_autoregressive(model, "zspa fidelity", "no next-token distribution to compare")


def run_grid(model, samples: Sequence, encode: Callable[[list], dict], points: Sequence[GridPoint],
             out_dir: Union[str, pathlib.Path], new_tokens: int = 16, batch_size: int = 4, backend: str = "auto",
             run_info: dict = None, progress: bool = True, tokenizer=None) -> Journal:
    """Measure ``samples`` (objects with a ``label``; ``encode(list_of_samples)`` gives the
    model's keyword arguments) unpruned and at every grid point; resume from ``out_dir``.
    ``tokenizer``: ``prune()``'s (the processor that encodes the samples), whose special tokens
    stay out of the prompt, as they will in the user's own pruned calls."""
    import zspa_kernels
    from zspa_kernels.integrations.transformers.families import tokenizer_special_ids
    from tqdm.auto import tqdm

    if new_tokens < 1 or batch_size < 1:
        raise ValueError(f"new_tokens, batch_size: expected >= 1, got {new_tokens}, {batch_size}")
    refuse_unmeasurable(model)
    if not samples:
        raise ValueError("samples: nothing to measure (every sample was skipped?)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    run = {"kind": "run", **(run_info or {}), "model_digest": model_digest(model),
           "samples": [s.label for s in samples],
           # Catches a sample edited in place (same label, other image or question) on resume.
           "samples_digest": samples_digest(samples),
           "new_tokens": new_tokens, "batch_size": batch_size, "backend": backend,
           # What the prompt leaves out beyond the config's ids: a resumed run must leave out the same.
           "tokenizer_special_ids": sorted(tokenizer_special_ids(tokenizer)) if tokenizer is not None else None,
           "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type,
           "environment": hb.environment(param.device),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    journal = Journal(out_dir, run)
    logprobs_path = out_dir / UNPRUNED_LOGPROBS
    batches = [list(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    todo = [p for p in dict.fromkeys(points) if journal.point(p) is None]
    passes = len(todo) + (journal.unpruned() is None)
    with tqdm(total=passes * len(samples), unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        if journal.unpruned() is None:
            bar.set_description("unpruned")
            record, logprobs = measure_pass(model, batches, encode, new_tokens, bar.update)
            torch.save(logprobs, logprobs_path)  # before the record: a record means the file exists
            journal.append({"kind": "unpruned", **record})
        if not logprobs_path.exists():
            raise JournalError(f"--out: {journal.path} records the unpruned pass, but its log-probabilities "
                               f"({logprobs_path.name}) are gone; delete the journal to start again")
        reference = torch.load(logprobs_path)
        for point in todo:
            bar.set_description(f"keep {point.keep}, core ratio {point.core_ratio}")
            with zspa_kernels.prune(model, keep=point.keep, core_ratio=point.core_ratio,
                                    backend=backend, tokenizer=tokenizer) as handle:
                record, logprobs = measure_pass(model, batches, encode, new_tokens, bar.update, handle)
            journal.append({"kind": "pruned", "keep": point.keep, "core_ratio": point.core_ratio,
                            **record, "kl": kl_divergence(reference, logprobs).tolist()})
    return journal
