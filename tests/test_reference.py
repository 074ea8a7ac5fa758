"""The reference backend's own pieces: overflow-safe scaled rows and per-row budgets (the
selection itself, huge and tiny norms included, is the shared suite's: test_select_tokens.py)."""
from __future__ import annotations

import pytest
import torch

from fp64_oracle import Row, oracle_order
from zspa_kernels import reference
from zspa_kernels.reference import cosines, dots, pairwise_sum, row_budgets, scaled_rows
from zspa_kernels.spec import core_count


def test_scaled_rows_are_finite_for_huge_tokens():
    visual = torch.tensor([[[3e38, -1e38, 1.0], [1e-40, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    scaled = scaled_rows(visual)
    assert torch.isfinite(scaled.rows).all() and torch.isfinite(scaled.norm).all() and scaled.finite.all()
    assert (scaled.norm > 0).all()


def test_row_budgets_follow_spec():
    n = torch.tensor([1, 2, 7, 64, 100])
    k_b, k_core = row_budgets(64, 0.3, n, 100)
    assert k_b.tolist() == [1, 2, 7, 64, 64]
    assert k_core.tolist() == [core_count(0.3, int(x)) for x in k_b]


def test_scaling_changes_no_bit_where_the_unscaled_formula_does_not_overflow():
    """Powers of two commute with rounding: the scaled cosines are the unscaled ones, bit for bit."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 40, 33, generator=g) * torch.logspace(-3, 3, 40).view(1, 40, 1)
    tokens = scaled_rows(x)
    assert not torch.equal(tokens.rows, x)  # the scaling did something
    norm = pairwise_sum(x * x).sqrt().unsqueeze(-1).clamp_min(1e-6)  # the reference's norm, unscaled
    plain = dots(x, x) / (norm * norm.transpose(1, 2))
    assert torch.equal(cosines(tokens, tokens), plain)


def test_mean_pool_is_the_plain_mean_where_finite_and_the_exact_mean_where_that_overflows():
    """spec.pool_shift: every feature whose fp32 sum stays finite keeps the plain mean's bits; one
    whose finite values sum past float32's range gets their mean to fp32 accuracy (an fp64 sum,
    the oracle's), not inf; NaN and inf in valid rows stay non-finite, masked rows count for nothing."""
    g = torch.Generator().manual_seed(4)
    T, D = 9, 40
    prompt = torch.randn(2, T, D, generator=g) * torch.logspace(-30, 30, D)
    prompt[:, :, :6] = 3.3e38 * torch.rand(2, T, 6, generator=g).add(0.5).clamp(max=1.0)  # sums overflow
    prompt[:, :, 6] = -3.4e38
    prompt[0, 3, 7], prompt[1, 5, 8] = float("nan"), float("inf")
    valid = torch.ones(2, T, dtype=torch.bool)
    prompt[1, 2], valid[1, 2] = float("nan"), False
    pooled = reference.mean_pool(prompt, valid)
    rows = torch.where(valid.unsqueeze(-1), prompt, 0.0)
    plain = rows.sum(1) / valid.sum(-1, keepdim=True)
    assert (~plain.isfinite()).sum() >= 2 * 7 + 2
    kept = plain.isfinite()
    assert torch.equal(pooled[kept], plain[kept])
    exact = rows.double().sum(1) / valid.sum(-1, keepdim=True)
    overflowed = ~kept & exact.isfinite()
    assert overflowed.sum() == 2 * 7
    torch.testing.assert_close(pooled[overflowed].double(), exact[overflowed], rtol=2e-6, atol=0)
    assert pooled[0, 7].isnan() and pooled[1, 8] == float("inf")


def test_dot_products_depend_on_their_two_rows_alone():
    """An exact tie between identical tokens must stay exact: their dot products with any row
    get the same bits wherever the two copies sit, which a BLAS matrix product does not promise
    (on CPUs its edge rows run another micro-kernel, another summation order)."""
    g = torch.Generator().manual_seed(3)
    for D in (1, 2, 17, 48, 200, 1023):
        a = torch.randn(2, 37, D, generator=g)
        a[:, 36], a[:, 5] = a[:, 0], a[:, 0]  # copies of row 0 at other offsets
        b = torch.randn(2, 9, D, generator=g)
        got = dots(a, b)
        assert torch.equal(got[:, 36], got[:, 0]) and torch.equal(got[:, 5], got[:, 0]), D
        assert torch.equal(dots(b, a), got.transpose(1, 2)), D  # products commute
        torch.testing.assert_close(got.double(), a.double() @ b.double().transpose(1, 2), rtol=0, atol=D * 2e-7)
        step, dots_each = reference.DOT_CHUNK_ELEMENTS, dots(a, b)
        try:
            reference.DOT_CHUNK_ELEMENTS = D  # one row of a at a time: the same bits
            assert torch.equal(dots(a, b), dots_each), D
        finally:
            reference.DOT_CHUNK_ELEMENTS = step


@pytest.mark.parametrize("relevance", ["mean", "max"])
@pytest.mark.parametrize("core_ratio", [0.0, 0.5, 1.0])
def test_parting_gap_is_the_fp64_oracles_score_gap(relevance, core_ratio):
    """reference.parting_gap (what `zspa demo` reports where two backends' picks differ) against the
    independent fp64 oracle: at every step of the exact order, a pick of another free candidate parts
    there, by the difference of the two candidates' fp64 scores; equal orders do not part."""
    g = torch.Generator().manual_seed(int(core_ratio * 10) + len(relevance))
    N, D, T, k = 23, 16, 5, 9
    visual, prompt = torch.randn(N, D, generator=g), torch.randn(T, D, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    visual[4] = float("nan")  # a non-finite token: infinitely far from every finite score
    row = Row(visual.numpy(), prompt.numpy(), mask.numpy(), N, k, core_ratio, relevance)
    order = oracle_order(row)
    same = torch.tensor(order)
    assert reference.parting_gap(visual, prompt, mask, relevance, k, core_ratio, same, same.clone()) is None
    for t in range(len(order)):
        free, scores, _ = row.step_scores(t, order[:t])
        for other in (c for c in free if c != order[t]):
            parted = torch.tensor(order[:t] + [other] + order[t + 1:])
            step, gap = reference.parting_gap(visual, prompt, mask, relevance, k, core_ratio, same, parted)
            assert step == t
            assert gap == pytest.approx(abs(scores[order[t]] - scores[other]), rel=1e-12, abs=1e-12)
