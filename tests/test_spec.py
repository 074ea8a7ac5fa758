"""spec.py: the one home of the selection's rules, checked against brute force."""
from __future__ import annotations

import fractions
import math
import os

import numpy as np
import pytest

from zspa_kernels import spec


def _exact_core_count(alpha: float, k_b: int) -> int:
    """floor(fl(fl(alpha·k_b) + 0.5)) with the two fp64 roundings done in exact rationals."""
    product = float(fractions.Fraction(alpha) * k_b)  # one rounding, as alpha * k_b in fp64
    return min(max(math.floor(float(fractions.Fraction(product) + fractions.Fraction(1, 2))), 0), k_b)


ALPHAS = [0.0, 1.0, 0.5, 0.25, 0.1, 0.3, 1 / 3, 0.49999999999999994, 0.5000000000000001, 1 / 128, 1 / 129]


@pytest.mark.parametrize("alpha", ALPHAS + [(2 * m + 1) / 2 / 97 for m in range(0, 97, 7)])
def test_core_count_is_the_rounded_fp64_product_on_every_budget(alpha):
    for k_b in range(0, 300):
        assert spec.core_count(alpha, k_b) == _exact_core_count(alpha, k_b), (alpha, k_b)


def test_core_count_exact_half_rounds_up():
    assert [spec.core_count(0.5, k_b) for k_b in (1, 3, 5, 7)] == [1, 2, 3, 4]
    assert spec.core_count(0.1, 15) == 2  # fl(0.1·15) = 1.5000000000000002
    assert spec.row_budgets(64, 0.5, 7) == (7, 4)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("k, n_max", [(1, 1), (5, 3), (64, 576), (3, 200)])
@pytest.mark.parametrize("has_lengths", [False, True])
def test_may_need_isolation_iff_some_possible_row_has_an_empty_core(alpha, k, n_max, has_lengths):
    rows = range(1, n_max + 1) if has_lengths else [n_max]
    some_empty = any(spec.row_budgets(k, alpha, n)[1] == 0 for n in rows)
    assert spec.may_need_isolation(k, alpha, n_max, has_lengths) == some_empty


def test_keep_budget_rounds_half_up_and_keeps_at_least_one():
    assert spec.keep_budget(0.1, 16384) == 1638 and spec.keep_budget(0.1, 576) == 58
    assert spec.keep_budget(0.3, 20) == 6 and spec.keep_budget(0.5, 5) == 3
    assert spec.keep_budget(0.001, 10) == 1 and spec.keep_budget(1.0, 7) == 7
    assert spec.keep_budget(64, 10) == 10 and spec.keep_budget(3, 10) == 3


@pytest.mark.parametrize("keep, error", [(True, TypeError), (np.bool_(True), TypeError), ("64", TypeError),
                                         (0, ValueError), (np.int64(0), ValueError), (0.0, ValueError),
                                         (1.5, ValueError), (float("nan"), ValueError), (np.float32(1.5), ValueError)])
def test_as_keep_names_keep(keep, error):
    with pytest.raises(error, match="keep: expected"):
        spec.as_keep(keep)


@pytest.mark.parametrize("keep, expected", [(64, 64), (np.int64(64), 64), (np.uint16(3), 3), (0.25, 0.25),
                                            (np.float32(0.25), 0.25), (np.float64(1.0), 1.0), (1.0, 1.0)])
def test_as_keep_reads_any_integer_as_a_count_and_any_other_real_as_a_fraction(keep, expected):
    read = spec.as_keep(keep)
    assert read == expected and type(read) is type(expected)


@pytest.mark.parametrize("raw, lenient", [("1", True), ("true", True), ("TRUE", True), ("yes", True),
                                          ("on", True), (" 1 ", False), ("0", False), ("false", False), ("", False)])
