"""What users write today instead of the fused op: the baselines of the benchmarks.

All three compute the same selection as SPEC §1 (mean relevance to a pooled
prompt ``(B, D)``, core by relevance, then greedy max-min diversity; pick order
out, ``(B, k)`` int64) in fp32 on normalised tokens, for full rows of finite
tokens with ``k <= N``. ``tests/test_baselines.py`` replays them against the
fp64 oracle, so a speed comparison with them compares equal answers.

* :func:`divprune_loop` - the DivPrune reference style: one ``N x N`` cosine
  distance matrix per row, then a Python loop that re-indexes the selected
  rows of it at every step (``O(k^2 N)`` reads, ``4 N^2`` bytes of memory).
* :func:`torch_loop` - a careful PyTorch running-min loop: batched, ``N x D``
  tokens read once per pick, constant shapes and no host sync, so it can be
  captured whole in a CUDA graph.
* :class:`TorchLoopGraph` - :func:`torch_loop` captured in a CUDA graph, which
  removes the per-step launch gaps but not the per-step memory pass.
"""
from __future__ import annotations

import math

import torch

from .spec import DEFAULT_CORE_RATIO, NORM_EPS, row_budgets


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _core(v_hat: torch.Tensor, prompt: torch.Tensor, k_core: int) -> torch.Tensor:
    """``(B, k_core)`` indices by falling relevance; a stable sort gives ties to the lower index."""
    relevance = torch.bmm(v_hat, _unit(prompt).unsqueeze(-1)).squeeze(-1)
    return torch.sort(relevance, dim=1, descending=True, stable=True).indices[:, :k_core]


def divprune_loop(visual: torch.Tensor, prompt: torch.Tensor, k: int, core_ratio: float = DEFAULT_CORE_RATIO) -> torch.Tensor:
    """DivPrune-style selection: per row, a full distance matrix and a re-indexing loop."""
    B, N, _ = visual.shape
    k_b, k_core = row_budgets(k, core_ratio, N)
    v_hat = _unit(visual)
    core = _core(v_hat, prompt, k_core)
    order = torch.full((B, k), -1, dtype=torch.long, device=visual.device)
    for b in range(B):
        distance = 1.0 - v_hat[b] @ v_hat[b].T  # (N, N): the memory DivPrune pays up front
        picks = torch.empty(k_b, dtype=torch.long, device=visual.device)
        picks[:k_core] = core[b]
        for i in range(k_core, k_b):
            if i == 0:  # most isolated token: largest distance to its nearest other token
                scores = distance.fill_diagonal_(math.inf).amin(0)
                distance.fill_diagonal_(0.0)
            else:
                scores = torch.index_select(distance, 0, picks[:i]).amin(0)
                scores.index_fill_(0, picks[:i], -math.inf)  # no host scalar copied in (see torch_loop)
            picks[i] = scores.argmax()
        order[b, :k_b] = picks
    return order


def torch_loop(visual: torch.Tensor, prompt: torch.Tensor, k: int, core_ratio: float = DEFAULT_CORE_RATIO) -> torch.Tensor:
    """Running-min selection in batched PyTorch: one ``(B, N, D) x (B, D)`` pass per pick."""
    B, N, _ = visual.shape
    k_b, k_core = row_budgets(k, core_ratio, N)
    v_hat = _unit(visual)
    order = torch.full((B, k), -1, dtype=torch.long, device=visual.device)
    if k_core > 0:
        core = _core(v_hat, prompt, k_core)
        order[:, :k_core] = core
        # Similarity to the core in one batched product instead of k_core passes. Tokens are
        # the product's columns: duplicated tokens then get bit-identical similarities (as rows
        # they met different GEMM tails on CPU), so exact ties still go to the lower index.
        core_rows = torch.gather(v_hat, 1, core.unsqueeze(-1).expand(-1, -1, v_hat.shape[-1]))
        s = torch.bmm(core_rows, v_hat.mT).amax(1).scatter_(1, core, math.inf)
    else:
        gram = torch.bmm(v_hat, v_hat.mT)
        gram.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        s = gram.amax(-1)  # most isolated token first: the smallest nearest-neighbour similarity
        del gram
    rows = torch.arange(B, device=visual.device)
    for t in range(k_core, k_b):
        pick = s.argmin(1)  # first minimum: ties go to the lower index
        order[:, t] = pick
        sim = torch.bmm(v_hat, v_hat[rows, pick].unsqueeze(-1)).squeeze(-1)
        s = torch.maximum(s, sim) if t > 0 else sim
        # Taken: never the minimum again. Not `s[rows, pick] = math.inf`: indexing assigns a Python
        # scalar by copying it from the host (a stream sync a step), which CUDA-graph capture refuses.
        s.scatter_(1, pick.unsqueeze(1), math.inf)
    return order


class TorchLoopGraph:
    """:func:`torch_loop` for fixed shapes, captured once in a CUDA graph and replayed.

    Call with tensors of the captured shapes and dtype; they are copied into the
    graph's static inputs. The result is the graph's static output (overwritten
    by the next call): clone it to keep it.
    """

    def __init__(self, visual: torch.Tensor, prompt: torch.Tensor, k: int, core_ratio: float = DEFAULT_CORE_RATIO):
        if visual.device.type != "cuda":
            raise ValueError(f"visual: CUDA graphs need CUDA tensors, got {visual.device}")
        self.visual, self.prompt = visual.clone(), prompt.clone()
        self.k, self.core_ratio = k, core_ratio
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside capture (allocator, cuBLAS handles)
            torch_loop(self.visual, self.prompt, k, core_ratio)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.order = torch_loop(self.visual, self.prompt, k, core_ratio)

    def __call__(self, visual: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        self.visual.copy_(visual)
        self.prompt.copy_(prompt)
        self.graph.replay()
        return self.order
