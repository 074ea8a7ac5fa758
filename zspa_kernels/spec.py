"""Every rule of the ZSPAPrune selection that more than one module needs, in one place.

SPEC §1 is the contract; this module is its vocabulary. Backends, the transformers hooks,
the benchmarks and the tests import the budgets, the core size, the isolation condition,
the fractional-keep rounding, the numeric constants and the names from here, and nowhere
restate them. It imports nothing of the package (no import circle can pass through it).
"""
from __future__ import annotations

import functools
import importlib.metadata
import math
import numbers
import os
import re
from typing import Union

# Numeric constants of §1 (every backend uses exactly these values).
NORM_EPS = 1e-6               # v / max(‖v‖, NORM_EPS)
NONFINITE_RELEVANCE = -2.0    # below every finite cosine: a non-finite token is least relevant
NONFINITE_SIMILARITY = 2.0    # above every finite cosine: ... and most redundant

# Largest fp64 score gap at which a backend's pick may differ from the exact one (a near-tie), from
# its arithmetic: reference, triton and cuda compute in fp32 from exactly upcast inputs (cosine errors
# ~sqrt(D)·2^-24, far below 2e-5 at the tests' sizes); cpu's greedy similarities are dots of a
# candidate's fp16-rounded unit vector with a query's fp32 one, each off by at most 2^-11 plus its own
# summation's 66·2^-24, so that two candidates' compared scores may swap across a gap of up to
# 2^-10 + 2^-16 on any input (the isolation seed: to first order; zspa_kernels/cpu.py). The tests replay every
# pick against fp64 with these (the core's with CORE_TOLERANCE); `zspa demo` judges two backends'
# differing picks by them.
PICK_TOLERANCE = {"reference": 2e-5, "triton": 2e-5, "cuda": 2e-5, "cpu": 2.0**-10 + 2.0**-16}
# The core's steps rank by relevance, which every backend (cpu's too) computes from fp32 unit vectors:
# there every backend is held to this bound, whatever its bound at the similarity steps. Like the fp32
# bounds above it is the random-walk size of fp32 rounding, not a worst case: a sum that runs m terms
# in one fp32 accumulator can lose m half-ulps on an adversarial token (m = D/16 or D/8, the cpu
# backend's lanes, gave 2.4e-5 or 4.8e-5 at D = 16384). The norms and relevance sums that rank the
# core avoid such runs where they are this package's own: the reference sums pairwise, the cpu
# backend in double, Triton's statistics in block trees (tests/test_select_tokens.py holds them to it
# on two such tokens: one whose squares, one whose relevance products, each fall under half an ulp of
# the running sum). The cuda backend's norms are its Gram's diagonal, whose K loop is cuBLAS's
# (GPU-NOTES: "Norms from the Gram's diagonal").
CORE_TOLERANCE = 2e-5
# Overflow-safe norms (every backend alike): a token x is scaled by 2**-e, e the exponent of
# max|x| (max|x| = m·2**e, m in [0.5, 1); 0 for a zero vector), clamped to this range so
# that 2**-e is a normal fp32 number. Scaling by a power of two is exact, so
# cos(i, j) = (y_i·y_j) / (max(‖y_i‖, NORM_EPS·2**-e_i) · max(‖y_j‖, NORM_EPS·2**-e_j))
# equals the unscaled formula bit for bit wherever that one does not overflow. The Gram
# GEMMs of both GPU backends read the tokens unscaled where that holds with room to spare:
# max|x| in the raw band [2**-33, 2**48), i.e. e in [RAW_EXP_MIN, RAW_EXP_MAX] (products
# below 2**96, a D < 2**31 sum below 2**127; what underflows is < 2**-52 of a cosine). The
# cuda backend scales only the tokens outside it (csrc/gram_repair.cuh, kRawExpMin/Max);
# Triton's Gram tiles scale their operands only where a tile holds such a token.
SCALE_EXP_MIN, SCALE_EXP_MAX = -126, 126
RAW_EXP_MIN, RAW_EXP_MAX = -32, 48


