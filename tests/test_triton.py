"""Triton backend specifics: launch plans, the streaming path, multi-tile/multi-chunk walks,
odd shapes and large batches, each replayed against the fp64 oracle.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set by conftest), small shapes only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import zspa_kernels
from helpers import (Case, TOLERANCE, backends_here, clustered_tokens, device_for, exact_ties, gaussian_tokens,
                     oracle_rows, row_order_pool)
from fp64_oracle import oracle_order, replay
from zspa_kernels.dispatch import interpreter_problem
from zspa_kernels.reference import select_tokens_reference
from zspa_kernels.spec import GRAM_BUDGET_ENV, MAX_K, core_count, triton_interpreter

pytestmark = pytest.mark.skipif("triton" not in backends_here(),
                                reason=interpreter_problem() or "no GPU and no TRITON_INTERPRET")

if "triton" in backends_here():
    from zspa_kernels.triton import launch_plan, select_tokens_triton
    import triton
    import triton.language as tl

    from zspa_kernels.triton.gram_select import FP_FUSION, _padding_trips, _row_bounds, split_fp64

    @triton.jit
    def row_bounds_kernel(lengths_ptr, out_ptr, N, k, alpha_hi, alpha_mid, alpha_lo):
        b = tl.program_id(0)
        _, k_b, k_core = _row_bounds(lengths_ptr, 1, b, N, k, alpha_hi, alpha_mid, alpha_lo, True)
        tl.store(out_ptr + 2 * b, k_b)
        tl.store(out_ptr + 2 * b + 1, k_core)

    @triton.jit
    def padding_trips_kernel(k_ptr, k_b_ptr, out_ptr):
        i = tl.program_id(0)
        tl.store(out_ptr + i, _padding_trips(tl.load(k_ptr + i), tl.load(k_b_ptr + i)))

DEVICE = device_for("triton")


def _case(B, N, D, k, alpha, dtype, relevance="mean", T=None, lengths=None, masked=False, seed=0, clustered=False):
    g = torch.Generator().manual_seed(seed)
    visual = clustered_tokens(g, B, N, D, centers=5, spread=0.1) if clustered else gaussian_tokens(g, B, N, D)
    prompt = torch.randn(B, D, generator=g) if T is None else torch.randn(B, T, D, generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=g) < 0.6
        mask[:, 0] = True
    lengths = None if lengths is None else torch.tensor(lengths)
    return Case(visual.to(dtype), prompt.to(dtype), k, alpha, lengths, mask, relevance)


def _check(case, plan=None):
    """Run the kernels directly (optionally with a forced plan) and replay every row."""
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in case.args()]
    order = select_tokens_triton(*args, True, plan=plan).cpu()
    kept = select_tokens_triton(*args, False, plan=plan).cpu()
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["triton"][case.visual.dtype], exact_ties("triton"))
        assert kept[b].tolist() == sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b)
    return order


def _plan(case, **overrides):
    B, N, D = case.visual.shape
    plan = launch_plan(B, N, D, case.visual.dtype, case.k, case.core_ratio, case.lengths is not None, case.relevance)
    return dataclasses.replace(plan, **overrides)


# ---- launch plan: shapes of SPEC §7 and the budget switch --------------------------------------

def test_plan_llava_is_one_gram_launch_without_isolation():
    plan = launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, has_lengths=False)
    assert (plan.path, plan.tiles, plan.block_tile, plan.num_warps_tile) == ("gram", 9, 64, 8)
    assert (plan.block_d, plan.num_stages_tile, plan.block_d_stats, plan.block_select, plan.core_block) == (
        64, 5, 512, 1024, 8)
    # Before sm_80 (no asynchronous copies, no pipeline to fill) the chunks stay 32 wide: 64 spill there.
    old = launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, has_lengths=False, async_copies=False)
    assert (old.block_d, old.num_stages_tile, old.num_stages_stats) == (32, 3, 1)
    # 16-bit "max" statistics: 128-wide chunks, 64-wide before sm_80 (128 spill there).
    for async_copies, width in ((True, 128), (False, 64)):
        assert launch_plan(32, 576, 4096, torch.float16, 64, 0.0, True, "max", async_copies).block_d_stats == width
    assert plan.block_rows == 8  # 72 statistics CTAs, 16 chunk steps each
    assert not plan.need_isolation  # k_core = 32 > 0: no N x N isolation pass
    assert 4 * 576 * 576 <= plan.scratch_bytes < 2 * 4 * 576 * 576


def test_plan_needs_isolation_exactly_when_some_row_can_have_an_empty_core():
    assert launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.0, False).need_isolation
    assert not launch_plan(1, 576, 4096, torch.bfloat16, 64, 1 / 128, False).need_isolation  # 64/128 = 0.5
    assert launch_plan(1, 576, 4096, torch.bfloat16, 64, 1 / 129, False).need_isolation
    # With lengths a row may hold a single token: k_core = floor(alpha + 0.5) = 0 for alpha < 0.5.
    assert launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.49, True).need_isolation
    assert not launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, True).need_isolation


def test_plan_video_batch_runs_in_groups_that_fit_the_budget():
    one = launch_plan(1, 16384, 3584, torch.bfloat16, 1638, 0.5, False)
    assert (one.path, one.rows_per_launch, one.tiles, one.block_select) == ("gram", 1, 256, 4096)
    assert one.scratch_bytes >= 4 * 16384**2
    batch = launch_plan(8, 16384, 3584, torch.bfloat16, 1638, 0.5, False)
    assert (batch.path, batch.rows_per_launch) == ("gram", 4)  # 4 x 1 GiB per launch pair
    assert batch.scratch_bytes < 4 * 4 * 16384**2 * 1.1
    huge = launch_plan(2, 40000, 1024, torch.bfloat16, 4000, 0.5, False)  # one row: 6.4 GB
    assert (huge.path, huge.rows_per_launch, huge.block_select, huge.core_block) == ("stream", 2, 128, 1)
    assert huge.scratch_bytes < 2 * 4 * 40000**2 // 32  # rank partials O(B·N²/64): no N x N matrix


def test_plan_is_memoised_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv(GRAM_BUDGET_ENV, raising=False)
    plan = launch_plan(2, 300, 64, torch.bfloat16, 30, 0.5, True)
    assert launch_plan(2, 300, 64, torch.bfloat16, 30, 0.5, True) is plan  # no Python work per call
    monkeypatch.setenv(GRAM_BUDGET_ENV, "0")
    assert launch_plan(2, 300, 64, torch.bfloat16, 30, 0.5, True).path == "stream" != plan.path


def test_plan_fp32_uses_narrower_feature_chunks_and_ieee_dots():
    plan = launch_plan(32, 576, 4096, torch.float32, 64, 0.5, False)
    assert (plan.block_d, plan.block_d_stats, plan.dot_precision, plan.path) == (16, 512, "ieee", "gram")
    assert launch_plan(32, 576, 4096, torch.float32, 64, 0.5, False, "max").block_d_stats == 64


def test_plan_max_relevance_keeps_16_row_tiles_for_its_prompt_dots():
    """tl.dot needs 16+ rows: "max" keeps 32 tokens a statistics CTA, "mean" takes 8."""
    mean = launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, False, "mean")
    most = launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, False, "max")
    assert (mean.block_rows, mean.block_d_stats) == (8, 512)
    assert (most.block_rows, most.block_d_stats) == (32, 128) and most.block_rows >= 16


def test_gram_budget_env_switches_path_and_rejects_garbage(monkeypatch):
    monkeypatch.setenv(GRAM_BUDGET_ENV, str(4 * 576 * 576 - 1))
    assert launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, False).path == "stream"
    monkeypatch.setenv(GRAM_BUDGET_ENV, str(4 * 576 * 576))
    assert launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, False).path == "gram"
    assert launch_plan(32, 576, 4096, torch.bfloat16, 64, 0.5, False).rows_per_launch == 1
    monkeypatch.setenv(GRAM_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=GRAM_BUDGET_ENV):
        launch_plan(1, 576, 4096, torch.bfloat16, 64, 0.5, False)


# ---- both paths against fp64 ---------------------------------------------------------------------

STREAM_CASES = [
    dict(B=2, N=37, D=20, k=9, alpha=0.5, dtype=torch.float32, T=5, masked=True, relevance="max"),
    dict(B=3, N=29, D=33, k=12, alpha=0.0, dtype=torch.bfloat16, lengths=[29, 1, 17], clustered=True),
    dict(B=1, N=40, D=7, k=45, alpha=0.3, dtype=torch.float16, relevance="max"),
]


@pytest.mark.parametrize("spec", STREAM_CASES, ids=lambda s: f"{s['dtype']}-a{s['alpha']}")
def test_streaming_path_below_budget_replays_and_matches_gram(monkeypatch, spec):
    case = _case(**spec)
    gram_order = _check(case)
    monkeypatch.setenv(GRAM_BUDGET_ENV, "0")
    assert _plan(case).path == "stream"
    stream_order = _check(case)
    # Different arithmetic may only split near-ties; these inputs have none at fp32 level.
    assert torch.equal(stream_order, gram_order)


def test_batch_groups_under_a_small_budget_match_one_launch(monkeypatch):
    case = _case(B=5, N=20, D=12, k=8, alpha=0.25, dtype=torch.float16, T=3, masked=True, relevance="max",
                 lengths=[20, 3, 11, 20, 1], seed=10)
    whole = _check(case)
    monkeypatch.setenv(GRAM_BUDGET_ENV, str(2 * 4 * 20 * 20))
    assert (_plan(case).path, _plan(case).rows_per_launch) == ("gram", 2)  # groups of 2, 2, 1
    assert torch.equal(_check(case), whole)


@pytest.mark.parametrize("path", ["gram", "stream"])
def test_many_tiles_chunks_and_core_blocks(path):
    # N=70 with 16-wide tiles and chunks: 5 tiles per side, 5 chunks, core gathered 4 rows at once
    # (k_core = 17: a partial last block), lengths cutting through a chunk.
    case = _case(B=2, N=70, D=24, k=29, alpha=0.6, dtype=torch.bfloat16, T=4, relevance="max",
                 lengths=[70, 43], clustered=True, seed=3)
    _check(case, _plan(case, path=path, block_tile=16, tiles=5, block_select=16,
                       core_block=4 if path == "gram" else 1))


def test_many_chunks_with_the_isolation_seed():
    case = _case(B=2, N=50, D=9, k=20, alpha=0.0, dtype=torch.float32, lengths=[50, 33], seed=4)
    _check(case, _plan(case, block_tile=16, tiles=4, block_select=16))


# alpha·k_b in fp64 is 0.49999999999999994 (+0.5 rounds up to 1.0: k_core = 1; one fma would give 0),
# then two ulps lower, 0.4999999999999999 (k_core = 0, while alpha rounded to fp32 would give 1).
ALPHA_NEAR_HALF = [0.04545454545454545, math.nextafter(math.nextafter(0.04545454545454545, 0), 0)]


@pytest.mark.parametrize("alpha", ALPHA_NEAR_HALF)
def test_core_size_rounds_like_the_reference(alpha):
    case = _case(B=1, N=11, D=8, k=11, alpha=alpha, dtype=torch.float32, seed=8)
    order = _check(case)
    assert order.tolist() == select_tokens_reference(*case.args()).tolist()
    top_relevance, most_isolated = (select_tokens_reference(case.visual, case.prompt, 11, a, None, None, "mean")[0, 0]
                                    for a in (1.0, 0.0))
    assert top_relevance != most_isolated  # so the first pick tells k_core = 1 from k_core = 0
    assert order[0, 0] == (top_relevance if math.floor(alpha * 11 + 0.5) == 1 else most_isolated)


def test_alpha_travels_as_three_fp32_that_sum_exactly():
    g = torch.Generator().manual_seed(11)
    for x in torch.rand(1000, generator=g, dtype=torch.float64).tolist() + ALPHA_NEAR_HALF + [0.0, 1.0, 1 / 3]:
        hi, mid, lo = split_fp64(x)
        assert all(v == float(torch.tensor(v, dtype=torch.float32)) for v in (hi, mid, lo))
        assert (hi + mid) + lo == x


def test_row_bounds_match_spec_core_count_on_every_budget():
    """The kernels' own k_core (fp64 on the device) against spec.core_count, for every k_b up to
    300 and alphas on and around the .5 boundaries."""
    budgets = torch.arange(1, 301, device=DEVICE)
    for alpha in ALPHA_NEAR_HALF + [0.0, 1.0, 0.5, 0.1, 0.3, 1 / 3, 0.49999999999999994, 0.5000000000000001,
                                    (2 * 7 + 1) / 2 / 97, 1 / 129]:
        out = torch.empty(300, 2, dtype=torch.int32, device=DEVICE)
        # launched as the package launches its kernels: on a GPU, fp fusion would make
        # alpha·k_b + 0.5 one fma, which rounds alpha = 1/22, k_b = 11 down to k_core = 0
        row_bounds_kernel[(300,)](budgets, out, 300, 1000, *split_fp64(alpha), enable_fp_fusion=FP_FUSION)
        expected = [[kb, core_count(alpha, kb)] for kb in range(1, 301)]
        assert out.cpu().tolist() == expected, alpha


# ---- odd shapes and batch sizes ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_mean_of_a_long_masked_prompt(dtype):
    """"mean" pools the prompt 32 rows a step (pool_prompt): 71 rows take three steps, the last
    one partial, with masked-out rows between (two of them NaN, which must not reach the mean)."""
    case = _case(B=3, N=45, D=40, k=12, alpha=0.5, dtype=dtype, T=71, masked=True, relevance="mean", seed=9)
    case.prompt_mask[:, [17, 66]] = False
    case.prompt[:, 17, 3] = case.prompt[:, 66, 0] = float("nan")
    assert bool(case.prompt_mask[:, 64:].any()) and not bool(case.prompt_mask.all())
    _check(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_large_odd_shape(dtype):
    case = _case(B=2, N=203, D=130, k=41, alpha=0.3, dtype=dtype, T=19, masked=True, relevance="max",
                 lengths=[203, 150], seed=5)
    _check(case)


def test_batch_of_65_rows_matches_row_by_row():
    case = _case(B=65, N=24, D=16, k=7, alpha=0.5, dtype=torch.float16, T=3,
                 lengths=torch.randint(1, 25, (65,), generator=torch.Generator().manual_seed(6)).tolist(), seed=6)
    order = _check(case)
    for b in (0, 31, 64):
        alone = zspa_kernels.select_tokens(
            case.visual[b:b + 1].to(DEVICE), case.prompt[b:b + 1].to(DEVICE), case.k, case.core_ratio,
            case.lengths[b:b + 1].to(DEVICE), backend="triton", pick_order=True).cpu()
        assert alone[0].tolist() == order[b].tolist()


def test_plan_keeps_a_launch_within_the_grid_y_limit(monkeypatch):
    """The batch rows of a launch pair are its grids' y extent, at most 65535 on CUDA."""
    from zspa_kernels.triton.plan import MAX_GRID_Y

    for budget in ("0", str(1 << 40)):  # the stream path takes every row; the gram path every row that fits
        monkeypatch.setenv(GRAM_BUDGET_ENV, budget)
        plan = launch_plan(70000, 16, 32, torch.bfloat16, 4, 0.5, False)
        assert plan.path == ("stream" if budget == "0" else "gram") and plan.rows_per_launch == MAX_GRID_Y == 65535


