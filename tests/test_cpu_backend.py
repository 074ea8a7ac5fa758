"""CPU backend specifics: realistic widths replayed against fp64, agreement with the reference,
and dispatch (``auto`` on CPU tensors runs it). The shared random, tie, padding and special-value
cases of ``test_select_tokens.py`` run it too (it is in ``dispatch.available_backends`` on CPU)."""
from __future__ import annotations

import pytest
import torch

import zspa_kernels
from helpers import TOLERANCE, Case, clustered_tokens, gaussian_tokens, oracle_rows
from fp64_oracle import replay
from zspa_kernels.cpu import select_tokens_cpu
from zspa_kernels.dispatch import available_backends, resolve_backend
from zspa_kernels.reference import select_tokens_reference_op


def _wide_case(seed, dtype, clustered, core_ratio=0.5, relevance="mean", lengths=None, T=None):
    g = torch.Generator().manual_seed(seed)
    B, N, D = 2, 150, 384
    visual = (clustered_tokens(g, B, N, D, centers=6, spread=0.2) if clustered
              else gaussian_tokens(g, B, N, D, min_scale=0.5))
    prompt = torch.randn(B, D, generator=g) if T is None else torch.randn(B, T, D, generator=g)
    mask = None if T is None else torch.ones(B, T, dtype=torch.bool)
    lengths = None if lengths is None else torch.tensor(lengths)
    return Case(visual.to(dtype), prompt.to(dtype), 40, core_ratio, lengths, mask, relevance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clustered", [False, True], ids=["gaussian", "clustered"])
@pytest.mark.parametrize("core_ratio", [0.0, 0.5])
def test_wide_rows_replay_against_fp64(dtype, clustered, core_ratio):
    case = _wide_case(int(clustered) + 3 * int(core_ratio * 2), dtype, clustered, core_ratio,
                      relevance="max" if clustered else "mean", lengths=[150, 97], T=5 if clustered else None)
    order = select_tokens_cpu(*case.args(), True)
    kept = select_tokens_cpu(*case.args(), False)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cpu"][dtype])
        assert kept[b].tolist() == sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b)


def test_well_separated_tokens_pick_exactly_what_the_reference_picks():
    # Gaussian tokens in D=384: cosine gaps between candidates are far above fp16 rounding.
    case = _wide_case(11, torch.bfloat16, clustered=False, lengths=[150, 61])
    assert torch.equal(select_tokens_cpu(*case.args(), True), select_tokens_reference_op(*case.args(), True))


def test_auto_on_cpu_tensors_runs_the_cpu_backend(monkeypatch):
    monkeypatch.delenv("ZSPA_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "cpu" and "cpu" in available_backends(cpu)
    case = _wide_case(5, torch.float32, clustered=True)
    assert torch.equal(zspa_kernels.select_tokens(*case.args(), pick_order=True), select_tokens_cpu(*case.args(), True))


def test_cpu_backend_refuses_accelerator_tensors():
    with pytest.raises(ValueError, match="backend: 'cpu' needs CPU tensors"):
        resolve_backend("cpu", torch.device("cuda"))
    assert "cpu" not in available_backends(torch.device("cuda"))


def test_without_a_compiler_the_backend_warns_once_and_runs_the_reference(monkeypatch):
    from zspa_kernels import builder, cpu

    def no_compiler(ext):
        raise builder.BuildFailed(f"no compiler here for {ext.name}")

    monkeypatch.setattr(cpu, "_unavailable", [])
    monkeypatch.setattr(builder, "load", no_compiler)
    case = _wide_case(2, torch.float32, clustered=False)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' unavailable .*no compiler here.*'reference'"):
        order = select_tokens_cpu(*case.args(), True)
    assert torch.equal(order, select_tokens_reference_op(*case.args(), True))


def test_rows_larger_than_the_caches_split_each_sweep_and_keep_first_minimum_ties():
    # 1100 x 4096 fp16 tokens (9 MB) pass the kernel's split threshold (8 MB): each sweep runs over
    # token chunks in threads. Tokens 600.. duplicate tokens 0.. across the chunk border, so exact
    # ties between chunks must still go to the lower index, as in the reference.
    g = torch.Generator().manual_seed(4)
    visual = torch.randn(1, 1100, 4096, generator=g)
    visual[0, 600:640] = visual[0, :40]
    prompt = torch.randn(1, 4096, generator=g)
    args = (visual, prompt, 48, 0.25, None, None, "mean")
    assert torch.equal(select_tokens_cpu(*args, True), select_tokens_reference_op(*args, True))
