"""The csrc/ kernels' own source, run on the CPU (tests/simt), against the fp64 oracle.

CI has no GPU, so this is where the block logic of ``prompt_stats.cuh``,
``scale_rows.cuh`` (the token pass: scales, dots with the pooled prompt, and the repair
of tokens outside the raw band, ``gram_repair.cuh``) and the greedy kernels meets the
oracle: each CUDA thread is a CPU thread, with real barriers, shuffles and ballots, in
the launcher's order. The GEMM outputs the launcher would get from cuBLAS, of the tokens
as given, are built here as fp64 products rounded to fp32 (fp32 accuracy, like cuBLAS
with fp32 accumulation; inf where fp32 overflows), the Gram made exactly symmetric as
cuBLAS's is (its (i, j) and (j, i) entries sum the same exact products in the same
order); the entries of tokens outside the raw band are NaN before the token pass, so
that one it failed to repair cannot pass unseen. Blocks of 32 threads give each thread several
tokens and the ascending scan several rounds; 128 threads leave threads idle.
Rows go through the greedy kernel in chunks of two, like the launcher's Gram chunks.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (DTYPES, TOLERANCE, Case, banded_tokens, exact_tie_case, one_feature_case, oracle_rows,
                     random_case, row_order_pool)
from fp64_oracle import oracle_order, replay

from zspa_kernels import spec
from zspa_kernels.builder import CUDA_EXTENSION
from zspa_kernels.spec import SCALE_EXP_MAX, SCALE_EXP_MIN

HERE = Path(__file__).parent
THREADS = (32, 128)
# greedy_select's core, as (rank_core_budget, radix_core): k_core serial argmins; every token's
# rank counted at once; a radix select (rows of kRadixMinTokens = 256 or more, else serial); and
# the launcher's choice by the row's size (kRankCoreBudget = 512, radix where ranks cost more).
SERIAL_CORE, ALWAYS_RANKS, RADIX_CORE, LAUNCHER = (0, False), (1 << 30, False), (0, True), (512, True)
CORE_PATHS = {"serial-core": SERIAL_CORE, "rank-core": ALWAYS_RANKS, "radix-core": RADIX_CORE}
RADIX_MIN_TOKENS = 256
RAW_EXP_MIN, RAW_EXP_MAX = -32, 48  # gram_repair.cuh's raw band: amax = m * 2^e, m in [0.5, 1), e in it


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++20 compiler")
    lib = tmp_path_factory.mktemp("simt") / "libzspa_simt.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                    f"-I{CUDA_EXTENSION.source_dir()}", "-o", str(lib), str(HERE / "simt" / "emulate.cpp")],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _ptr(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def expected_scales(x):
    """spec's power-of-two scale of each row's largest finite |x| (torch ops, independent of csrc/)."""
    amax = torch.nan_to_num(x.abs(), 0.0, 0.0, 0.0).amax(-1).float()
    return torch.exp2(-torch.frexp(amax).exponent.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX).float())


def expected_raw_scales(x):
    """gram_repair.cuh's token scales: 1 in the raw band (and for zero rows), else spec's scale."""
    amax = torch.nan_to_num(x.abs(), 0.0, 0.0, 0.0).amax(-1).float()
    e = torch.frexp(amax).exponent
    in_band = (amax == 0) | ((e >= RAW_EXP_MIN) & (e <= RAW_EXP_MAX))
    return torch.where(in_band, torch.ones_like(amax), expected_scales(x))


def emulated_scale_rows(emulator, x):
    """scale_rows.cuh's prompt-row pass on ``x`` (B, L, D) as fp32 values: (scaled copy, scales)."""
    flat = np.ascontiguousarray(x.float().reshape(-1, x.shape[-1]).numpy())
    scaled, scales = np.empty_like(flat), np.empty(flat.shape[0], dtype=np.float32)
    emulator.emulate_scale_rows(_ptr(flat), _ptr(scaled), _ptr(scales), ctypes.c_int64(flat.shape[0]), flat.shape[1],
                                64)  # two warps: the block-wide max crosses warps
    return torch.from_numpy(scaled).reshape(x.shape), torch.from_numpy(scales).reshape(x.shape[:-1])


def raw_gram(visual):
    """The launcher's Gram GEMM of the tokens as given: fp64 products rounded to fp32 (inf where
    fp32 overflows), exactly symmetric; the entries of tokens outside the raw band NaN, as the
    token pass must rewrite every one of them."""
    v = visual.double()
    gram = v @ v.transpose(1, 2)
    gram = ((gram + gram.transpose(1, 2)) / 2).float()
    outside = expected_raw_scales(visual) != 1
    gram[outside.unsqueeze(-1).expand_as(gram)] = float("nan")
    gram.transpose(1, 2)[outside.unsqueeze(-1).expand_as(gram)] = float("nan")
    return np.ascontiguousarray(gram.numpy())


