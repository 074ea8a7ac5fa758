"""The custom op's registration: schema, fake kernel, opcheck, torch.compile."""
from __future__ import annotations

import pytest
import torch

import zspa_kernels  # noqa: F401  (registers the op)
from helpers import random_case


def test_schema():
    schema = str(torch.ops.zspa.select_tokens.default._schema)
    assert schema.startswith("zspa::select_tokens(Tensor visual, Tensor prompt, SymInt k, float core_ratio=0.5")
    assert schema.endswith("-> Tensor")
    assert torch.Tag.pt2_compliant_tag in torch.ops.zspa.select_tokens.default.tags


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_opcheck(seed):
    case = random_case(seed)
    torch.library.opcheck(torch.ops.zspa.select_tokens.default, case.args())


def test_compile_fullgraph_matches_eager():
    case = random_case(11)

    def pipeline(visual, prompt, lengths):
        kept = torch.ops.zspa.select_tokens(visual, prompt, 4, 0.5, lengths)
        return torch.gather(visual, 1, kept.clamp_min(0).unsqueeze(-1).expand(-1, -1, visual.shape[-1]))

    lengths = torch.full((case.visual.shape[0],), case.visual.shape[1])
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(case.visual, case.prompt, lengths), pipeline(case.visual, case.prompt, lengths), equal_nan=True)


def test_output_needs_no_grad_and_inputs_may_require_it():
    visual = torch.randn(1, 9, 4, requires_grad=True)
    kept = torch.ops.zspa.select_tokens(visual, torch.randn(1, 4), 3)
    assert kept.dtype == torch.int64 and not kept.requires_grad
