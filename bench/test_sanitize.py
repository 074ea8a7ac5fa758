"""bench/sanitize.py: its cases run and its check holds on the CPU backends, and the check
rejects what an unwritten or wrong launch would leave (so a GPU run's "ok" means something)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import sanitize

CPU = torch.device("cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_case_runs_and_passes_the_check(backend):
    assert sanitize.run(backend, CPU, progress=lambda _: None) == len(sanitize.CASES)


def test_cuda_cases_are_valid_selections():
    assert sanitize.run("cpu", CPU, sanitize.CUDA_CASES, progress=lambda _: None) == len(sanitize.CUDA_CASES)


def test_greedy_override_reaches_every_case(monkeypatch):
    """``--greedy block`` (racecheck without the cluster kernel) sets ZSPA_CUDA_GREEDY for every
    case, over the case's own choice, and restores it after."""
    from zspa_kernels.spec import CUDA_GREEDY_ENV, cuda_greedy

    seen = []
    real = sanitize.make

    def spy(case, device, seed):
        seen.append(cuda_greedy())
        return real(case, device, seed)

    monkeypatch.setattr(sanitize, "make", spy)
    monkeypatch.delenv(CUDA_GREEDY_ENV, raising=False)
    cases = sanitize.CUDA_CASES[:6]  # the block kernel's own cases among them
    assert sanitize.run("cpu", CPU, cases, progress=lambda _: None, greedy="block") == len(cases)
    assert seen == ["block"] * len(cases)
    seen.clear()
    sanitize.run("cpu", CPU, cases, progress=lambda _: None)
    assert seen == [c.greedy or "auto" for c in cases]


def test_check_rejects_invalid_selections():
    case = dataclasses.replace(sanitize.CASES[1], pick_order=False)
    visual, prompt, _, mask = sanitize.make(case, CPU, 1)
    lengths = torch.tensor([case.N, 5, 60])  # row 1 is shorter than k: it ends in -1 padding
    out = torch.ops.zspa.select_tokens(visual, prompt, case.k, case.core_ratio, lengths, mask, case.relevance,
                                       "reference", False)
    sanitize.check(case, out, lengths)
    short = 1
    broken = {
        "unwritten": torch.empty_like(out).fill_(0),
        "repeat": out.clone().index_put_((torch.tensor([0]), torch.tensor([1])), out[0, 0].view(1)),
        "outside": out.clone().index_put_((torch.tensor([short]), torch.tensor([0])), lengths[short].view(1)),
        "padding": out.clone().index_put_((torch.tensor([short]), torch.tensor([case.k - 1])), torch.tensor([0])),
        "order": out.flip(1),
    }
    for name, bad in broken.items():
        with pytest.raises(AssertionError):
            sanitize.check(case, bad, lengths)
