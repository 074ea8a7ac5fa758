"""api.py: zspa_kernels.select_tokens over the op (defaults, output forms, strict mode).
Bad arguments are test_checks.py's; the selection itself, test_select_tokens.py's."""
from __future__ import annotations

import inspect

import pytest
import torch

import zspa_kernels
from helpers import random_case
from zspa_kernels.spec import DEFAULT_CORE_RATIO


def test_defaults_are_the_spec_and_the_op_schema():
    params = inspect.signature(zspa_kernels.select_tokens).parameters
    assert params["core_ratio"].default == DEFAULT_CORE_RATIO
    assert params["relevance"].default == "mean" and params["backend"].default == "auto"
    schema = str(torch.ops.zspa.select_tokens.default._schema)
    assert f"float core_ratio={DEFAULT_CORE_RATIO}" in schema


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_ascending_output_is_the_sorted_pick_order(seed):
    case = random_case(seed)
    order = zspa_kernels.select_tokens(*case.args(), pick_order=True)
    kept = zspa_kernels.select_tokens(*case.args())
    assert torch.equal(kept, torch.ops.zspa.select_tokens(*case.args()))
    for b in range(order.shape[0]):
        picks = [i for i in order[b].tolist() if i >= 0]
        assert kept[b].tolist() == sorted(picks) + [-1] * (case.k - len(picks))


def test_strict_mode_returns_the_same_selection_for_good_values():
    case = random_case(5)
    assert torch.equal(zspa_kernels.select_tokens(*case.args(), strict=True),
                       zspa_kernels.select_tokens(*case.args()))
