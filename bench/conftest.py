"""pytest hooks of the microbenchmark runs (``bench/test_bench_select_tokens.py``, run_gpu.sh's and
run_cpu.sh's micro stage)."""
from __future__ import annotations

import pytest

from bench.report import CASE_OUTCOMES, UNTIMED_CASES
from zspa_kernels.benchmark import first_line
from zspa_kernels.spec import keep_label

# The microbenchmark cases that failed or were skipped, in the order they ran: the JSON holds only the timed
# ones, and the report must tell a case that failed from one skipped by rule or never reached.
_OUTCOMES: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each case of ``bench/test_bench_select_tokens.py`` that fails or is skipped (``impl``,
    ``shape``, ``keep``, and the first line of why), for :func:`pytest_benchmark_generate_json`."""
    outcome = yield
    result = outcome.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if not {"impl", "shape", "keep"} <= set(params) or not (result.failed or result.skipped):
        return
    _OUTCOMES.append({"nodeid": item.nodeid, "impl": params["impl"], "shape": getattr(params["shape"], "label", str(params["shape"])),
                      "keep": keep_label(params["keep"]), "outcome": "failed" if result.failed else "skipped",
                      "reason": first_line(call.excinfo.value) if call.excinfo else result.outcome})


@pytest.hookimpl(hookwrapper=True, optionalhook=True)  # optional: without pytest-benchmark, no hook to wrap
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """Leave out of the JSON, and name in it, the cases that have no timed round.

    The micro stage ends at its time limit with SIGINT, and pytest-benchmark then saves what was
    timed. A case interrupted in its warm-up or first round is registered with no timings at all,
    and pytest-benchmark (5.3.1 and older) fails on it (``min()`` of nothing in its statistics) and
    writes no JSON: every finished case of the run is lost (seen in a CPU rehearsal of the stage,
    where the cap cut a slow baseline case). Its own terminal table skips such a case (a
    benchmark without data is false); the JSON now does too, and lists it under ``UNTIMED_CASES``
    for the report to count as interrupted. The cases that failed or were skipped go under ``CASE_OUTCOMES``
    (:func:`pytest_runtest_makereport`)."""
    untimed = [bench.fullname for bench in benchmarks if not bench]
    benchmarks[:] = [bench for bench in benchmarks if bench]
    outcome = yield
    if untimed:
        outcome.get_result()[UNTIMED_CASES] = untimed
    if _OUTCOMES:
        outcome.get_result()[CASE_OUTCOMES] = list(_OUTCOMES)
