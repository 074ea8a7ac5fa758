"""The csrc/ kernels' own source, run on the CPU (tests/simt), against the fp64 oracle.

CI has no GPU, so this is where the block logic of ``prompt_stats.cuh``,
``pooled_dots.cuh`` and ``greedy_select.cuh`` meets the oracle: each CUDA thread
is a CPU thread, with real barriers, shuffles and ballots. The GEMM outputs the
launcher would get from cuBLAS are built here as fp64 products rounded to fp32
(fp32 accuracy, like cuBLAS with fp32 accumulation), the Gram made exactly
symmetric as cuBLAS's is (its (i, j) and (j, i) entries sum the same exact
products in the same order). Blocks of 32 threads give each thread several
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

from helpers import DTYPES, TOLERANCE, exact_tie_case, oracle_rows, random_case
from fp64_oracle import oracle_order, replay

from zspa_kernels import cuda_build

HERE = Path(__file__).parent
THREADS = (32, 128)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++20 compiler")
    lib = tmp_path_factory.mktemp("simt") / "libzspa_simt.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                    f"-I{cuda_build.source_dir()}", "-o", str(lib), str(HERE / "simt" / "emulate.cpp")],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _ptr(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def emulated_select(emulator, case, pick_order, threads):
    """What the launcher does, with the GEMMs done here in fp64 and rounded to fp32."""
    visual = case.visual.double()
    prompt = case.prompt.double() if case.prompt.dim() == 3 else case.prompt.double().unsqueeze(1)
    B, N, D = visual.shape
    T = prompt.shape[1]
    gram = visual @ visual.transpose(1, 2)
    gram = np.ascontiguousarray(((gram + gram.transpose(1, 2)) / 2).float().numpy())  # symmetric, as cuBLAS's
    tokens = np.ascontiguousarray(visual.float().numpy())
    raw_prompt = np.ascontiguousarray(prompt.float().numpy())
    mask = None if case.prompt_mask is None else np.ascontiguousarray(case.prompt_mask.numpy())
    lengths = None if case.lengths is None else np.ascontiguousarray(case.lengths.long().numpy())
    max_relevance = ctypes.c_bool(case.relevance == "max")
    pooled = np.zeros((B, D), dtype=np.float32)
    prompt_norm = np.zeros((B, T), dtype=np.float32)
    emulator.emulate_prompt_stats(_ptr(raw_prompt), _ptr(mask), _ptr(pooled), _ptr(prompt_norm), B, T, D,
                                  max_relevance, threads)
    if case.relevance == "max":
        dots = np.ascontiguousarray((visual @ prompt.transpose(1, 2)).float().numpy())
    else:
        dots = np.zeros((B, N), dtype=np.float32)
        emulator.emulate_pooled_dots(_ptr(tokens), _ptr(pooled), _ptr(dots), B, N, D, 2)
    out = np.full((B, case.k), -7, dtype=np.int64)
    emulator.emulate_greedy_select(_ptr(gram), _ptr(dots), _ptr(prompt_norm), _ptr(mask), _ptr(lengths), _ptr(out),
                                   B, N, T, case.k, ctypes.c_double(case.core_ratio), max_relevance,
                                   ctypes.c_bool(pick_order), threads, 2)  # Gram chunks of 2 rows
    return out


@pytest.mark.parametrize("seed", range(48))
def test_random_cases_replay_against_fp64(emulator, seed):
    # Each seed also picks the dtype and the block size (CPU threads are slow to sync).
    dtype, threads = DTYPES[seed % len(DTYPES)], THREADS[seed % len(THREADS)]
    case = random_case(seed, dtype)
    order = emulated_select(emulator, case, pick_order=True, threads=threads)
    kept = emulated_select(emulator, case, pick_order=False, threads=threads)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE["cuda"][dtype])
        assert kept[b].tolist() == sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b), case.describe()


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("seed", range(6))
def test_exact_ties_go_to_lower_index(emulator, seed, threads):
    case = exact_tie_case(seed, torch.bfloat16)
    order = emulated_select(emulator, case, pick_order=True, threads=threads)
    for b, row in oracle_rows(case):
        assert order[b].tolist() == oracle_order(row), case.describe()


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
