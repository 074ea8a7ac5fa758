#!/usr/bin/env bash
# The GPU run: the test suite on the GPU, the microbenchmarks at the SPEC shapes, the
# end-to-end benchmarks, then the committed results (JSON records, markdown summary, plot).
#
#   bench/run_gpu.sh [all|install|tests|micro|e2e|demo|report]...     (default: all)
#
# Results go to $OUT/results when $OUT is set (the lent GPU machine hands back only
# $OUT), else to bench/results. Stages can run in separate calls (one call is capped
# at ten minutes there): each writes raw files beside the results, and `report`
# merges whatever raw files of this device and date exist. On a machine without a
# GPU the same script runs the CPU-available implementations, and the end-to-end
# stage uses the tiny models (a 7B prefill takes minutes on a CPU). `demo` saves the output of
# `zspa demo` (the README's first command) and its picture beside the results.
# bench/run_cpu.sh is the CPU run: micro e2e demo report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:+$OUT/results}
DEST=${DEST:-bench/results}
mkdir -p "$DEST"
STAGES=("${@:-all}")
[ "${STAGES[0]}" = all ] && STAGES=(install tests micro e2e demo report)

stem() { "$PY" -m bench.report --print-stem; }  # <date>-<device>: every file of this run starts with it
has_gpu() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }

for stage in "${STAGES[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S) UTC)"
  case $stage in
    install)  # the device machine has no network: the package only, dependencies are there
      "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . ;;
    tests)
      "$PY" -m zspa_kernels.cli info | tee "$DEST/$(stem).tests.log"
      # A failing test is recorded in the log, not fatal: the benchmarks still run and say
      # how fast; the log says whether what they timed is right.
      rc=0
      "$PY" -m pytest tests -q -p no:cacheprovider > "$DEST/tests.tmp" 2>&1 || rc=$?
      tail -60 "$DEST/tests.tmp" >> "$DEST/$(stem).tests.log" && rm "$DEST/tests.tmp"
      echo "pytest exit status: $rc" | tee -a "$DEST/$(stem).tests.log"
      tail -5 "$DEST/$(stem).tests.log" ;;
    micro)
      ZSPA_BENCH=spec "$PY" -m pytest bench/test_bench_select_tokens.py -q -p no:cacheprovider \
        --benchmark-json="$DEST/$(stem).micro-raw.json" --benchmark-columns=median,iqr,rounds \
        2>&1 | tail -25 ;;
    e2e)
      if has_gpu; then args=(--models llava-1.5-7b qwen2.5-vl-7b)
      else args=(--models llava-1.5-tiny qwen2.5-vl-tiny --repeats 3 --new-tokens 16); fi
      "$PY" -m bench.e2e "${args[@]}" --batch 1 8 --out "$DEST/$(stem).e2e-raw.json" ;;
    demo)
      s=$(stem)
      start=$SECONDS
      # stdout only: library warnings on stderr would carry this machine's paths into the results
      "$PY" -m zspa_kernels.cli demo --out "$DEST/$s.demo" | tee "$DEST/$s.demo.txt"
      echo "zspa demo: $((SECONDS - start)) s in all" | tee -a "$DEST/$s.demo.txt"
      mv "$DEST/$s.demo/kept_patches.png" "$DEST/$s.demo.png" && rmdir "$DEST/$s.demo" ;;
    report)
      s=$(stem)
      extra=()
      [ -f "$DEST/$s.e2e-raw.json" ] && extra=(--e2e "$DEST/$s.e2e-raw.json")
      [ -f "$DEST/$s.demo.txt" ] && extra+=(--demo "$DEST/$s.demo.txt")
      "$PY" -m bench.report --micro "$DEST/$s.micro-raw.json" "${extra[@]}" --out "$DEST"
      cat "$DEST/$s.md" ;;
    *) echo "unknown stage '$stage' (all|install|tests|micro|e2e|demo|report)" >&2; exit 2 ;;
  esac
done