def emulated_token_pass(emulator, visual, scale, pooled, top, corner, h, prompt=None, prompt_dots=None):
    """scale_rows.cuh's token pass over ``visual`` (B, N, D): (scales, dots with ``pooled``), None
    for what was not asked (no ``scale``: fp16; no ``pooled``: "max"); ``top``/``corner`` (the
    Gram, gram_view.cuh) and ``prompt_dots`` (B, N, T) with the scaled ``prompt`` rows ("max")
    are repaired in place."""
    B, N, D = visual.shape
    x = np.ascontiguousarray(visual.float().numpy())
    scales = np.empty((B, N), dtype=np.float32) if scale else None
    dots = np.empty((B, N), dtype=np.float32) if pooled is not None else None
    q = None if pooled is None else np.ascontiguousarray(pooled, dtype=np.float32)
    p = None if prompt is None else np.ascontiguousarray(prompt.float().numpy())
    T = 0 if prompt is None else prompt.shape[1]
    emulator.emulate_token_pass(_ptr(x), _ptr(scales), _ptr(q), _ptr(dots), _ptr(top), _ptr(corner), h, _ptr(p),
                                _ptr(prompt_dots), B, N, T, D, 64)  # two warps: block-wide reductions cross warps
    return scales, dots


def cluster_split(N, ctas):
    """greedy_cluster.cuh's split of N tokens over at most ``ctas`` CTAs, as its launcher plans
    it (cluster_shape): ``(ctas, slice, threads)``, fewer CTAs where the last would hold none."""
    while True:
        slice_ = (-(-N // ctas) + 3) // 4 * 4
        if (ctas - 1) * slice_ < N:
            return ctas, slice_, (slice_ + 31) // 32 * 32
        ctas -= 1


def split_gram(gram, split):
    """The launcher's Gram operands (gram_view.cuh): ``(top, corner, h)``, whole (h = N, no
    corner) or split at h = N/2 rounded down to a multiple of 4 (whole below N = 8)."""
    N = gram.shape[-1]
    h = N // 2 // 4 * 4 if split else 0
    if h == 0:
        return gram, None, N
    return np.ascontiguousarray(gram[:, :h]), np.ascontiguousarray(gram[:, h:, h:]), h


def emulated_select(emulator, case, pick_order, threads, core=LAUNCHER, cluster=None, split=False):
    """What the launcher does, with the GEMMs done here in fp64 and rounded to fp32. ``cluster``:
    run greedy_cluster.cuh on clusters of (at most) that many CTAs instead of greedy_select;
    ``split``: the Gram as its top rows and bottom-right block."""
    visual, prompt = case.visual, case.prompt if case.prompt.dim() == 3 else case.prompt.unsqueeze(1)
    scale = visual.dtype != torch.float16  # the launcher scales bf16/fp32 tokens (and "max" prompts)
    max_relevance = case.relevance == "max"
    prompt_scale = None
    if scale and max_relevance:
        scaled, prompt_scale = emulated_scale_rows(emulator, prompt)
        prompt = scaled.to(prompt.dtype)  # exact: bf16 values times powers of two
    B, N, D = visual.shape
    T = prompt.shape[1]
    raw_prompt = np.ascontiguousarray(prompt.float().numpy())
    mask = None if case.prompt_mask is None else np.ascontiguousarray(case.prompt_mask.numpy())
    lengths = None if case.lengths is None else np.ascontiguousarray(case.lengths.long().numpy())
    pooled = np.zeros((B, D), dtype=np.float32)
    prompt_norm = np.zeros((B, T), dtype=np.float32)
    emulator.emulate_prompt_stats(_ptr(raw_prompt), _ptr(mask), _ptr(pooled), _ptr(prompt_norm),
                                  _ptr(None if prompt_scale is None else np.ascontiguousarray(prompt_scale.numpy())),
                                  B, T, D, ctypes.c_bool(max_relevance), threads)
    # The GEMMs of the tokens as given, then the token pass: scales (bf16/fp32), dots with the
    # pooled prompt ("mean"), the repair of tokens outside the raw band.
    dots = None
    if max_relevance:
        dots = (visual.double() @ prompt.double().transpose(1, 2)).float()
        dots[expected_raw_scales(visual) != 1] = float("nan")  # rows the token pass rewrites (never fp16's)
        dots = np.ascontiguousarray(dots.numpy())
    top, corner, h = split_gram(raw_gram(visual), split)  # fp16 tokens are all in the band
    token_scale = None
    if scale or not max_relevance:
        token_scale, mean_dots = emulated_token_pass(emulator, visual, scale, None if max_relevance else pooled,
                                                     top, corner, h, prompt if max_relevance and scale else None,
                                                     dots if max_relevance and scale else None)
        if not max_relevance:
            dots = mean_dots
    out = np.full((B, case.k), -7, dtype=np.int64)
    if cluster is not None:
        ctas, slice_, cluster_threads = cluster_split(N, cluster)
        emulator.emulate_greedy_cluster(_ptr(top), _ptr(corner), h, _ptr(dots), _ptr(prompt_norm), _ptr(mask), _ptr(lengths),
                                        _ptr(token_scale), _ptr(out), B, N, T, case.k,
                                        ctypes.c_double(case.core_ratio), ctypes.c_bool(max_relevance),
                                        ctypes.c_bool(pick_order), ctas, slice_, cluster_threads, 2)
        return out
    emulator.emulate_greedy_select(_ptr(top), _ptr(corner), h, _ptr(dots), _ptr(prompt_norm), _ptr(mask), _ptr(lengths),
                                   _ptr(token_scale), _ptr(out), B, N, T, case.k, ctypes.c_double(case.core_ratio),
                                   ctypes.c_bool(max_relevance), ctypes.c_bool(pick_order), threads,
                                   2, core[0], ctypes.c_bool(core[1]))  # Gram chunks of 2 rows
    return out


@pytest.mark.parametrize("seed", range(48))
def test_random_cases_replay_against_fp64(emulator, seed):
    # Each seed also picks the dtype and the block size (CPU threads are slow to sync).
    # ... the core's path: serial argmins, ranks, or the launcher's choice; and a whole or split Gram.
    dtype, threads = DTYPES[seed % len(DTYPES)], THREADS[seed % len(THREADS)]
    core, split = (SERIAL_CORE, ALWAYS_RANKS, LAUNCHER)[seed % 3], seed % 4 >= 2
    case = random_case(seed, dtype)
    order = emulated_select(emulator, case, pick_order=True, threads=threads, core=core, split=split)
    kept = emulated_select(emulator, case, pick_order=False, threads=threads, core=core, split=split)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][dtype])
        assert kept[b].tolist() == sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b), case.describe()


