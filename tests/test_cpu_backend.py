"""CPU backend specifics: realistic widths replayed against fp64, agreement with the reference,
and dispatch (``auto`` on CPU tensors runs it). The shared random, tie, padding and special-value
cases of ``test_select_tokens.py`` run it too (it is in ``dispatch.available_backends`` on CPU)."""
from __future__ import annotations

import pytest
import torch

import zspa_kernels
from helpers import TOLERANCE, Case, clustered_tokens, gaussian_tokens, intra_op_threads, oracle_rows
from fp64_oracle import replay
from zspa_kernels.cpu import select_tokens_cpu
from zspa_kernels.dispatch import available_backends, resolve_backend
from zspa_kernels.reference import select_tokens_reference_op
from zspa_kernels.spec import PICK_TOLERANCE


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


@pytest.mark.parametrize("core_1_feature_8, picked, gap_in_2_11", [(0.17275580763816833, 3, (0.0, 0.0)),
                                                                      (0.1656, 2, (1.0, 2.0))])
def test_a_greedy_pick_between_two_roundings_stays_within_twice_one_cosines_bound(core_1_feature_8, picked,
                                                                                  gap_in_2_11):
    """Four tokens in D=10 whose unit components sit just off fp16 rounding midpoints: tokens 0 and 1
    form the core (the prompt is e_9), token 2 lies near 0 with its fp16 units rounded down, token 3
    near 1 with its rounded up. The one greedy step compares 2's similarity to the core (~0.9 * 2^-11 low)
    with 3's (~0.9 * 2^-11 high); the queries (the core) are fp32. Each cosine keeps 2^-11; the pick,
    comparing two, is held to 2^-10 plus the dots' own rounding (PICK_TOLERANCE).
    First case (fp64 gap 1.8 * 2^-10): fp16 queries picked 2 here, 1.8 * 2^-10 from the best; fp32 queries
    pick 3, the best. Second case (core token 1 moved, so that 3 is the best by 1.57 * 2^-11): the cpu
    backend picks 2, past 2^-11 from the best (a bound of 2^-11 would be wrong) and within 2^-10."""
    from fp64_oracle import Row

    visual = torch.tensor([
        [0.5002288818359375, 0.5002288818359375, 0.5002288818359375, 0.25011444091796875, 0.25011444091796875,
         0.25011444091796875, 0.12505722045898438, 0.12505722045898438, 0.1730978935956955, 0.019999999552965164],
        [-0.5002593994140625, 0.5002593994140625, 0.5002593994140625, -0.25012969970703125, 0.25012969970703125,
         0.25012969970703125, -0.12506484985351562, 0.12506484985351562, core_1_feature_8, 0.019999999552965164],
        [0.5031585693359375, 0.5075531005859375, 0.5085296630859375, 0.25402069091796875, 0.25475311279296875,
         0.25914764404296875, 0.12835311889648438, 0.12713241577148438, 0.037397198379039764, 0.0],
        [-0.5007476806640625, 0.5061187744140625, 0.5139312744140625, -0.25476837158203125, 0.25647735595703125,
         0.25525665283203125, -0.12628555297851562, 0.12872695922851562, 0.024657750502228737, 0.0]])[None]
    prompt = torch.zeros(1, 10)
    prompt[0, 9] = 1.0
    order = select_tokens_cpu(visual, prompt, 3, 0.6, None, None, "mean", True)[0].tolist()
    row = Row(visual[0].numpy(), prompt[0].numpy(), None, 4, 3, 0.6, "mean")
    replay(row, order, TOLERANCE["cpu"][torch.float32])
    assert sorted(order[:2]) == [0, 1] and order[2] == picked
    gap = row.redundancy(order[2], order[:2]) - min(row.redundancy(i, order[:2]) for i in (2, 3))
    low, high = gap_in_2_11
    assert low * 2.0**-11 <= gap <= high * 2.0**-11 and gap < PICK_TOLERANCE["cpu"], gap / 2.0**-11


