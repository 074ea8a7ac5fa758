"""The reference backend's own pieces: overflow-safe scaled rows and per-row budgets (the
selection itself, huge and tiny norms included, is the shared suite's: test_select_tokens.py)."""
from __future__ import annotations

import torch

from zspa_kernels.reference import cosines, row_budgets, scaled_rows
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
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)
    plain = torch.einsum("bid,bjd->bij", x, x) / torch.einsum("bid,bjd->bij", norm, norm)
    assert torch.equal(cosines(tokens, tokens, "bid,bjd->bij"), plain)