@pytest.mark.parametrize("core", CORE_PATHS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("seed", range(6))
def test_exact_ties_go_to_lower_index(emulator, seed, threads, core):
    case = exact_tie_case(seed, torch.bfloat16)
    order = emulated_select(emulator, case, pick_order=True, threads=threads, core=CORE_PATHS[core])
    for b, row in oracle_rows(case):
        assert order[b].tolist() == oracle_order(row), case.describe()


@pytest.mark.parametrize("seed", range(6))
def test_one_feature_ties_go_to_lower_index(emulator, seed):
    """Every cosine +-1 or 0 exactly: ties between distinct tokens, in both greedy kernels."""
    case = one_feature_case(seed, DTYPES[seed % len(DTYPES)])
    expected = [oracle_order(row) for _, row in oracle_rows(case)]
    for cluster in (None, 2):
        order = emulated_select(emulator, case, pick_order=True, threads=32, core=LAUNCHER, cluster=cluster)
        assert order.tolist() == expected, (cluster, case.describe())


@pytest.mark.parametrize("relevance", ["mean", "max"])
def test_nonfinite_prompt_rows(emulator, relevance):
    """A NaN in a masked-out prompt row changes nothing; in a valid row it zeroes the
    prompt ("mean") or that row's cosines ("max")."""
    base = random_case(11, torch.float32)
    g = torch.Generator().manual_seed(5)
    B, N, D = 2, 40, 16
    base.visual = torch.randn(B, N, D, generator=g)
    base.prompt = torch.randn(B, 4, D, generator=g)
    base.prompt[0, 2, 3] = float("nan")  # row 0: masked out below
    base.prompt[1, 1, 0] = float("inf")  # row 1: valid
    base.prompt_mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    base.k, base.core_ratio, base.lengths, base.relevance = 12, 0.5, None, relevance
    order = emulated_select(emulator, base, pick_order=True, threads=32)
    for b, row in oracle_rows(base):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relevance", ["mean", "max"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_finite_tokens_of_any_magnitude_are_normalised_without_overflow(emulator, dtype, relevance, split):
    """Every third token and the prompt at 1e20 (fp16: 6e4), one token of norm < 1e-6 (in the raw
    band), one at 1e-30 (below it), two at the band's top edge (largest |x| just under 2^48, and
    2^48); on both greedy kernels, whole and split Grams."""
    magnitude = 6e4 if dtype == torch.float16 else 1e20
    case = random_case(21, torch.float32)
    g = torch.Generator().manual_seed(21)
    visual = torch.randn(2, 23, 12, generator=g)
    visual[:, ::3] = visual[:, ::3] / visual[:, ::3].abs().amax(-1, keepdim=True) * magnitude
    visual[:, 1] *= 1e-9
    if dtype != torch.float16:
        visual[:, 2] *= 1e-30
        for i, top in ((4, 2.0**48 * (1 - 2.0**-7)), (5, 2.0**48)):  # bf16-exact edges
            visual[:, i] = visual[:, i] / visual[:, i].abs().amax(-1, keepdim=True) * top
    prompt = torch.randn(2, 3, 12, generator=g)
    prompt = prompt / prompt.abs().amax(-1, keepdim=True) * magnitude
    case.visual, case.prompt, case.prompt_mask, case.lengths = visual.to(dtype), prompt.to(dtype), None, None
    case.k, case.core_ratio, case.relevance = 9, [0.0, 0.5][relevance == "max"], relevance
    outside = int((expected_raw_scales(case.visual) != 1).sum())
    assert outside == (0 if dtype == torch.float16 else 2 * 10)  # 8 huge, the tiny one, the edge's outer side
    order = emulated_select(emulator, case, pick_order=True, threads=32, split=split)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][dtype])
    assert order.tolist() == emulated_select(emulator, case, pick_order=True, threads=32, cluster=3,
                                             split=split).tolist()