def _long_tails_case(q1_shrink: float):
    """D = 16384: core tokens Q0, Q1 (the prompt is e_15) and candidates A (near Q0, fp16 units rounded down)
    and C (near Q1, rounded up), their large components on features 0-13 just off fp16 midpoints, then on
    the same features mod 16 long tails whose products with the queries are just under half an fp32 ulp
    of each lane's first product: a lane summing D/16 of them in fp32 loses them all."""
    import math

    import numpy as np

    D, lanes = 16384, 14
    exps = np.array([-1] * 3 + [-2] * 3 + [-3] * 3 + [-4] * 3 + [-5] * 2, dtype=np.float64)
    mag = 2.0**exps
    tails = np.arange(16, D)
    on = tails[tails % 16 < lanes]
    t = np.zeros(D)
    t[on] = (math.sqrt(0.99) * 2.0**exps[on % 16] * 2.0**-12).astype(np.float16).astype(np.float64)
    sign1 = np.ones(lanes)
    sign1[[0, 3, 6, 9]] = -1

    def vector(big, sign, tail_sign, fill=None):
        v = np.zeros(D)
        v[:lanes] = big * sign
        v[on] = tail_sign * t[on]
        if fill is not None:  # unit length through feature 14, which the queries lack
            v[fill] = math.sqrt(1 - (v**2).sum())
        return v

    a = vector(mag * (1 + 0.499 * 2.0**-10), 1.0, 1.0, fill=14)
    c = vector(mag * (1 + 0.501 * 2.0**-10), sign1, -1.0, fill=14)
    q0 = vector(mag, 1.0, 1.0)
    q1 = vector(mag, sign1, 1.0) * q1_shrink
    q0[15] = q1[15] = 2.0**-7
    q1[31] = math.sqrt(max(0.0, 1 - (q1**2).sum()))
    q0, q1 = q0 / np.linalg.norm(q0), q1 / np.linalg.norm(q1)
    prompt = torch.zeros(1, D)
    prompt[0, 15] = 1.0
    return torch.tensor(np.stack([q0, q1, a, c]), dtype=torch.float32)[None], prompt


def test_a_pick_between_long_tails_of_tiny_products_stays_within_the_bound():
    """Candidates A and C 1.1 * 2^-10 apart in fp64 (past PICK_TOLERANCE["cpu"] = 2^-10 + 2^-16), A the
    more redundant. Lanes that summed D/16 products in fp32 lost the tails and picked A; lanes folded into
    double every 64 products pick C, and every pick replays against fp64."""
    from fp64_oracle import Row

    visual, prompt = _long_tails_case(0.99995)
    order = select_tokens_cpu(visual, prompt, 3, 0.6, None, None, "mean", True)[0].tolist()
    row = Row(visual[0].numpy(), prompt[0].numpy(), None, 4, 3, 0.6, "mean")
    gap = row.redundancy(2, [0, 1]) - row.redundancy(3, [0, 1])
    assert PICK_TOLERANCE["cpu"] < gap < 1.2 * 2.0**-10, gap / 2.0**-10
    assert sorted(order[:2]) == [0, 1] and order[2] == 3
    replay(row, order, TOLERANCE["cpu"][torch.float32])


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


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_larger_than_the_caches_split_each_sweep_and_keep_first_minimum_ties(threads):
    # 1100 x 4096 fp16 tokens (9 MB) pass the kernel's split threshold (1 MB): with fewer rows than
    # threads each sweep runs over token chunks in threads (the count is set here, so the split runs
    # on a machine of any core count). Tokens 550.. duplicate tokens 0.., across the border of two
    # chunks (550) and of three (366, 733), so exact ties between chunks must still go to the lower
    # index, as in the reference.
    g = torch.Generator().manual_seed(4)
    visual = torch.randn(1, 1100, 4096, generator=g)
    visual[0, 550:1100] = visual[0, :550]
    prompt = torch.randn(1, 4096, generator=g)
    args = (visual, prompt, 48, 0.25, None, None, "mean")
    with intra_op_threads(threads):
        order = select_tokens_cpu(*args, True)
    assert torch.equal(order, select_tokens_reference_op(*args, True))
