"""The reference backend's own rules: overflow-safe norms and exact ties for tiny norms,
against the fp64 oracle (the shared suite in test_select_tokens.py covers the rest)."""
from __future__ import annotations

import pytest
import torch

from fp64_oracle import Row, oracle_order, replay
from helpers import TOLERANCE
from zspa_kernels.reference import row_budgets, scaled_rows, select_tokens_reference
from zspa_kernels.spec import core_count


def _replay_rows(visual, prompt, k, alpha, dtype):
    order = select_tokens_reference(visual, prompt, k, alpha, None, None, "mean")
    for b in range(visual.shape[0]):
        row = Row(visual[b].float().numpy(), prompt[b].float().numpy(), None, visual.shape[1], k, alpha, "mean")
        replay(row, order[b].tolist(), TOLERANCE["reference"][dtype])
    return order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e38])
def test_finite_tokens_of_huge_magnitude_are_normalised_without_overflow(dtype, magnitude):
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(2, 30, 16, generator=g)
    visual[:, ::3] = visual[:, ::3] / visual[:, ::3].abs().amax(-1, keepdim=True) * magnitude
    prompt = torch.randn(2, 16, generator=g) * magnitude
    for alpha in (0.0, 0.5):
        _replay_rows(visual.to(dtype), prompt.to(dtype), 12, alpha, dtype)


@pytest.mark.parametrize("seed", [72, 76, 81, 126, 128, 133])
def test_tiny_norm_fp16_tokens_keep_exact_ties(seed):
    """fp16 tokens of norm < 1e-6 are small multiples of 2**-24: their dot products are exact,
    and so are the fp64 ties between distinct tokens; dividing each element by 1e-6 rounded
    them apart (these seeds), dividing the dot product keeps them (lower index wins)."""
    g = torch.Generator().manual_seed(seed)
    D = [2, 3, 4][seed % 3]
    patterns = torch.randint(-4, 5, (6, D), generator=g).float() * 2.0**-24
    visual = patterns[torch.randint(0, 6, (1, 16), generator=g)].half()
    assert float(visual.float().norm(dim=-1).max()) < 1e-6
    prompt, alpha = patterns[:1].half(), [0.0, 0.5][seed % 2]
    order = select_tokens_reference(visual, prompt, 7, alpha, None, None, "mean")
    row = Row(visual[0].float().numpy(), prompt[0].float().numpy(), None, 16, 7, alpha, "mean")
    assert order[0].tolist() == oracle_order(row)


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
