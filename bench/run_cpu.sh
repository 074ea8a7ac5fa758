#!/usr/bin/env bash
# The CPU run, in one line: microbenchmarks at the SPEC shapes (every backend beside the
# baselines), the end-to-end smoke models, `zspa demo`, then the committed results
# bench/results/<date>-<device>.{json,md,png} plus .demo.txt/.demo.png. Run it on an idle
# machine (the records carry the load average); PYTHON picks the interpreter.
#
#   bench/run_cpu.sh
set -euo pipefail
# The GPU run's stage caps fit a 10-minute device call; a 2-core CPU needs far longer.
ZSPA_STAGE_CAPS=0 ZSPA_RUN_SECONDS=${ZSPA_RUN_SECONDS:-5400} exec "$(dirname "$0")/run_gpu.sh" micro e2e demo report