def test_odd_views_whose_int32_offsets_would_wrap_are_made_contiguous():
    """The kernels offset a row's features and prompt rows in int32: a view whose row spans
    2^31 elements or more is copied first (meta tensors: the strides without the memory)."""
    from zspa_kernels.triton.select import int32_offsets

    wide = torch.empty_strided((2, 4, 8), (1, 1, 2**29), device="meta")  # (8-1)·2^29 ≥ 2^31
    fixed = int32_offsets(wide)
    assert fixed is not wide and fixed.is_contiguous() and fixed.shape == wide.shape
    narrow = torch.empty_strided((2, 4, 8), (1, 2, 8), device="meta")  # a transposed view, small strides
    assert int32_offsets(narrow) is narrow and int32_offsets(None) is None


def test_a_prompt_row_past_32_bit_offsets_is_refused():
    """A per-token prompt row of more than 2^31 elements would wrap the kernels' int32 prompt
    offsets (t·D + d) even when contiguous: a clear error instead (meta tensors: no memory, no
    launch). 2^31 elements exactly end at offset 2^31 - 1: launched."""
    from zspa_kernels.triton.aot import captured_launches

    visual = torch.empty(1, 8, 4096, dtype=torch.bfloat16, device="meta")
    for relevance in ("mean", "max"):
        prompt = torch.empty(1, 2**19 + 1, 4096, dtype=torch.bfloat16, device="meta")
        with pytest.raises(ValueError, match=r"^prompt: 524289 rows of 4096 features"):
            select_tokens_triton(visual, prompt, 4, 0.5, None, None, relevance, False)
    fits = torch.empty(1, 2**19, 4096, dtype=torch.bfloat16, device="meta")
    with captured_launches() as calls:
        select_tokens_triton(visual, fits, 4, 0.5, None, None, "max", False)
    assert calls


