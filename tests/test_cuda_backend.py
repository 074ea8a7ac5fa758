"""The ``cuda`` backend on a GPU, beyond the shared suite: graphs, compile, chunking, layouts.

Correctness against the fp64 oracle is the shared suite (``test_select_tokens.py``,
which runs every backend listed in ``helpers.TOLERANCE``); these tests cover what
is specific to ``csrc/``. All of them need a GPU and compile the extension on first use.
"""
from __future__ import annotations

import pytest
import torch

import zspa_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(B, N, D, T=5, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    visual = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
    prompt = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    return visual, prompt


def _select(visual, prompt, k, **kw):
    return zspa_kernels.select_tokens(visual, prompt, k, backend="cuda", pick_order=True, **kw)


def test_cuda_graph_replay_matches_eager():
    visual, prompt = _inputs(2, 576, 256)
    lengths = torch.tensor([576, 400], device="cuda")
    _select(visual, prompt, 64, lengths=lengths)  # build, load and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _select(visual, prompt, 64, lengths=lengths)
    fresh_visual, fresh_prompt = _inputs(2, 576, 256, seed=1)
    visual.copy_(fresh_visual)
    prompt.copy_(fresh_prompt)
    graph.replay()
    assert torch.equal(captured, _select(fresh_visual, fresh_prompt, 64, lengths=lengths))


def test_torch_compile_fullgraph_matches_eager():
    visual, prompt = _inputs(2, 100, 64)

    def pick(v, p):
        return torch.ops.zspa.select_tokens(v, p, 16, 0.25, None, None, "max", "cuda", False)

    assert torch.equal(torch.compile(pick, fullgraph=True)(visual, prompt), pick(visual, prompt))


def test_layout_does_not_change_the_result():
    visual, prompt = _inputs(3, 77, 48, dtype=torch.float16)
    strided = visual.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not strided.is_contiguous()
    assert torch.equal(_select(strided, prompt, 20), _select(visual, prompt, 20))


def test_gram_chunks_keep_rows_independent():
    # N = 16384 puts one row per 1 GiB Gram chunk, so B = 2 runs two launches.
    visual, prompt = _inputs(2, 16384, 32, dtype=torch.float32)
    lengths = torch.tensor([16384, 9000], device="cuda")
    batched = _select(visual, prompt, 12, lengths=lengths)
    for b in range(2):
        alone = _select(visual[b : b + 1], prompt[b : b + 1], 12, lengths=lengths[b : b + 1])
        assert torch.equal(alone[0], batched[b])


def test_wide_rows_replay_against_fp64():
    # Wider than the shared suite's random cases: over 1024 tokens (two per thread), D >> 32,
    # and the isolation seed (alpha = 0) over hundreds of tokens.
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    for n_tokens, alpha in ((1100, 0.5), (600, 0.0)):
        visual, prompt = _inputs(1, n_tokens, 96, T=7)
        mask = torch.tensor([[True, False, True, True, False, True, True]], device="cuda")
        order = _select(visual, prompt, 40, core_ratio=alpha, prompt_mask=mask).cpu()
        row = Row(visual[0].float().cpu().numpy(), prompt[0].float().cpu().numpy(), mask[0].cpu().numpy(),
                  n_tokens, 40, alpha, "mean")
        replay(row, order[0].tolist(), TOLERANCE["cuda"][torch.bfloat16])