def test_spec_rules_match_zspa_kernels_spec(emulator):
    """csrc/spec.cuh against zspa_kernels/spec.py: k_core on every budget up to 300 for alphas
    on and around the .5 boundaries, the power-of-two scale, the constants."""
    emulator.emulate_core_count.restype = ctypes.c_int
    emulator.emulate_pow2_scale.restype = ctypes.c_float
    emulator.emulate_constant.restype = ctypes.c_float
    alphas = [0.0, 1.0, 0.5, 0.1, 0.3, 1 / 3, 0.49999999999999994, 0.5000000000000001, 0.04545454545454545,
              15 / 194, 1 / 128, 1 / 129]
    for alpha in alphas:
        got = [emulator.emulate_core_count(ctypes.c_double(alpha), k_b) for k_b in range(301)]
        assert got == [spec.core_count(alpha, k_b) for k_b in range(301)], alpha
    emulator.emulate_raw_scale.restype = ctypes.c_float
    edges = [2.0**-33 * (1 - 2.0**-24), 2.0**-33, 2.0**48 * (1 - 2.0**-24), 2.0**48]  # the raw band's edges
    for amax in [0.0, 1e-45, 1e-40, 2.0**-126, 1e-6, 0.5, 1.0, 3.0, 1e20, 2.0**126, 3.4e38] + edges:
        x = torch.tensor([amax], dtype=torch.float32)
        expected = float(torch.exp2(-torch.frexp(x).exponent.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX).float()))
        assert emulator.emulate_pow2_scale(ctypes.c_float(float(x))) == expected == float(expected_scales(x)), amax
        in_band = amax == 0 or 2.0**-33 <= float(x) < 2.0**48
        assert emulator.emulate_raw_scale(ctypes.c_float(float(x))) == (1.0 if in_band else expected), amax
        assert float(expected_raw_scales(x)) == (1.0 if in_band else expected), amax
    constants = [spec.NORM_EPS, spec.NONFINITE_RELEVANCE, spec.NONFINITE_SIMILARITY, SCALE_EXP_MIN, SCALE_EXP_MAX,
                 LAUNCHER[0], RADIX_MIN_TOKENS, RAW_EXP_MIN, RAW_EXP_MAX]
    assert [emulator.emulate_constant(i) for i in range(9)] == [float(torch.tensor(c, dtype=torch.float32))
                                                                 for c in constants]


