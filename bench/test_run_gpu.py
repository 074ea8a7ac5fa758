"""bench/run_gpu.sh, checked where it cannot run: the script parses, and every test file and node id
its checks stage hands pytest is collected. A renamed test left in that list would stop pytest at
collection ("not found", exit 4) and cost a device session its whole GPU test log."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "run_gpu.sh"


def _gpu_tests() -> list[str]:
    body = re.search(r"local gpu_tests=\((.*?)\)\n", SCRIPT.read_text(), re.S)
    assert body, "bench/run_gpu.sh no longer sets `local gpu_tests=(...)`: update this test with it"
    return shlex.split(body.group(1), comments=True)


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_gpu_test_the_checks_stage_names_is_collected():
    items = _gpu_tests()
    assert len(items) >= 10 and all("::" in i or (ROOT / i).is_file() for i in items), items
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *items],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    for item in items:  # a file collects its tests, a node id its parameter cases
        assert any(line == item or line.startswith(item + ("::" if "::" not in item else "[")) for line in collected), \
            f"run_gpu.sh names {item!r}, which collects no test"


def test_the_targets_stages_run_when_the_checks_take_their_whole_cap():
    """The stage order and caps, replayed as ``allowance`` spends the budget: with the checks at their cap, micro
    and profile at theirs, each past it by its timeout's kill grace, after run 1's start (12 s before the first
    stage: the stem and the GPU probe) and install (11 s), e2e still gets its floor (LLaVA's rows: the prefill
    target), as the script's header says."""
    text = SCRIPT.read_text()
    caps = {name: (int(cap), int(floor)) for name, cap, floor in re.findall(r"(\w+)\) cap=(\d+); floor=(\d+)", text)}
    order = re.search(r'\[ "\$\{STAGES\[0\]\}" = all \] && STAGES=\(([^)]*)\)', text).group(1).split()
    budget = int(re.search(r"BUDGET=\$\{ZSPA_RUN_SECONDS:-(\d+)\}", text).group(1))
    assert order.index("profile") < order.index("e2e") and order.index("micro") < order.index("e2e"), order
    spent = {"install": 11, "smoke": 15}
    grace = {"checks": 10, "micro": 15, "profile": 10}  # timeout -k: a stage's processes may outlive it by this
    clock = 12
    for stage in order[:order.index("e2e")]:
        cap, floor = caps[stage]
        left = budget - clock - 30
        allowed = 0 if left < floor else min(cap, left)
        assert allowed > 0, f"{stage} skipped before e2e"
        clock += min(allowed, spent.get(stage, cap)) + grace.get(stage, 0)
    assert budget - clock - 30 >= caps["e2e"][1], f"e2e would get {budget - clock - 30} s, under its floor"


def test_every_timeout_of_the_checks_stage_ends_at_the_stages_end():
    """The checks stage starts `zspa info` and nvidia-smi (CUDA starts: seconds) before its build and tests; a
    timeout of its whole allowance from then on would run the stage past its cap (run 1: 217 s under 210)."""
    body = re.search(r"stage_checks\(\) \{(.*?)\n\}", SCRIPT.read_text(), re.S).group(1)
    timeouts = re.findall(r"timeout -k 10 (\$\(\(.*?\)\)|\S+)", body)
    assert len(timeouts) == 2 and all(t == "$((end - SECONDS))" for t in timeouts), timeouts