def pool_shift(T: int) -> int:
    """Relevance ``"mean"`` pools a batch row's valid prompt rows by their fp32 mean, ``sum / count``;
    a feature whose sum of finite values overflows takes ``(sum_t x_t * 2**-k) / count * 2**k``
    instead, saturated at float32's largest value (the exact mean is at most ``max|x|``), with
    ``k = pool_shift(T)``, ``T`` the prompt's rows (masked ones too: no value chooses it). So a
    finite prompt has a finite mean, of the plain formula's bits wherever that one is finite. With
    ``2**k > 2T`` no scaled partial sum passes half of float32's range (rounding drift stays under a
    factor 2 below ``T = 2**23``); a term the scaling turns subnormal (``|x| < 2**(k - 126)``) loses
    under ``2**(k - 150)``, nothing beside the rounding of a sum that overflowed (its largest term
    is at least ``2**128 / T``)."""
    return int(T).bit_length() + 1


DEFAULT_CORE_RATIO = 0.5      # the paper tunes alpha per dataset; 0.5 is this package's choice
RELEVANCE_MODES = ("mean", "max")
# Implementations of the op; "auto" picks one of them per device (see dispatch.py).
BACKENDS = ("reference", "cpu", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
BACKEND_ENV = "ZSPA_BACKEND"
# The kernels index the (B, k) output and the picks with 32-bit integers.
MAX_K = 2**31 - 1
# Bytes the (rows, N, N) fp32 similarity scratch of the triton and cuda backends may take.
GRAM_BUDGET_ENV = "ZSPA_GRAM_BUDGET"
DEFAULT_GRAM_BUDGET = 4 << 30  # four N=16384 video rows per launch, any LLaVA-size batch in one
# The cuda backend's greedy kernel: "auto" (the launcher's rule, csrc/select_tokens.cu),
# "cluster" (csrc/greedy_cluster.cuh: the Gram on chip over a thread-block cluster, sm_90+,
# N up to ~950) or "block" (csrc/greedy_select.cuh: one CTA a row, the Gram from L2).
CUDA_GREEDY_ENV = "ZSPA_CUDA_GREEDY"
CUDA_GREEDY_PATHS = ("auto", "cluster", "block")
# The cuda backend's Gram: "auto" (csrc/select_tokens.cu's rule by size and greedy kernel),
# "full" (one GEMM), "split" (top rows and bottom-right block, 3/4 of the work: gram_view.cuh)
# or "splitk" (a row at a time, each row's Gram summed over four slices of D: more CTAs for the
# latency-bound GEMM of one image; forced only, until a GPU run has timed it: gram_slices).
CUDA_GRAM_ENV = "ZSPA_CUDA_GRAM"
CUDA_GRAM_PATHS = ("auto", "full", "split", "splitk")
# What the cuda backend refuses (csrc/select_tokens.cu checks it): more than 65535 rows (a grid
# dimension), or a row whose greedy state (3 floats a token, csrc/greedy_select.cuh) and the
# kernel's static arrays (2·32 packed keys and 32 counts: 640 bytes) pass the shared memory
# a block may opt in to (227 KiB on sm_90: 19317 tokens). `auto` sends no such call there.
CUDA_MAX_ROWS = 65535
CUDA_GREEDY_BYTES_PER_TOKEN = 12
CUDA_GREEDY_STATIC_BYTES = 640


def cuda_backend_takes(B: int, N: int, shared_memory_optin: int) -> bool:
    """Whether the cuda backend accepts ``B`` rows of ``N`` tokens on a device whose blocks may
    opt in to ``shared_memory_optin`` bytes of shared memory."""
    return B <= CUDA_MAX_ROWS and CUDA_GREEDY_BYTES_PER_TOKEN * N + CUDA_GREEDY_STATIC_BYTES <= shared_memory_optin


def core_count(core_ratio: float, k_b: int) -> int:
    """``k_core = floor(alpha·k_b + 0.5)`` clamped to ``[0, k_b]`` (SPEC §1 step 3), in fp64."""
    return min(max(math.floor(core_ratio * k_b + 0.5), 0), k_b)


def row_budgets(k: int, core_ratio: float, n: int) -> tuple[int, int]:
    """``(k_b, k_core)`` of a row with ``n`` valid tokens: ``k_b = min(k, n)``."""
    k_b = min(k, n)
    return k_b, core_count(core_ratio, k_b)


def may_need_isolation(k: int, core_ratio: float, n_max: int, has_lengths: bool) -> bool:
    """Whether some row of a call MAY have ``k_core = 0`` (then the most isolated token seeds
    the greedy loop, which costs a full ``N × N`` pass). Decided from shapes and scalars only:
    with ``lengths`` a row may hold a single token (``k_b = 1``), else every ``k_b = min(k, N)``.
    ``k_core`` is non-decreasing in ``k_b``, so the smallest possible ``k_b`` decides."""
    smallest_k_b = 1 if has_lengths else min(k, n_max)
    return core_count(core_ratio, smallest_k_b) == 0


def keep_budget(keep: Union[int, float], n_tokens: int) -> int:
    """Tokens kept of an image (or row) of ``n_tokens``: an int ``keep`` is a count (at most
    ``n_tokens``); a float is a fraction in (0, 1], rounded half up like ``k_core`` and at least
    1 (``0.1 × 576 → 58``, ``0.1 × 16384 → 1638``). The product is rounded to 9 decimals first
    so that binary fractions cannot flip it (``0.3 × 20`` keeps 6)."""
    if isinstance(keep, float):
        return max(1, min(n_tokens, math.floor(round(keep * n_tokens, 9) + 0.5)))
    return min(keep, n_tokens)


def as_keep(keep) -> Union[int, float]:
    """``keep`` as the selection reads it: an int count >= 1 or a float fraction in (0, 1].
    Any integer (Python or numpy) is a count and any other real number a fraction, so a
    budget computed with numpy means what it says; a bool is neither."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep: expected an int count >= 1 or a float fraction in (0, 1], got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep: expected an int count >= 1, got {keep}")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a float fraction in (0, 1], got {keep}")
    return float(keep)


def keep_label(keep: Union[int, float]) -> str:
    return f"{round(keep * 100)}%" if isinstance(keep, float) else str(keep)


_TRUE = ("1", "true", "yes", "on", "y")


@functools.lru_cache(maxsize=None)  # installed versions do not change under a running process
def release(package: str) -> tuple[int, int]:
    """(major, minor) of an installed package, (0, 0) when absent or unreadable."""
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter. ``TRITON_INTERPRET`` is read the
    way the installed Triton reads it, so both always agree: from 3.4 (``triton.knobs``) any
    of ``1``, ``true``, ``yes``, ``on``, ``y`` in any case; before (torch 2.4-2.7 bring
    3.0-3.3) exactly ``1``."""
    raw = os.environ.get("TRITON_INTERPRET", "0")
    if release("triton") >= (3, 4):
        return raw.lower() in _TRUE
    return raw == "1"


def _choice_from_env(name: str, choices: tuple) -> str:
    """Environment variable ``name``: ``"auto"`` when unset or empty, else one of ``choices``
    (which hold ``"auto"``); anything else raises naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return "auto"
    if raw not in choices:
        raise ValueError(f"{name}: expected one of {choices} or unset, got {raw!r}")
    return raw


def backend_from_env() -> str:
    """``ZSPA_BACKEND``, or ``"auto"`` when unset or empty; anything else raises naming it."""
    return _choice_from_env(BACKEND_ENV, BACKEND_CHOICES)


def gram_budget() -> int:
    """``ZSPA_GRAM_BUDGET`` bytes for the ``(rows, N, N)`` Gram scratch, the same for every
    backend that keeps one (triton: ``0`` forces its streaming path; cuda: at least one row)."""
    raw = os.environ.get(GRAM_BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_GRAM_BUDGET
    try:
        budget = int(raw)
    except ValueError:
        budget = -1
    if budget < 0:
        raise ValueError(f"{GRAM_BUDGET_ENV}: expected a byte count >= 0, got {raw!r}")
    return budget


def cuda_greedy() -> str:
    """``ZSPA_CUDA_GREEDY``: the cuda backend's greedy kernel, ``"auto"`` when unset or empty;
    anything else but ``"cluster"`` or ``"block"`` raises naming it."""
    return _choice_from_env(CUDA_GREEDY_ENV, CUDA_GREEDY_PATHS)


def cuda_gram() -> str:
    """``ZSPA_CUDA_GRAM``: the cuda backend's Gram, ``"auto"`` when unset or empty; anything else
    but ``"full"``, ``"split"`` or ``"splitk"`` raises naming it."""
    return _choice_from_env(CUDA_GRAM_ENV, CUDA_GRAM_PATHS)
