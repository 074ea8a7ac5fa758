"""Shared test helpers: which backends run here and their replay tolerances, random inputs
(odd sizes, clusters, duplicates, padding, masks), and the fp64 rows of a case.

Every test module imports from here (never from conftest or from another test module).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import numpy as np
import torch

from fp64_oracle import Row
from zspa_kernels.dispatch import available_backends
from zspa_kernels.spec import CORE_TOLERANCE, PICK_TOLERANCE, pool_shift, triton_interpreter

# Largest fp64 score gap a backend may leave at one pick (a near-tie), per input dtype: the package's
# bounds (spec.PICK_TOLERANCE, which says where each comes from), the same for every dtype. The core's
# steps rank by fp32 relevance in every backend (spec.CORE_TOLERANCE): where a backend's bound is looser
# (cpu's fp16 similarities), the value is the pair (core, rest) that fp64_oracle.replay holds each phase to.
TOLERANCE = {backend: {dtype: tol if tol <= CORE_TOLERANCE else (CORE_TOLERANCE, tol)
                       for dtype in (torch.float32, torch.float16, torch.bfloat16)}
             for backend, tol in PICK_TOLERANCE.items()}


def exact_ties(backend: str) -> str:
    """Which exact fp64 ties ``backend`` must give to the lower index on any input (fp64_oracle.replay):
    those of identical tokens, except under the Triton interpreter, whose tiles are the host BLAS's
    matrix products: a CPU GEMM rounds an output by its position (its edge rows run another
    micro-kernel), so two copies of a token may differ there in the last bit. On GPUs the kernels
    are held to copies' ties (not yet run on one since this rule: bench/GPU-NOTES.md, item 1)."""
    return "nonfinite" if backend == "triton" and triton_interpreter() else "tokens"


# Random cases per dtype; the interpreted Triton backend runs a third of them to keep CI short.
RANDOM_CASES = 120
INTERPRETED_RANDOM_CASES = 40

MACHINE_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_here() -> list[str]:
    """The backends this machine runs (:func:`zspa_kernels.dispatch.available_backends`)."""
    return available_backends(MACHINE_DEVICE)


def random_case_count(backend: str) -> int:
    return INTERPRETED_RANDOM_CASES if backend == "triton" and triton_interpreter() else RANDOM_CASES


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside, put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_for(backend: str) -> torch.device:
    return MACHINE_DEVICE if backend not in ("reference", "cpu") else torch.device("cpu")


def oracle_rows(case):
    """``(b, fp64 Row)`` for every batch row of ``case``."""
    B, N, _ = case.visual.shape
    lengths = [N] * B if case.lengths is None else case.lengths.tolist()
    for b in range(B):
        mask = None if case.prompt_mask is None else case.prompt_mask[b].numpy()
        yield b, Row(case.visual[b].float().numpy(), case.prompt[b].float().numpy(), mask, lengths[b], case.k,
                     case.core_ratio, case.relevance)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Case:
    visual: torch.Tensor
    prompt: torch.Tensor
    k: int
    core_ratio: float
    lengths: Optional[torch.Tensor]
    prompt_mask: Optional[torch.Tensor]
    relevance: str

    def args(self):
        return (self.visual, self.prompt, self.k, self.core_ratio, self.lengths, self.prompt_mask, self.relevance)

    def describe(self) -> str:
        B, N, D = self.visual.shape
        return (f"B={B} N={N} D={D} k={self.k} alpha={self.core_ratio} relevance={self.relevance} "
                f"dtype={self.visual.dtype} prompt={tuple(self.prompt.shape)} "
                f"lengths={None if self.lengths is None else self.lengths.tolist()}")


def gaussian_tokens(g: torch.Generator, B: int, N: int, D: int, min_scale: float = 0.1) -> torch.Tensor:
    """Gaussian tokens, each scaled by a random factor in [min_scale, min_scale + 1)."""
    return torch.randn(B, N, D, generator=g) * torch.rand(B, N, 1, generator=g).add(min_scale)


def clustered_tokens(g: torch.Generator, B: int, N: int, D: int, centers: int = 4,
                     spread: float = 0.05) -> torch.Tensor:
    """Near-duplicates around a few centres: the greedy chain runs through near-ties."""
    c = torch.randn(B, centers, D, generator=g)
    which = torch.randint(0, centers, (B, N), generator=g)
    return c[torch.arange(B)[:, None], which] + spread * torch.randn(B, N, D, generator=g)


def banded_tokens(g: torch.Generator, B: int, N: int, D: int) -> torch.Tensor:
    """Gaussian tokens at magnitudes inside the cuda backend's raw band (1e-9 to 1e9) and outside
    it on either side (1e-30, 1e-12; 1e15, 1e30: csrc/gram_repair.cuh), by turns; the last two
    tokens copy token 3 (1e15), so two outside tokens share Gram entries bit for bit."""
    magnitudes = torch.tensor([1e-9, 1e-30, 1.0, 1e15, 1e-12, 1e9, 1e30, 3.0, 1e-3])
    x = torch.randn(B, N, D, generator=g) * magnitudes[torch.arange(N) % len(magnitudes)].reshape(1, N, 1)
    x[:, N - 1], x[:, N - 2] = x[:, 3], x[:, 3]
    return x