@pytest.mark.parametrize("D", [45, 48], ids=["D45-scalar", "D48-packed"])
def test_scale_rows_scales_every_row_by_the_power_of_two_of_its_largest_finite_value(emulator, D):
    """scale_rows.cuh's prompt-row pass against spec's rule: rows of any magnitude (1e-40 to
    3e38), zeros, NaN and inf (which count as 0 for the scale and stay NaN/inf), D not a
    multiple of 32, and more rows than one block's warps."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, D, generator=g) * torch.logspace(-40, 38, 35).reshape(5, 7, 1)
    x[0, 0] = 0.0
    x[1, 2, 3], x[2, 4, D - 1], x[3, 1, 0] = float("nan"), float("inf"), float("-inf")
    x[4, 6] = float("nan")
    scaled, scale = emulated_scale_rows(emulator, x)
    assert torch.equal(scale, expected_scales(x))
    torch.testing.assert_close(scaled, x * scale.unsqueeze(-1), rtol=0, atol=0, equal_nan=True)
    amax = torch.nan_to_num(x.abs(), 0.0, 0.0, 0.0).amax(-1)
    unclamped = (amax >= 2.0**SCALE_EXP_MIN) & (amax < 2.0**SCALE_EXP_MAX)
    top = torch.nan_to_num(scaled.abs(), 0.0, 0.0, 0.0).amax(-1)[unclamped]
    assert unclamped.sum() > 20 and bool(((top >= 0.5) & (top < 1.0)).all())  # such rows land in [0.5, 1)


@pytest.mark.parametrize("D", [45, 48], ids=["D45-scalar", "D48-packed"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_prompt_stats_pools_each_feature_over_its_valid_rows_in_row_order(emulator, D, masked):
    """prompt_stats.cuh's pooling ("mean"): each feature's valid rows summed in row order in fp32,
    divided by their count (spec.pool_shift's scaled sum where that overflows), then scaled by the
    power of two of the largest finite |mean|; T = 21 (not a multiple of the 8-row batches), a
    masked-out NaN row, a row with every prompt row masked (zeros, norm 0), an inf in a valid row,
    finite rows near float32's limit whose plain sums overflow in some features (one beside a NaN
    in a valid row, which the scaled sum must not hide), and fewer threads than features."""
    g = torch.Generator().manual_seed(11)
    B, T = 5, 21
    prompt = torch.randn(B, T, D, generator=g) * torch.logspace(-3, 3, T).reshape(1, T, 1)
    mask = torch.rand(B, T, generator=g) < 0.6 if masked else torch.ones(B, T, dtype=torch.bool)
    if masked:
        prompt[0, 4], mask[0, 4] = float("nan"), False
        mask[1] = False
    prompt[2, 7, 3], mask[2, 7] = float("inf"), True
    prompt[4, :, : D // 2] = 3e38 * torch.sign(prompt[4, :, : D // 2]).abs()  # positive: these features overflow
    prompt[4, :, D // 2] = -3.4e38
    prompt[4, 9, 1], mask[4, 9] = float("nan"), True
    x = np.ascontiguousarray(prompt.numpy())
    pooled, norm = np.zeros((B, D), dtype=np.float32), np.zeros((B, T), dtype=np.float32)
    emulator.emulate_prompt_stats(_ptr(x), _ptr(np.ascontiguousarray(mask.numpy()) if masked else None), _ptr(pooled),
                                  _ptr(norm), _ptr(None), B, T, D, ctypes.c_bool(False), 32)
    for b in range(B):
        count = int(mask[b].sum())
        mean = row_order_pool(prompt[b], mask[b])
        s = expected_scales(mean.reshape(1, 1, D)).reshape(())
        # a masked row adds +0.0 (a -0.0 sum becomes +0.0): compare as values, NaN where NaN
        torch.testing.assert_close(torch.from_numpy(pooled[b]), mean * s, rtol=0, atol=0, equal_nan=True)
        if count == 0:
            assert norm[b, 0] == 0.0 and not pooled[b].any()
    with np.errstate(over="ignore"):
        plain = x[4][mask[4].numpy()].astype(np.float32).sum(0)
    overflowed = ~np.isfinite(plain) & np.isfinite(x[4]).all(0)
    assert overflowed.sum() >= D // 2 - 1 and np.isfinite(pooled[4][overflowed]).all()
    assert np.isnan(pooled[4, 1])  # a NaN in a valid row stays NaN (the prompt then acts as zero)


def test_pool_shift_and_pooled_feature_match_spec(emulator):
    """spec.cuh's pool_shift against spec.pool_shift, and its pooled_feature on every branch: a
    finite mean as is, an overflowed one from the scaled mean, saturated where only the scaling
    back overflows, and NaN or inf where the scaled mean is."""
    for T in list(range(1, 4100)) + [2**20 - 1, 2**20, 2**23, 2**31 - 1]:
        assert emulator.emulate_pool_shift(T) == spec.pool_shift(T), T
    emulator.emulate_pooled_feature.restype = ctypes.c_float
    largest = float(np.finfo(np.float32).max)
    cases = [(1.5, 7.0, 8.0, 1.5), (float("inf"), 3e37, 8.0, float(np.float32(3e37) * np.float32(8))),
             (float("-inf"), -largest / 4, 8.0, -largest), (float("inf"), largest / 4, 8.0, largest),
             (float("nan"), float("nan"), 8.0, float("nan")), (float("inf"), float("inf"), 8.0, float("inf"))]
    for mean, mean_down, up, expected in cases:
        got = emulator.emulate_pooled_feature(ctypes.c_float(mean), ctypes.c_float(mean_down), ctypes.c_float(up))
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (mean, mean_down, up)


def mixed_magnitudes(B, N, D, seed):
    """helpers.banded_tokens (in and outside the raw band, two duplicates of an outside one),
    with a zero token, a NaN and an inf."""
    x = banded_tokens(torch.Generator().manual_seed(seed), B, N, D)
    x[:, 2] = 0.0
    x[0, 5, 1], x[1, 7, 0] = float("nan"), float("inf")
    return x


@pytest.mark.parametrize("D", [70, 72], ids=["D70-scalar", "D72-packed"])  # 16-byte packs of 4 fp32 need D % 4 == 0
@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "fp16-unscaled"])
def test_token_pass_dots_each_row_with_its_batch_rows_pooled_prompt(emulator, scale, D):
    """The token pass's dots ("mean" relevance): each token, times its raw_scale (bf16/fp32; as
    given for fp16), against the pooled vector of its own batch row, to fp32 accuracy of an fp64
    dot; the scales are gram_repair.cuh's, in the band and outside it."""
    B, N = 3, 11
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(8)) * torch.logspace(-3, 3, 3).reshape(3, 1, 1)
    if scale:
        x[0, 3] *= 1e30
        x[1, 4] *= 1e-30
    pooled = torch.randn(B, D, generator=torch.Generator().manual_seed(9)).numpy()
    top, corner, h = split_gram(raw_gram(x), False)
    scales, dots = emulated_token_pass(emulator, x, scale, pooled, top, corner, h)
    if scale:
        assert torch.equal(torch.from_numpy(scales), expected_raw_scales(x))
        assert int((torch.from_numpy(scales) != 1).sum()) == 2
        rows = x.double() * torch.from_numpy(scales).double().unsqueeze(-1)
    else:
        assert scales is None
        rows = x.double()
    expected = torch.einsum("bnd,bd->bn", rows, torch.from_numpy(pooled).double())
    torch.testing.assert_close(torch.from_numpy(dots).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("D", [45, 48], ids=["D45", "D48"])
def test_token_pass_repairs_every_gram_entry_of_tokens_outside_the_raw_band(emulator, split, D):
    """After the token pass, the Gram holds (c_i x_i) . (c_j x_j) for every pair (c: the tokens'
    scales): the entries of two tokens in the band exactly as the GEMM left them, every entry of
    a token outside it (NaN before the pass) rewritten to fp32 accuracy, bit-for-bit symmetric
    (two outside tokens' CTAs write the same bits), and NaN again only where a token holds one;
    "max" dots of outside tokens likewise, with the scaled prompt rows."""
    B, N, T = 2, 22, 3
    x = mixed_magnitudes(B, N, D, seed=D)
    prompt = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    gram = raw_gram(x)
    top, corner, h = split_gram(gram.copy(), split)
    assert h == (8 if split else N)
    raw_dots = (x.double() @ prompt.double().transpose(1, 2)).float()
    outside = expected_raw_scales(x) != 1
    assert int(outside.sum()) == 2 * 11  # 1e-30, 1e15, 1e-12, 1e30 twice or thrice a row, one more duplicate
    raw_dots[outside] = float("nan")
    prompt_dots = np.ascontiguousarray(raw_dots.numpy())
    scales, dots = emulated_token_pass(emulator, x, True, None, top, corner, h, prompt, prompt_dots)
    assert dots is None and torch.equal(torch.from_numpy(scales), expected_raw_scales(x))
    if split:  # the whole Gram back from its stored blocks (the lower-left block is the top rows' transpose)
        whole = np.empty((B, N, N), dtype=np.float32)
        whole[:, :h] = top
        whole[:, h:, :h] = top[:, :, h:].transpose(0, 2, 1)
        whole[:, h:, h:] = corner
    else:
        whole = top
    got = torch.from_numpy(whole)
    assert torch.equal(got.nan_to_num(7.0), got.transpose(1, 2).nan_to_num(7.0))  # symmetric, bit for bit
    c = torch.from_numpy(scales).double()
    v = x.double() * c.unsqueeze(-1)
    expected = (v @ v.transpose(1, 2)).float()
    nonfinite = ~x.isfinite().all(-1)
    pair_nonfinite = nonfinite.unsqueeze(-1) | nonfinite.unsqueeze(-2)
    touched = outside.unsqueeze(-1) | outside.unsqueeze(-2)
    assert torch.equal(got.isnan() & ~pair_nonfinite, torch.zeros_like(touched))  # no NaN left but a token's own
    in_band = ~touched & ~pair_nonfinite
    assert torch.equal(got[in_band], torch.from_numpy(gram)[in_band])  # the GEMM's entries, untouched
    norms = v.norm(dim=-1).clamp_min(1e-6)  # a zero token's entries are 0 both ways
    scale_of = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    repaired = touched & ~pair_nonfinite
    assert repaired.sum() > 300
    torch.testing.assert_close(got[repaired].double() / scale_of[repaired],
                               expected[repaired].double() / scale_of[repaired], rtol=0, atol=2e-6)  # as cosines
    expected_dots = (v @ prompt.double().transpose(1, 2)).float()
    got_dots = torch.from_numpy(prompt_dots)
    assert torch.equal(got_dots[~outside].nan_to_num(7.0), raw_dots[~outside].nan_to_num(7.0))  # NaN: a token's own
    rows = outside & ~nonfinite
    torch.testing.assert_close(got_dots[rows].double() / norms[rows].unsqueeze(-1),
                               expected_dots[rows].double() / norms[rows].unsqueeze(-1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("threads", THREADS)
def test_core_by_ranks_picks_what_serial_argmins_pick(emulator, threads):
    """Both ways of finding the core give the same picks in the same order, bit for bit: over
    random cases (lengths, masks, both relevances, all dtypes), ties of relevance between
    duplicated tokens, non-finite tokens (relevance -2), and a core as large as the row."""
    cases = [random_case(seed, DTYPES[seed % len(DTYPES)]) for seed in range(100, 112)]
    cases += [exact_tie_case(seed, torch.bfloat16) for seed in range(3)]
    full = random_case(7, torch.float32)
    full.k, full.core_ratio, full.lengths = full.visual.shape[1], 1.0, None  # every token in the core
    nonfinite = random_case(9, torch.float32)
    nonfinite.visual[:, 1, 0], nonfinite.visual[:, 4, 2] = float("nan"), float("inf")
    nonfinite.core_ratio = 1.0
    for case in cases + [full, nonfinite]:
        serial = emulated_select(emulator, case, pick_order=True, threads=threads, core=SERIAL_CORE)
        ranks = emulated_select(emulator, case, pick_order=True, threads=threads, core=ALWAYS_RANKS)
        assert serial.tolist() == ranks.tolist(), case.describe()


def long_case(seed, dtype=torch.float32):
    """Rows of RADIX_MIN_TOKENS or more, where the launcher finds large cores by a radix select:
    exact duplicates (ties of relevance that only the index breaks, so the select's index
    passes decide), non-finite tokens, rows shortened by lengths (one to 5 tokens: the select
    still runs over the padded row's budget), cores of 2 to 64 tokens, the whole row's when short."""
    g = torch.Generator().manual_seed(seed)
    B, N, D = 2, (256, 301, 300)[seed % 3], 12
    if seed % 2:  # +-1 patterns: every cosine a multiple of 1/12, exact in any dtype
        patterns = torch.randint(0, 2, (7, D), generator=g).float() * 2 - 1
        visual = patterns[torch.randint(0, 7, (B, N), generator=g)]
    else:
        distinct = torch.randn(B, N // 3, D, generator=g)
        visual = distinct[:, torch.randint(0, N // 3, (N,), generator=g)]
        visual[1, 7, 3], visual[1, 40, 0] = float("nan"), float("inf")
    prompt = torch.randn(B, 3, D, generator=g)
    k, core_ratio = ((40, 0.5), (64, 1.0), (48, 0.25), (4, 0.5))[seed % 4]
    lengths = torch.tensor([N, 5]) if seed % 3 == 1 else None
    return Case(visual.to(dtype), prompt.to(dtype), k, core_ratio, lengths, None, "max")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("seed", range(8))
def test_core_by_radix_select_picks_what_serial_argmins_pick(emulator, seed, threads):
    """The radix select (with its ranks among the core, and the norms it recomputes) against the
    serial argmins on long rows, bit for bit, and the fp64 oracle's replay. Copies of random
    vectors tie exactly in fp64 (cosine 1 to a kept twin) but not in fp32 across different
    vectors, so there only ties between identical tokens must go to the lower index."""
    # fp16 with "max" relevance: the launcher then runs no per-token scaling pass, whose emulation
    # (a block of CPU threads per token) would cost seconds at this length; one case is fp32 "mean".
    case = long_case(seed, torch.float16)
    if seed == 0:
        case.visual, case.prompt, case.relevance = case.visual.float(), case.prompt[:, 0].float(), "mean"
    radix = emulated_select(emulator, case, pick_order=True, threads=threads, core=RADIX_CORE)
    serial = emulated_select(emulator, case, pick_order=True, threads=threads, core=SERIAL_CORE)
    assert radix.tolist() == serial.tolist(), case.describe()
    for b, row in oracle_rows(case):
        replay(row, radix[b].tolist(), TOLERANCE["cuda"][case.visual.dtype],
               exact_ties="scores" if seed % 2 else "tokens")


# greedy_cluster.cuh on clusters of (at most) these many CTAs: one CTA (no remote stores), and
# clusters whose last CTA holds a partial slice.
CLUSTERS = (1, 2, 3, 5)


@pytest.mark.parametrize("seed", range(24))
def test_cluster_kernel_replays_and_picks_what_the_block_kernel_picks(emulator, seed):
    """The cluster form against the fp64 oracle, and bit for bit against greedy_select.cuh (the
    same Gram entries in the same expression): random cases with odd N (4-byte copies) and
    N % 4 == 0 (16-byte copies), whole and split Grams (the lower-left block copied a column at
    a time), lengths, masks, both relevances, empty cores (isolation seed) and full ones; the
    ascending output is the sorted pick order."""
    dtype, ctas, split = DTYPES[seed % len(DTYPES)], CLUSTERS[seed % len(CLUSTERS)], seed % 8 >= 4
    case = random_case(300 + seed, dtype)
    order = emulated_select(emulator, case, pick_order=True, threads=32, cluster=ctas, split=split)
    kept = emulated_select(emulator, case, pick_order=False, threads=32, cluster=ctas, split=split)
    block = emulated_select(emulator, case, pick_order=True, threads=32)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][dtype])
        assert kept[b].tolist() == sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b), case.describe()
    assert order.tolist() == block.tolist(), case.describe()


@pytest.mark.parametrize("seed", range(6))
def test_cluster_kernel_exact_ties_go_to_lower_index(emulator, seed):
    """Exact ties across CTAs: the slots' keys carry the index, so the lower one wins whichever
    CTA holds it."""
    case = exact_tie_case(seed, torch.bfloat16)
    order = emulated_select(emulator, case, pick_order=True, threads=32, cluster=CLUSTERS[1 + seed % 3])
    for b, row in oracle_rows(case):
        assert order[b].tolist() == oracle_order(row), case.describe()


@pytest.mark.parametrize("core_ratio", [0.0, 0.5, 1.0])
def test_cluster_kernel_nonfinite_tokens_come_last(emulator, core_ratio):
    """NaN and inf tokens in several CTAs' slices: least relevant, most redundant, picked only
    when nothing finite is left, lowest index first; a zero token has cosine 0 to all."""
    case = random_case(9, torch.float32)
    g = torch.Generator().manual_seed(4)
    case.visual = torch.randn(2, 30, 12, generator=g)
    case.visual[:, 1, 0], case.visual[:, 17, 2], case.visual[:, 29, 5] = float("nan"), float("inf"), float("-inf")
    case.visual[:, 8] = 0.0
    case.prompt, case.prompt_mask, case.lengths, case.relevance = torch.randn(2, 12, generator=g), None, None, "mean"
    case.k, case.core_ratio = 30, core_ratio
    order = emulated_select(emulator, case, pick_order=True, threads=32, cluster=3)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][torch.float32])
        assert order[b, -3:].tolist() == [1, 17, 29]
    assert order.tolist() == emulated_select(emulator, case, pick_order=True, threads=32).tolist()


def test_cluster_shape_is_the_fewest_ctas_whose_shared_memory_holds_the_gram(emulator):
    """The launcher's plan at an H100/H200's 227 KiB a CTA: LLaVA-1.5's 576 tokens on 6 CTAs of 96,
    small rows on one CTA, none past ~950 tokens; every plan fits, and one CTA fewer would not."""
    limit, static = 232448, 2176  # the sm_90 build's static shared memory (cuobjdump), reserved 1 KiB included

    def plan(N):
        shape = (ctypes.c_int * 3)()
        emulator.emulate_cluster_shape(ctypes.c_int64(N), ctypes.c_int64(limit), ctypes.c_int64(static), shape)
        return tuple(shape)

    def fits(N, ctas):
        ctas, slice_, threads = cluster_split(N, ctas)
        return 4 * (slice_ * N + 3 * N) + static <= limit and ctas * threads // 32 <= 64

    assert plan(576) == (6, 96, 96)
    assert plan(200) == (1, 200, 224)
    assert plan(1500) == (0, 0, 0)
    largest = max(N for N in range(1, 1200) if plan(N)[0])
    assert 900 < largest < 1000 and all(plan(N)[0] for N in range(1, largest + 1))
    for N in [1, 7, 64, 237, 238, 577, 700, 901, largest]:
        ctas, slice_, threads = plan(N)
        assert (ctas, slice_, threads) == cluster_split(N, ctas) and fits(N, ctas), N
        assert ctas == 1 or not fits(N, ctas - 1), N


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("seed", range(10))
def test_split_gram_picks_what_the_whole_gram_picks(emulator, seed, threads):
    """The Gram as top rows and bottom-right block (entries of the lower-left block read
    transposed from the top rows) against the whole Gram, bit for bit (the Gram here is exactly
    symmetric, as its split form makes it on the GPU), for every core path, the isolation seed
    and the cluster kernel; long rows take the radix core."""
    case = long_case(seed, torch.float16) if seed >= 8 else random_case(500 + seed, DTYPES[seed % len(DTYPES)])
    core = (SERIAL_CORE, ALWAYS_RANKS, LAUNCHER)[seed % 3]
    whole = emulated_select(emulator, case, pick_order=True, threads=threads, core=core)
    split = emulated_select(emulator, case, pick_order=True, threads=threads, core=core, split=True)
    assert split.tolist() == whole.tolist(), case.describe()
    if seed < 4:
        clustered = emulated_select(emulator, case, pick_order=True, threads=32, cluster=3, split=True)
        assert clustered.tolist() == whole.tolist(), case.describe()


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_cluster_kernel_at_the_llava_plan(emulator, split):
    """The geometry the launcher plans for LLaVA-1.5 on an sm_90 GPU (6 CTAs of 96 tokens, 3 warps
    each: 18 slots a step), with its budget (64 of 576, core 32), against the block kernel."""
    g = torch.Generator().manual_seed(576)
    case = random_case(1, torch.bfloat16)
    case.visual = (torch.randn(1, 576, 16, generator=g) * torch.rand(1, 576, 1, generator=g).add(0.5)).bfloat16()
    case.prompt, case.prompt_mask, case.lengths = torch.randn(1, 16, generator=g).bfloat16(), None, None
    case.k, case.core_ratio, case.relevance = 64, 0.5, "mean"
    assert cluster_split(576, 6) == (6, 96, 96)
    order = emulated_select(emulator, case, pick_order=True, threads=32, cluster=6, split=split)
    assert order.tolist() == emulated_select(emulator, case, pick_order=True, threads=128).tolist()
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][torch.bfloat16])