def test_triton_interpreter_reads_the_flag_like_the_installed_triton(monkeypatch, raw, lenient):
    monkeypatch.setenv("TRITON_INTERPRET", raw)
    triton = pytest.importorskip("triton")
    if spec.release("triton") >= (3, 4):
        assert spec.triton_interpreter() is lenient
        assert bool(triton.knobs.runtime.interpret) is lenient
    else:  # what triton.runtime.jit asks before triton.knobs (3.0-3.3)
        assert spec.triton_interpreter() is (raw == "1") is (os.getenv("TRITON_INTERPRET", "0") == "1")


@pytest.mark.parametrize("triton, raw, expected", [((3, 4), "true", True), ((3, 3), "true", False),
                                                   ((3, 3), "1", True), ((3, 0), " 1", False)])
def test_triton_interpreter_follows_the_rule_of_each_triton_release(monkeypatch, triton, raw, expected):
    monkeypatch.setenv("TRITON_INTERPRET", raw)
    monkeypatch.setattr(spec, "release", lambda package: triton if package == "triton" else (0, 0))
    assert spec.triton_interpreter() is expected


def test_release_reads_installed_versions():
    assert spec.release("torch") >= (2, 4)
    assert spec.release("no-such-package-zspa") == (0, 0)


@pytest.mark.parametrize("raw, expected", [("", "auto"), ("  ", "auto"), ("reference", "reference"),
                                           ("auto", "auto")])
def test_backend_from_env_empty_means_unset(monkeypatch, raw, expected):
    monkeypatch.setenv(spec.BACKEND_ENV, raw)
    assert spec.backend_from_env() == expected


def test_backend_from_env_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv(spec.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match="ZSPA_BACKEND: expected one of"):
        spec.backend_from_env()


def test_gram_budget(monkeypatch):
    monkeypatch.delenv(spec.GRAM_BUDGET_ENV, raising=False)
    assert spec.gram_budget() == spec.DEFAULT_GRAM_BUDGET
    monkeypatch.setenv(spec.GRAM_BUDGET_ENV, "0")
    assert spec.gram_budget() == 0
    for bad in ("lots", "-1"):
        monkeypatch.setenv(spec.GRAM_BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=spec.GRAM_BUDGET_ENV):
            spec.gram_budget()


def test_cuda_greedy(monkeypatch):
    monkeypatch.delenv(spec.CUDA_GREEDY_ENV, raising=False)
    assert spec.cuda_greedy() == "auto"
    for path in spec.CUDA_GREEDY_PATHS:
        monkeypatch.setenv(spec.CUDA_GREEDY_ENV, f" {path} ")
        assert spec.cuda_greedy() == path
    monkeypatch.setenv(spec.CUDA_GREEDY_ENV, "warp")
    with pytest.raises(ValueError, match="ZSPA_CUDA_GREEDY: expected one of"):
        spec.cuda_greedy()


def test_cuda_gram(monkeypatch):
    monkeypatch.delenv(spec.CUDA_GRAM_ENV, raising=False)
    assert spec.cuda_gram() == "auto"
    for path in spec.CUDA_GRAM_PATHS:
        monkeypatch.setenv(spec.CUDA_GRAM_ENV, path)
        assert spec.cuda_gram() == path
    monkeypatch.setenv(spec.CUDA_GRAM_ENV, "half")
    with pytest.raises(ValueError, match="ZSPA_CUDA_GRAM: expected one of"):
        spec.cuda_gram()


def test_the_raw_band_is_the_same_in_the_cuda_sources():
    """The raw band (spec.RAW_EXP_MIN/MAX) is restated once in C++, for the cuda backend's GEMMs:
    both backends must read the same tokens unscaled."""
    import pathlib
    import re

    source = (pathlib.Path(spec.__file__).resolve().parents[1] / "csrc" / "gram_repair.cuh").read_text()
    found = re.search(r"kRawExpMin\s*=\s*(-?\d+),\s*kRawExpMax\s*=\s*(-?\d+)", source)
    assert found, "csrc/gram_repair.cuh: kRawExpMin/kRawExpMax not found"
    assert (int(found[1]), int(found[2])) == (spec.RAW_EXP_MIN, spec.RAW_EXP_MAX)
