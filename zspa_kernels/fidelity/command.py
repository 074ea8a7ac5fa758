"""``zspa fidelity``: load the model and the samples, run the grid, write and print the report."""
from __future__ import annotations

import pathlib
import sys
from typing import Optional

import torch

from ..spec import BACKEND_CHOICES
from . import offline, report
from .grid import (JOURNAL, GridPoint, JournalError, parse_core_ratios, parse_keeps, refuse_unmeasurable,
                   run_grid)
from .samples import Prompts, read_samples


def _load(model_path: Optional[str], device: torch.device, dtype: torch.dtype):
    """``(model, processor, template, label)``; template None: the processor's chat template. A checkpoint
    that cannot be loaded, or whose model prune() does not take, raises ``ValueError("model: ...")``."""
    if model_path is None:
        return (*offline.build(device, dtype), offline.LABEL)
    from .. import demo

    model, processor = demo.load(model_path, device, dtype)
    return model, processor, demo.prompt_template(processor), pathlib.Path(model_path).name


def run(out: str, model_path: Optional[str] = None, data: Optional[str] = None, question: Optional[str] = None,
        keeps: str = "32,64,128", core_ratios: str = "0,0.25,0.5,0.75,1", new_tokens: int = 16,
        batch_size: int = 4, backend: str = "auto", progress: bool = True) -> int:
    import transformers

    from .. import benchmark as hb

    from ..arguments import checkpoint_problem, out_problem
    from ..dispatch import available_backends, env_backend_problem
    from ..spec import backend_from_env
    from ..integrations.transformers.families import find_family

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # Each distinct grid point once, in the order given ("32,32" is one point; 1 and 1.0 are two).
        points = list(dict.fromkeys(GridPoint(k, c) for k in parse_keeps(keeps) for c in parse_core_ratios(core_ratios)))
        if data is None and question is not None:
            raise ValueError("--question: only with --data pointing to a folder of images")
        if model_path is not None and (problem := checkpoint_problem(model_path)):
            raise ValueError(f"--model: {problem}")
        for name, value in (("--new-tokens", new_tokens), ("--batch-size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}: expected a positive count, got {value}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"--backend: expected one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
        if backend != "auto" and backend not in available_backends(device):
            # Refused now, not after the unpruned pass has been journaled under this backend.
            raise ValueError(f"--backend: {backend!r} cannot run on {device.type} here; "
                             f"expected one of auto, {', '.join(available_backends(device))}")
        if backend == "auto":
            if problem := env_backend_problem(device):  # ZSPA_BACKEND chooses under auto: a bad one is refused now
                raise ValueError(problem)
            # The environment's choice is journaled as the run's backend, so a resume under another one is refused as another run
            backend = backend_from_env()
        samples, bad = offline.samples(), []
        if data is not None:
            samples, bad = read_samples(data, question)
        if problem := out_problem(out):
            raise ValueError(f"--out: {problem}")
    except ValueError as exc:
        print(f"zspa fidelity: {exc}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = pathlib.Path(out)
    print(f"zspa fidelity on {hb.environment(device)['device']}, {str(dtype).replace('torch.', '')}")
    try:
        model, processor, template, label = _load(model_path, device, dtype)
        find_family(model)  # before the unpruned pass: prune() would refuse the model only after it
        refuse_unmeasurable(model)
    except ValueError as exc:
        print(f"zspa fidelity: --{exc}", file=sys.stderr)
        return 2
    if model_path is None:
        print(f"  model: {offline.LABEL}, RANDOM weights (no download): the timings, cache sizes and the")
        print("  tool are real; agreement and KL mean nothing for quality. Use --model PATH for that.")
    else:
        prompt = "the processor chat template" if template is None else repr(template)
        print(f"  model: {model_path}; prompt: {prompt}")
    prompts = Prompts(processor, model, template)
    samples = prompts.usable(samples, bad)
    print(f"  samples: {len(samples)}" + (f", {len(bad)} skipped:" if bad else ""))
    for message in bad:
        print(f"    skipped {message}")
    if not samples:
        print("zspa fidelity: no usable sample left to measure", file=sys.stderr)
        return 2
    print(f"  grid: keep {keeps} x core ratio {core_ratios} = {len(points)} points, greedy answers of "
          f"{new_tokens} tokens; journal {out_dir / JOURNAL}")
    try:
        journal = run_grid(model, samples, prompts, points, out_dir, new_tokens, batch_size, backend,
                           run_info={"model": label, "transformers": transformers.__version__}, progress=progress,
                           tokenizer=processor)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished grid points are kept in {out_dir / JOURNAL}; "
              "run the same command again to resume.", file=sys.stderr)
        return 130
    except JournalError as exc:  # another run's journal, or one that cannot be read
        print(f"zspa fidelity: {exc}", file=sys.stderr)
        return 2
    earlier = [r for r in journal.records if r["kind"] == "pruned" and not any(p.matches(r) for p in points)]
    if earlier:  # the report is the journal's, whatever grid this call asked for
        print(f"  the journal also holds {len(earlier)} grid point(s) measured by an earlier run into {out_dir}, "
              "reported too: " + ", ".join(f"keep {r['keep']} core ratio {r['core_ratio']}" for r in earlier))
    summary = report.summarise(journal)
    paths = report.write(summary, out_dir)
    print()
    print(report.markdown(summary).split("\n", 2)[2], end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
