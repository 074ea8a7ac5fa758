"""pytest hooks of the microbenchmark runs (``bench/test_bench_select_tokens.py``, run_gpu.sh's and
run_cpu.sh's micro stage)."""
from __future__ import annotations

import pytest

from bench.report import UNTIMED_CASES


@pytest.hookimpl(hookwrapper=True, optionalhook=True)  # optional: without pytest-benchmark, no hook to wrap
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """Leave out of the JSON, and name in it, the cases that have no timed round.

    The micro stage ends at its time limit with SIGINT, and pytest-benchmark then saves what was
    timed. A case interrupted in its warm-up or first round is registered with no timings at all,
    and pytest-benchmark (5.3.1 and older) fails on it (``min()`` of nothing in its statistics) and
    writes no JSON: every finished case of the run is lost (seen in a CPU rehearsal of the stage,
    where the cap cut a slow baseline case). Its own terminal table skips such a case (a
    benchmark without data is false); the JSON now does too, and lists it under ``UNTIMED_CASES``
    for the report to count as interrupted."""
    untimed = [bench.fullname for bench in benchmarks if not bench]
    benchmarks[:] = [bench for bench in benchmarks if bench]
    outcome = yield
    if untimed:
        outcome.get_result()[UNTIMED_CASES] = untimed
