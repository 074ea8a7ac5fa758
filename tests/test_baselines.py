"""The benchmark baselines select what the fp64 oracle selects, so their timings compare equal answers."""
from __future__ import annotations

import pytest
import torch

from helpers import DTYPES, TOLERANCE, exact_tie_case, random_case
from fp64_oracle import Row, oracle_order, replay
from zspa_kernels.baselines import TorchLoopGraph, divprune_loop, torch_loop

BASELINES = {"divprune_loop": divprune_loop, "torch_loop": torch_loop}


def _baseline_case(seed, dtype):
    """A random case within the baselines' domain: full rows, finite tokens, pooled prompt, k <= N."""
    case = random_case(seed, dtype)
    visual = torch.nan_to_num(case.visual.float(), nan=0.5, posinf=3.0).to(dtype)
    prompt = case.prompt.float().mean(1) if case.prompt.dim() == 3 else case.prompt.float()
    return visual, prompt.to(dtype), min(case.k, visual.shape[1]), case.core_ratio


def _replay_all(order, visual, prompt, k, core_ratio, tol):
    B, N, _ = visual.shape
    assert order.shape == (B, k) and order.dtype == torch.int64
    for b in range(B):
        row = Row(visual[b].float().numpy(), prompt[b].float().numpy(), None, N, k, core_ratio, "mean")
        replay(row, order[b].tolist(), tol)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(40))
def test_baseline_replays_against_fp64(name, dtype, seed):
    visual, prompt, k, core_ratio = _baseline_case(seed, dtype)
    order = BASELINES[name](visual, prompt, k, core_ratio)
    _replay_all(order, visual, prompt, k, core_ratio, TOLERANCE["reference"][dtype])


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("seed", range(6))
def test_baseline_gives_exact_ties_to_lower_index(name, seed):
    case = exact_tie_case(seed)
    order = BASELINES[name](case.visual, case.prompt, case.k, case.core_ratio)
    for b in range(case.visual.shape[0]):
        row = Row(case.visual[b].numpy(), case.prompt[b].numpy(), None, case.visual.shape[1], case.k,
                  case.core_ratio, "mean")
        assert order[b].tolist() == oracle_order(row)


@pytest.mark.parametrize("core_ratio", [0.0, 0.5])
def test_baselines_agree_with_the_op_at_a_llava_like_shape(core_ratio):
    """Bigger than the oracle can replay: the baselines must keep the reference backend's tokens
    (random bf16 tokens have no near-ties at this size)."""
    g = torch.Generator().manual_seed(11)
    visual = torch.randn(2, 576, 256, generator=g).to(torch.bfloat16)
    prompt = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    import zspa_kernels

    expected = zspa_kernels.select_tokens(visual, prompt, 64, core_ratio, backend="reference", pick_order=True)
    for fn in BASELINES.values():
        assert torch.equal(fn(visual, prompt, 64, core_ratio), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("core_ratio", [0.0, 0.5])
def test_graph_replay_matches_eager_on_fresh_inputs(core_ratio):
    g = torch.Generator(device="cuda").manual_seed(5)
    shape = (3, 300, 128)
    graph = TorchLoopGraph(torch.randn(shape, device="cuda", generator=g).bfloat16(),
                           torch.randn(3, 128, device="cuda", generator=g).bfloat16(), 40, core_ratio)
    for _ in range(3):  # fresh inputs each replay: the graph must read them, not the captured ones
        visual = torch.randn(shape, device="cuda", generator=g).bfloat16()
        prompt = torch.randn(3, 128, device="cuda", generator=g).bfloat16()
        assert torch.equal(graph(visual, prompt), torch_loop(visual, prompt, 40, core_ratio))


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("core_ratio", [0.0, 0.5])
def test_baselines_assign_no_host_scalar_by_index(name, core_ratio):
    """``aten.index_put_`` with a Python scalar copies that scalar from the host: a stream sync at
    every step on a GPU, which the loops users write need not pay (DivPrune's own loop does not)
    and which CUDA-graph capture refuses (the first H200 run's ``torch_loop_graph`` failed at
    every shape). The ops each baseline dispatches, recorded on CPU tensors, hold none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    visual, prompt, k, _ = _baseline_case(3, torch.float32)
    with Ops() as ops:
        BASELINES[name](visual, prompt, k, core_ratio)
    assert {"aten::argmin", "aten::argmax"} & ops.names  # the mode saw the greedy steps
    assert not {name for name in ops.names if name.startswith("aten::index_put")}, sorted(ops.names)
