"""Launch plan of the Triton backend: path, block sizes, warps and scratch, from shapes only.

Two paths of the same two launches (:mod:`.token_stats`, then :mod:`.gram_select`):

* ``gram``: each row's ``N × N`` fp32 similarity matrix is kept in scratch, so a greedy
  step is one row read. Rows are independent, so a batch whose matrices exceed the Gram
  budget runs as several launch pairs of ``rows_per_launch`` rows each, reusing one
  scratch (a host loop over batch groups, never over greedy steps).
* ``stream``: only when ONE row's matrix (``4·N²`` bytes) exceeds the budget: every
  greedy step recomputes ``V v_jᵀ`` from the input, ``N·D`` elements through the
  selecting CTA per step - correct at any ``N``, but slow (see :mod:`.gram_select`).
  Scratch is then O(B·N²/64) (per-tile rank partials).

The budget is :func:`spec.gram_budget` (``ZSPA_GRAM_BUDGET``, shared with the cuda
backend); ``0`` forces streaming.

Everything here depends on shapes, dtype and Python scalars only, so a plan never
syncs the device and the scratch of a call is the same at every CUDA-graph replay.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from ..spec import gram_budget, may_need_isolation, triton_interpreter

MAX_GRID_Y = 65535  # CUDA's limit on a grid's y extent: the batch rows of one launch pair


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    path: str             # "gram" or "stream"
    rows_per_launch: int  # batch rows per launch pair (the Gram budget's share)
    need_isolation: bool  # some row may have k_core = 0: compute the most-isolated seed
    tiles: int            # Gram tiles per side; the selection grid is (tiles², B)
    block_tile: int       # Gram tile edge (rows = columns)
    block_d: int          # feature chunk of the selection launch's D loops (Gram tiles, streamed rows)
    block_d_stats: int    # feature chunk of the statistics launch's D loops
    block_select: int     # chunk of the row walked by the selecting CTA
    core_block: int       # core picks whose similarity rows are gathered at once (power of 2)
    block_rows: int       # tokens per CTA of the statistics launch
    block_prompt: int     # prompt rows per dot in the statistics launch
    num_warps_tile: int
    num_stages_tile: int  # software-pipeline depth of the Gram tiles' K loop (copies in flight: this - 1)
    num_warps_stats: int
    num_stages_stats: int  # software-pipeline depth of the statistics launch's D loops (1: none)
    dot_precision: str
    dot_upcast: bool      # bf16 under TRITON_INTERPRET: see primitives.dot_operand
    scale_operands: bool  # bf16/fp32: scale dot operands by powers of two (products could overflow)
    scratch_bytes: int


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(x)))


def launch_plan(B: int, N: int, D: int, dtype: torch.dtype, k: int, core_ratio: float,
                has_lengths: bool, relevance: str = "mean", async_copies: bool = True) -> LaunchPlan:
    """The plan for ``visual`` of shape ``(B, N, D)`` and ``dtype``, budget ``k``, ratio ``core_ratio``,
    ``relevance`` "mean" or "max", on a GPU with asynchronous copies (sm_80 and newer: Triton
    pipelines loads through them) or without (:func:`async_copies_on`). Memoised on everything
    it depends on (the environment's budget and interpreter switch too): computing one is ~10 µs
    of Python (an ad-hoc CPU timing), a large share of the op's host time."""
    return memoised_plan(B, N, D, dtype, k, core_ratio, has_lengths, relevance, gram_budget(), triton_interpreter(),
                         async_copies)


@functools.lru_cache(maxsize=None)
def async_copies_on(device: torch.device) -> bool:
    """Whether ``device`` has asynchronous global-to-shared copies (compute capability 8.0+),
    which the plan's deep pipelines need; True off CUDA (the interpreter, meta tensors)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8


@functools.lru_cache(maxsize=1024)
def memoised_plan(B: int, N: int, D: int, dtype: torch.dtype, k: int, core_ratio: float, has_lengths: bool,
                  relevance: str, budget: int, interpreted: bool, async_copies: bool) -> LaunchPlan:
    """:func:`launch_plan` with the environment's Gram budget (:func:`spec.gram_budget`) and
    interpreter switch (:func:`spec.triton_interpreter`) passed in, for a caller that has read
    them already (the backend's entry point: each read is ~0.6 µs of a call's host time)."""
    need_isolation = may_need_isolation(k, core_ratio, N, has_lengths)
    row_gram = 4 * N * N
    path = "gram" if row_gram <= budget else "stream"
    rows = min(B, budget // row_gram) if path == "gram" else B
    rows = min(rows, MAX_GRID_Y)  # the batch group is both launches' grid y
    # tl.dot needs every dim >= 16. A Gram tile's K loop is bound by the bytes it has in flight:
    # a 64-wide tile of 16-bit tokens pulls 2 x 64 x D x 2 bytes from L2 (1 MiB at D = 4096), and
    # with 32-wide chunks and 3 stages (run 1's plan) only 2 x 8 KB were in flight, ~20 GB/s at
    # an L2 latency of ~0.7 us: ~50 us a tile, what run 1 measured (bench/GPU-NOTES.md). 64-wide
    # chunks and 5 stages keep 64 KB in flight (~90 GB/s, near what one SM draws from L2: ~12 us)
    # at 127 registers, no spills and 80 KB of shared memory for sm_90, as a launch specialises
    # them (python -m zspa_kernels.triton.aot, Triton 3.6); 128-wide chunks would hold the same
    # bytes with 3 stages at 244-252 registers, near the limit. 8 warps. The streaming path keeps
    # 32-wide chunks: its step holds a (block_select x block_d) product in registers. fp32 (IEEE
    # dots on FMA units, not tensor cores) takes 32-wide tiles and 16-wide chunks: 80-111
    # registers (Triton 3.8 spills 8 B in the "max" variant). Register counts written here before
    # 2026-11-30 (~230, spills at 128-wide tiles) came from a compile without the launch's
    # specialisation, and kept the chunks at 32. Without asynchronous copies (before sm_80) there
    # is no pipeline to fill, and 64-wide chunks spill ~900 B on sm_75: 32-wide, 3 stages there.
    block_tile = _pow2(N, 16, 32 if dtype == torch.float32 else 64)
    tiles = triton.cdiv(N, block_tile)
    deep = async_copies and path == "gram" and dtype != torch.float32
    block_d = _pow2(D, 16, 16 if dtype == torch.float32 else 64 if deep else 32)
    num_stages_tile = 5 if deep else 3
    # The statistics launch streams each CTA's tokens twice over D, accumulating in registers
    # (one reduction after each pass). Its time is the chain of chunk loads a CTA waits for in
    # turn, so "mean" takes 8 tokens a CTA and 512-wide chunks: 16 steps at D = 4096 and 72 CTAs
    # at LLaVA-1.5, where 32 tokens x 128 features took 64 steps on 18 CTAs (the H200's 146 us,
    # then also bound by per-chunk reductions through shared memory; bench/GPU-NOTES.md). The
    # same 4096-element tile: ~100 registers for sm_90, no spills under Triton 3.6 and 3.8.
    # "max" dots each CTA's tokens with 16-row prompt blocks on tensor cores, whose tiles need
    # 16+ rows: 32 tokens and 128-wide chunks (fp32: 64; 16 x 256 spilled ~36 B for fp16).
    # "mean" pipelines its two D loops 3 stages deep where the GPU has asynchronous copies (2
    # chunks in flight: 80 registers, 20 KB of shared memory, no spills for sm_90 as a launch
    # compiles it); "max" does not (it spilled 12-20 B there, beside its prompt pass). Before
    # sm_80 Triton has no tensor-core dot for these kernels at all (fp16 included: FMA loops), and
    # 16-bit "max" with 128-wide chunks spilled ~300 B for sm_75 (255 registers): 64-wide there,
    # as for fp32 (194 registers, no spills; Triton 3.8, fp16, python -m zspa_kernels.triton.aot
    # --arch 75).
    if relevance == "mean":
        block_rows, block_d_stats = 8, _pow2(D, 16, 512)
    else:
        block_rows, block_d_stats = 32, _pow2(D, 16, 64 if dtype == torch.float32 or not async_copies else 128)
    # The selecting CTA walks its row in chunks of block_select: a greedy step loads each chunk's
    # state and Gram row, and the compiled loop (sm_90) has two chunks' loads in flight before
    # their reductions' barriers, so a video row (N = 16384, its Gram in DRAM) waited for 4 round
    # trips a step in 2048-wide chunks and waits for 2 in 4096-wide ones (the same 127 registers
    # as a launch compiles it). The streaming step holds a (block_select × block_d) tile in
    # registers: keep it small.
    block_select = _pow2(N, 16, 4096 if path == "gram" else 128)
    # Gathering several core rows at once overlaps their L2 latency (a ~8K-element tile);
    # streamed rows are long D loops anyway, one at a time keeps registers low.
    core_block = max(1, min(16, 8192 // block_select)) if path == "gram" else 1
    scratch = rows * (17 * N + 4                # norm, scale, finite, key; counter
                      + 4 * tiles * N           # rank partials
                      + 4 * N                   # greedy state
                      + (4 * tiles * N if need_isolation else 0)
                      + (row_gram if path == "gram" else 0))
    return LaunchPlan(
        path=path, rows_per_launch=rows, need_isolation=need_isolation, tiles=tiles, block_tile=block_tile,
        block_d=block_d, block_d_stats=block_d_stats,
        block_select=block_select, core_block=core_block, block_rows=block_rows, block_prompt=16,
        num_warps_tile=8, num_stages_tile=num_stages_tile, num_warps_stats=8,
        num_stages_stats=3 if relevance == "mean" and async_copies else 1,
        dot_precision="ieee", dot_upcast=dtype == torch.bfloat16 and interpreted,
        scale_operands=dtype != torch.float16,
        scratch_bytes=scratch,
    )