def _tokens(g: torch.Generator, B: int, N: int, D: int, kind: str) -> torch.Tensor:
    if kind == "clustered":
        return clustered_tokens(g, B, N, D)
    x = gaussian_tokens(g, B, N, D)
    if kind == "duplicates" and N > 1:
        src = torch.randint(0, N, (N // 2,), generator=g)
        dst = torch.randint(0, N, (N // 2,), generator=g)
        x[:, dst] = x[:, src]
    if kind == "special" and N > 2:
        x[:, torch.randint(0, N, (1,), generator=g)] = 0.0
        x[0, torch.randint(0, N, (1,), generator=g), 0] = float("nan")
        x[-1, torch.randint(0, N, (1,), generator=g), -1] = float("inf")
    return x


def random_case(seed: int, dtype: torch.dtype = torch.float32, max_n: int = 70, max_d: int = 48) -> Case:
    """One random case; the seed picks sizes, token structure, padding, prompt form and alpha."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    B = pick([1, 2, 3, 5])
    N = pick([1, 2, 3, 7, 16, 33, max_n])
    D = pick([1, 3, 8, 17, max_d])
    kind = pick(["gaussian", "clustered", "duplicates", "special"])
    visual = _tokens(g, B, N, D, kind)
    lengths = None
    if pick([False, True]):
        lengths = torch.randint(1, N + 1, (B,), generator=g)
        lengths = lengths.to(pick([torch.int32, torch.int64]))
    k = pick([1, 2, max(1, N // 3), N, N + 3])
    core_ratio = pick([0.0, 1.0, 0.5, 0.25, float(torch.rand((), generator=g))])
    relevance = pick(["mean", "max"])
    prompt_mask = None
    if pick(["pooled", "tokens"]) == "pooled":
        prompt = torch.randn(B, D, generator=g)
    else:
        T = pick([1, 4, 7])
        prompt = torch.randn(B, T, D, generator=g)
        if pick([False, True]):
            prompt_mask = torch.rand(B, T, generator=g) < 0.7
            prompt_mask[:, 0] = True
    return Case(visual.to(dtype), prompt.to(dtype), k, core_ratio, lengths, prompt_mask, relevance)


def exact_tie_case(seed: int, dtype: torch.dtype = torch.float32) -> Case:
    """Tokens of +-1 entries in D=16: every cosine is a multiple of 1/16, exact in any dtype,
    so ties are exact everywhere and the lower index must win them."""
    g = torch.Generator().manual_seed(seed)
    B, N, D = 2, 24, 16
    patterns = torch.randint(0, 2, (6, D), generator=g).float() * 2 - 1
    visual = patterns[torch.randint(0, 6, (B, N), generator=g)]
    prompt = patterns[torch.randint(0, 6, (B,), generator=g)]
    core_ratio = [0.0, 0.5, 1.0][seed % 3]
    return Case(visual.to(dtype), prompt.to(dtype), 9, core_ratio, None, None, "mean")


def one_feature_case(seed: int, dtype: torch.dtype = torch.float32) -> Case:
    """Tokens and prompt rows of one feature, of magnitudes 1e-3 to 1e3 and either sign: every
    cosine is exactly +-1 (or 0 for a zero token) in any arithmetic, so distinct tokens tie
    exactly and the lower index must win; random cases leave such ties to the gap check."""
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(2, 23, 1, generator=g) * torch.logspace(-3, 3, 23).view(1, 23, 1)
    visual[1, 4] = 0.0
    prompt = torch.randn(2, 3, 1, generator=g)
    return Case(visual.to(dtype), prompt.to(dtype), 9, [0.0, 0.5, 1.0][seed % 3], None, None,
                ["mean", "max"][seed % 2])


def copies_case(seed: int, dtype: torch.dtype = torch.float32) -> Case:
    """Every token has a copy elsewhere in its row and the core is empty: the seed (the most isolated
    token) and every later pick are exact ties between copies, which the lower index must win."""
    g = torch.Generator().manual_seed(seed)
    half, D = 5 + seed % 31, (1, 7, 17, 48)[seed % 4]
    base = torch.randn(3, half, D, generator=g) * torch.rand(3, half, 1, generator=g).add(0.1)
    visual = torch.cat([base, base], 1)[:, torch.randperm(2 * half, generator=g)]
    return Case(visual.to(dtype), torch.randn(3, D, generator=g).to(dtype), 9, 0.0, None, None, "mean")


def row_order_pool(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """spec.pool_shift's rule in NumPy, as the GPU kernels pool (csrc/prompt_stats.cuh, Triton's
    pool_prompt): the valid rows of ``x`` (T, D) summed in row order in fp32, divided by their
    count; where a feature's sum is not finite, the same of the rows times ``2**-k``, scaled back
    by ``2**k`` (saturated where only that overflows). (D,) fp32."""
    x, valid = x.float().cpu().numpy(), valid.cpu().numpy()
    k = pool_shift(x.shape[0])
    count = np.float32(max(int(valid.sum()), 1))
    acc, acc_down = np.zeros(x.shape[1], dtype=np.float32), np.zeros(x.shape[1], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(x.shape[0]):  # row order, fp32, valid rows only
            if valid[t]:
                acc = (acc + x[t]).astype(np.float32)
                acc_down = (acc_down + x[t] * np.float32(2.0**-k)).astype(np.float32)
        mean, mean_down = acc / count, acc_down / count
        rescaled = (mean_down * np.float32(2.0**k)).astype(np.float32)
    largest = np.finfo(np.float32).max
    rescaled = np.where(np.isfinite(mean_down) & ~np.isfinite(rescaled), np.copysign(largest, rescaled), rescaled)
    return torch.from_numpy(np.where(np.isfinite(mean), mean, rescaled).astype(np.float32))