def test_non_contiguous_visual():
    case = _case(B=2, N=30, D=40, k=8, alpha=0.5, dtype=torch.bfloat16, seed=7)
    case.visual = case.visual.transpose(1, 2).contiguous().transpose(1, 2)  # stride (N·D, 1, N)
    assert not case.visual.is_contiguous()
    _check(case)


def test_every_launch_names_its_fp_fusion():
    """Triton 3.10 turns fused multiply-adds off by default (3.9 warns when a launch leaves it
    unset): every launch of the backend passes its own choice, so the kernels' rounding does
    not change with the installed Triton."""
    from zspa_kernels.triton.aot import VARIANTS, variant_launches

    names = set()
    for variant in VARIANTS:
        for name, _, _, kwargs in variant_launches(*variant):
            names.add(name)
            assert isinstance(kwargs.get("enable_fp_fusion"), bool), (name, variant)
    assert names == {"pool_prompt", "token_stats", "gram_select"}


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_kernels_compile_without_spilling(tmp_path, arch):
    """Real compilation (Triton's bundled ptxas, no GPU needed) of every SPEC §7 plan variant,
    specialised as its launch would be, for Hopper, Ampere (the same plan, warp-level MMA) and
    Turing (no asynchronous copies: the plan's other branch): catches what the interpreter
    accepts but the compiler rejects, register spills, and a dot loop that lost its pipelining
    or its tensor cores."""
    from zspa_kernels.triton.aot import VARIANTS

    root = pathlib.Path(zspa_kernels.__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "zspa_kernels.triton.aot", "--arch", str(arch), "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    # Two launches a call, three for "mean" with a per-token prompt (its pooling first).
    assert len(records) == sum(3 if variant[7] == "mean" else 2 for variant in VARIANTS)
    for record in records:
        # A few words of spill are tolerated: token_stats' fp32 max-relevance loop (with the
        # prompt rows' scale pass) shows 20 bytes at 80 registers, not register pressure; the
        # 128-wide tiles this guards against spilled ~600 (sm_75: fp32 gram_select shows 32 with
        # lengths; 16-bit "max" statistics in 128-wide chunks ~300).
        spill_limit = 32
        if arch == 80 and record["kernel"] == "gram_select":
            # ptxas's own choice, not pressure: under the kernel's .reqntid 256 it holds two
            # variants at 128 registers (two CTAs an SM) and spills 60-72 B; without the bound
            # they take 175-192 registers and none (bench/GPU-NOTES.md, "Compiled for sm_80").
            spill_limit = 96
        assert record["registers"] <= 255 and record["spill_stores"] <= spill_limit, record
        if arch < 80:
            continue
        if record["kernel"] == "gram_select":
            # The Gram tiles' K loop is software-pipelined (asynchronous copies) and, for 16-bit
            # tokens, runs on tensor cores (wgmma on Hopper, mma.sync on Ampere). Compiled without
            # the launch's specialisation (a unit feature stride) it had neither: every load was
            # waited for.
            assert record["cp_async"] > 0, record
            tensor_core_ops = record["wgmma"] if arch >= 90 else record["mma_sync"]
            assert tensor_core_ops > 0 or record["dtype"] == "fp32", record
        if record["kernel"] == "token_stats" and record["relevance"] == "mean":
            assert record["cp_async"] > 0, record  # its D loops' chunk loads, pipelined


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    case = _case(B=4, N=300, D=256, k=32, alpha=0.5, dtype=torch.bfloat16, T=6, lengths=[300, 7, 150, 299])
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case.args()]
    eager = select_tokens_triton(*args, True)
    static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    select_tokens_triton(*static, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = select_tokens_triton(*static, True)
    for _ in range(3):  # counters must reset themselves between replays
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
    fresh = _case(B=4, N=300, D=256, k=32, alpha=0.5, dtype=torch.bfloat16, T=6, lengths=[300, 7, 150, 299], seed=9)
    static[0].copy_(fresh.visual)
    static[1].copy_(fresh.prompt)
    graph.replay()
    assert torch.equal(captured, select_tokens_triton(fresh.visual.cuda(), fresh.prompt.cuda(), *args[2:], True))


# ---- edge cases of the adversarial run (issue 11) ----------------------------------------------

@pytest.mark.parametrize("make_lengths", [
    lambda device: torch.tensor([7, 0, 2, 0, 13, 0], device=device)[::2],  # strided: the kernels must use its stride
    lambda device: torch.tensor([9], device=device).expand(3),             # expanded: stride 0, one element of storage
], ids=["strided", "expanded"])
def test_lengths_of_any_stride(make_lengths):
    lengths = make_lengths(DEVICE)  # made where the kernels run: moving it there would copy it contiguous
    assert not lengths.is_contiguous()
    case = _case(B=3, N=13, D=8, k=5, alpha=0.5, dtype=torch.float32, lengths=lengths.tolist(), seed=12)
    case.lengths = lengths
    order = _check(case)
    case.lengths = lengths.cpu()  # the reference runs on the host
    assert order.tolist() == select_tokens_reference(*case.args()).tolist()


@pytest.mark.parametrize("seed, N, D, dtype", [
    (149, 23, 33, torch.bfloat16), (204, 23, 3, torch.float32),
    # Under the interpreter a tile's dot products are numpy's matmul, whose rounding depends on the
    # kernel OpenBLAS picks for the host CPU: this seed fails with its Haswell and Zen kernels and
    # passes with SkylakeX's (OPENBLAS_CORETYPE=...). There it checks the host's BLAS, not this
    # kernel; the GPU runs it (passed on the H200).
    pytest.param(264, 23, 17, torch.float32, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="a GPU case: under the interpreter, the host BLAS decides it")),
    # 64-wide tiles on the GPU's tensor cores (wgmma on sm_90): the copy sits in tile (3, 3);
    # token 0 is the second pick, against pick 96 (tile (1, 0))
    pytest.param(5, 250, 64, torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the tensor-core tiles are the GPU's; N=23 covers the interpreter")),
])
def test_gram_is_symmetric_so_duplicates_tie_to_the_lower_index(seed, N, D, dtype):
    """The last token is a copy of token 0, in another Gram tile: the similarity of either to a
    pick must be one number, else an exact tie goes to the higher index (these seeds did, under
    the interpreter, while tile (0, 1) and tile (1, 0) computed their dot products apart)."""
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(1, N, D, generator=g)
    visual[0, N - 1] = visual[0, 0]
    case = Case(visual.to(dtype), torch.randn(1, D, generator=g).to(dtype), 12, 0.0, None, None, "mean")
    # The tie is decided only where the oracle picks token 0: a seed where it does not tests nothing
    assert all(0 in oracle_order(row) for _, row in oracle_rows(case))
    _check(case)


def _poisoned_empty(real_empty):
    """``torch.empty`` whose memory holds what a reused caching-allocator block may hold: NaN
    floats and 0x5A bytes (int32 counters of 1515870810, int64 indices far out of range)."""
    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.view(torch.uint8).fill_(0x5A).view(t.dtype)
    return empty


@pytest.mark.parametrize("path", ["gram", "stream"])
@pytest.mark.parametrize("alpha", [0.5, 0.0])  # 0.0: the isolation seed's partials are scratch too
def test_no_scratch_or_output_element_is_read_before_it_is_written(monkeypatch, path, alpha):
    """Every buffer the launcher allocates (statistics, the arrival counters, Gram, partials,
    state, the output with its -1 padding) comes from ``torch.empty``: poisoned, the picks and
    the padding must still be the oracle's, in both output layouts and with padded rows."""
    case = _case(B=3, N=37, D=20, k=24, alpha=alpha, dtype=torch.float16, T=3, relevance="mean",
                 lengths=[37, 9, 1], seed=21)
    plan = _plan(case, path=path, block_tile=16, tiles=3, block_select=16, core_block=4 if path == "gram" else 1)
    assert plan.need_isolation == (alpha == 0.0)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    order = _check(case, plan)
    assert order[1, 9:].eq(-1).all() and order[2, 1:].eq(-1).all()


def test_padding_costs_nothing_per_padded_slot():
    """k far beyond N: the kernel writes the -1 padding in 1024-wide stores, not in steps of the
    row walk's block (a walk over k = 100000 in blocks of 16 took 17 s under the interpreter;
    this bound is a fifth of that)."""
    import time

    case = _case(B=1, N=5, D=4, k=100_000, alpha=0.5, dtype=torch.float32, seed=13)
    if not triton_interpreter():
        _check(case)  # on a GPU, compile first: the bound is about the padding, not Triton's JIT
    start = time.perf_counter()
    order = _check(case)
    assert time.perf_counter() - start < 2 * 17 / 10
    assert order[0, 5:].eq(-1).all()


def test_padding_trips_count_in_int64_up_to_the_largest_k():
    """The padding loop's trip count, at k up to spec.MAX_K = 2^31 - 1 (a 16 GiB output row, so the
    count alone here; tests/test_select_tokens.py runs the whole op there on a GPU): an int32
    cdiv(k - k_b, 1024) wraps negative from k - k_b = 2^31 - 1023 and pads nothing."""
    k = torch.tensor([MAX_K, MAX_K, MAX_K, 2**31 - 1024, 2**31 - 1025, 100_000, 9, 9], dtype=torch.int32)
    k_b = torch.tensor([5, 0, MAX_K, 0, 0, 5, 9, 8], dtype=torch.int32)
    out = torch.empty(len(k), dtype=torch.int64, device=DEVICE)
    padding_trips_kernel[(len(k),)](k.to(DEVICE), k_b.to(DEVICE), out)
    assert out.cpu().tolist() == [-(-(int(a) - int(b)) // 1024) for a, b in zip(k, k_b)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter is what is switched here")
def test_interpreter_switched_after_loading_is_a_clear_error():
    root = pathlib.Path(zspa_kernels.__file__).resolve().parents[1]
    script = ("import os, torch, zspa_kernels, zspa_kernels.triton\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "try:\n"
              "    zspa_kernels.select_tokens(torch.randn(1, 5, 4), torch.randn(1, 4), 2, backend='triton')\n"
              "except RuntimeError as exc:\n"
              "    print(exc)\n")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("TRITON_INTERPRET: the Triton kernels were loaded with the interpreter off")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relevance", ["mean", "max"])
@pytest.mark.parametrize("path", ["gram", "stream"])
def test_finite_tokens_of_any_magnitude_are_normalised_without_overflow(dtype, relevance, path):
    """Every third token (and the prompt) at 1e20 (fp16: its largest values): fp32 squares of
    those overflow; the kernels scale each token by a power of two first, like the reference."""
    magnitude = 6e4 if dtype == torch.float16 else 1e20
    case = _case(B=2, N=23, D=12, k=9, alpha=[0.0, 0.5][relevance == "max"], dtype=torch.float32, T=3,
                 relevance=relevance, seed=14)
    visual = case.visual.clone()
    visual[:, ::3] = visual[:, ::3] / visual[:, ::3].abs().amax(-1, keepdim=True) * magnitude
    visual[:, 1] = visual[:, 1] * 1e-9  # and a tiny one (norm < 1e-6)
    prompt = case.prompt / case.prompt.abs().amax(-1, keepdim=True) * magnitude
    case.visual, case.prompt = visual.to(dtype), prompt.to(dtype)
    _check(case, _plan(case, path=path, block_tile=16, tiles=2, block_select=16, core_block=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiles_in_and_outside_the_raw_band_agree(dtype):
    """Gram tiles whose tokens all lie in the raw band (spec) dot the tokens as given and scale
    the result; a tile holding a token outside it scales its operands first. One call with
    both kinds: the last tile's tokens at 1e30, 1e-30 and 1e15, and its last token a copy of
    token 5 times 2**60 (exactly the same direction), whose similarities are computed by a
    scaled tile while token 5's come from raw ones."""
    case = _case(B=2, N=60, D=40, k=20, alpha=0.25, dtype=torch.float32, T=3, seed=25)
    visual = case.visual.clone()
    visual[:, 48:59] *= torch.tensor([1e30, 1e-30, 1e15]).repeat(4)[:11, None]
    visual[:, 59] = visual[:, 5] * 2.0**60
    case.visual = visual.to(dtype)
    # Token 5 is picked (6th and 15th), so its tie with the copy is decided in both rows
    assert all(5 in oracle_order(row) for _, row in oracle_rows(case))
    _check(case, _plan(case, block_tile=16, tiles=4, block_select=16, core_block=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_pooled_prompt_launch_pools_by_spec_bit_for_bit(dtype):
    """``mean`` with a per-token prompt pools it in a launch of its own (``pool_prompt``), which
    the statistics launch then reads as a one-row prompt (and only so: it refuses rows). The pool
    is spec.pool_shift's rule in row order, bit for bit: 37 rows (not a multiple of the launch's
    32-row steps), 200 features (a partial 128-wide chunk), a masked-out NaN row, a row with every
    prompt row masked, a non-finite valid row, and (bf16, fp32) finite rows near float32's limit
    whose plain sums overflow in some features."""
    from zspa_kernels.triton.token_stats import launch_token_stats, pool_prompt

    g = torch.Generator().manual_seed(5)
    B, N, D, T = 5, 19, 200, 37
    prompt = torch.randn(B, T, D, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    prompt[0, 3], mask[0, 3] = float("nan"), False  # masked out: must not poison the mean
    mask[1] = False                                  # no valid row: the mean is zero
    prompt[2, 5, 7], mask[2, 5] = float("inf"), True  # a valid non-finite row: non-finite mean
    if dtype != torch.float16:
        prompt[4, :, :50] = 3e38                     # these features' fp32 sums overflow
    prompt, mask = prompt.to(dtype), mask
    plan = launch_plan(B, N, D, dtype, 8, 0.5, False, "mean")
    pooled = pool_prompt(prompt.to(DEVICE), mask.to(DEVICE), plan).cpu()
    assert pooled.shape == (B, 1, D) and pooled.dtype == torch.float32
    assert torch.equal(pooled[1], torch.zeros(1, D))
    for b in range(B):
        torch.testing.assert_close(pooled[b, 0], row_order_pool(prompt[b], mask[b]), rtol=0, atol=0, equal_nan=True)
    if dtype != torch.float16:
        assert pooled[4, 0, :50].isfinite().all() and (pooled[4, 0, :50] > 2.9e38).all()
    out = (torch.empty(B, N, device=DEVICE), torch.empty(B, N, device=DEVICE),
           torch.empty(B, N, dtype=torch.int8, device=DEVICE), torch.empty(B, N, dtype=torch.int64, device=DEVICE),
           torch.empty(B, dtype=torch.int32, device=DEVICE))
    visual = gaussian_tokens(g, B, N, D).to(dtype).to(DEVICE)
    with pytest.raises(ValueError, match="relevance 'mean' takes one pooled row a batch row"):
        launch_token_stats(visual, prompt.to(DEVICE), mask.to(DEVICE), None, *out, "mean", plan)
