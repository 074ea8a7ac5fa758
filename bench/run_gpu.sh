#!/usr/bin/env bash
# The GPU run: every check and measurement of the fused backends, made to fit ONE call of the
# device tool (a session has 15 minutes of device time, the machine's start included, and a
# command at most 10):   device run, timeout_s=600:  bash bench/run_gpu.sh
#
#   bench/run_gpu.sh [STAGE...]     (default: all = install checks smoke micro profile e2e tune demo report)
#
# Stages, in the order of what matters if time runs out:
#   install  the package into the machine's Python (it has no network: no dependencies)
#   checks   correctness (nothing is timed): `zspa build` compiles csrc/ while the tests that
#            touch the GPU run (pytest-xdist where installed; the rest of the suite is CPU-only,
#            CI's job, rehearsed on CPU with this machine's torch/triton/transformers versions);
#            beside them compute-sanitizer memcheck, racecheck, synccheck and initcheck (reads
#            of device memory never written: the scratch contract), side by side, run
#            bench/sanitize.py on triton (at once) and on cuda (once built; initcheck after a
#            control of cuBLAS's Gram read back by PyTorch alone). Logs: <stem>.tests.log (with
#            the build's and every failure's reason), <stem>.sanitize.log (each run's seconds).
#   smoke    bench/smoke.py: does the cuda backend's cluster kernel run here and pick what the
#            block kernel picks? If not, the stages after it run with ZSPA_CUDA_GREEDY=block; if
#            the block kernel fails too, without the cuda backend (ZSPA_BENCH_SKIP=cuda): a kernel
#            that traps kills its process's CUDA context, and every later case with it
#   micro    microbenchmarks at the SPEC shapes (from here on the GPU is the run's alone)
#   profile  bench/profile.py's time split (GPU time, graph replay, eager host cost, fixed cost
#            and cost per greedy step), then Nsight Compute of one call per fused backend
#   e2e      LLaVA-1.5-7B and Qwen2.5-VL-7B from configs, bf16, batch 1 and 8, a process each, LLaVA
#            first: each saves its rows, then its prefills' GPU kernel time (a profiler pass, last in
#            its process), so a cut during Qwen's rows keeps all of LLaVA's
#   tune     bench/tune.py: the cuda greedy kernels (block, cluster, auto) and Gram forms at
#            LLaVA-1.5 B = 1, 32, 64 and video, the Triton plan variants, a per-token prompt against
#            a pooled one, the raw band's cost, the cuBLAS Gram forms, side by side, each section
#            saved as it ends (what to try next, not a target: after the stages that judge them)
#   demo     `zspa demo` (the README's first command) and its picture
#   report   <stem>.{json,md,png} from whatever raw files this run left, and on a GPU
#            <stem>.auto_cuda.json: auto's per-shape table (commit it as zspa_kernels/auto_cuda.json)
#
# The caps are set so that the targets' stages all run when the checks take their whole cap: as run 1
# spent it (12 s to start, install 11 s; each stage past its cap by its timeout's kill grace: checks 10 s,
# micro 15, profile 10), 12 + 11 + 190 + 15 (smoke) + 155 + 85 leave e2e 62 s of 560 (30 kept for the
# report), enough for LLaVA's rows; what a long run loses is Qwen's rows, tune and the demo
# (`run_gpu.sh install tune demo report` later). bench/test_run_gpu.py replays this.
# Time: ZSPA_RUN_SECONDS (default 560) bounds the whole run. Each stage runs under `timeout`
# with the smaller of its own cap and what is left (30 s kept for the report), and a stage with
# less than its floor left is skipped, saying so. The stamps in the log give each stage's time.
# The caps are sized for the GPU; ZSPA_STAGE_CAPS=0 lifts them (the CPU run, bound by the budget alone).
# A follow-up on a fresh machine after a fix names its stages, e.g.
# `ZSPA_RUN_SECONDS=240 bash bench/run_gpu.sh install micro report` (always `install` first).
#
# Output: on the device machine ($OUT set) results are written to a work folder and packed into
# $OUT/results.tar.gz after every stage, so a run cut short still brings back what finished
# (the tool returns at most 8 files; a full run writes about a dozen), and the whole log is
# $OUT/run.log; `tar -xzf results.tar.gz -C bench/results` puts them where they are committed.
# Without $OUT they go to bench/results directly. bench/run_cpu.sh is the CPU run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${ZSPA_RUN_SECONDS:-560}
DEST=bench/results
[ -n "${OUT:-}" ] && DEST=$(mktemp -d)
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

STEM=  # <date>-<device>[-runN]: every file of this run starts with it (bench.report --print-stem)
GPU=   # 1 where torch sees a CUDA device
has_module() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"; }
# The logs are committed: this machine's folders (the checkout, site-packages, home) become names.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || echo /nonexistent)
SCRUB=(-e "s#$DEST/##g" -e "s#$SITE#<site-packages>#g" -e "s#$PWD#<repo>#g")
[ "${HOME:-/}" != / ] && SCRUB+=(-e "s#$HOME#~#g")
scrub() {
  local f
  for f in "$DEST"/*.log "$DEST"/*.txt "$DEST"/*.md; do
    [ -f "$f" ] && sed -i "${SCRUB[@]}" "$f"
  done
  return 0
}
# A save cut at its time limit leaves its temporary file (benchmark.save_records): not a result.
pack() { scrub; rm -f "$DEST"/*.partial; [ -n "${OUT:-}" ] && tar -czf "$OUT/results.tar.gz" -C "$DEST" . ; return 0; }

# seconds a stage may take: min(cap, what is left less 30 s for the report); 0 if under its floor
allowance() {
  local cap=$1 floor=$2 left=$((BUDGET - SECONDS - 30))
  [ "${ZSPA_STAGE_CAPS:-1}" = 0 ] && cap=$BUDGET
  [ "$STAGE" = report ] && left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$floor" ]; then echo 0; elif [ "$left" -lt "$cap" ]; then echo "$left"; else echo "$cap"; fi
}

sanitizer_run() {  # $1: tool, $2: the stage's end (in $SECONDS), then bench.sanitize's arguments
  local tool=$1 end=$2
  shift 2
  if [ $((end - SECONDS)) -lt 10 ]; then echo "== $tool, bench.sanitize $*: skipped, the stage's time is up"; return 0; fi
  echo "== compute-sanitizer --tool $tool: bench.sanitize $*"
  local start=$SECONDS rc
  # Every caching-allocator block its own cudaMalloc, so that memcheck sees each tensor's
  # bounds; API errors surface as exceptions in our launches (each one is checked). Device
  # frames only: a host backtrace per report made the first run's log 580 KB.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 $((end - SECONDS)) compute-sanitizer --tool "$tool" \
    --error-exitcode 99 --report-api-errors no --print-limit 50 --show-backtrace device --target-processes all \
    "$PY" -m bench.sanitize "$@" 2>&1
  rc=$?
  echo "== exit status: $rc ($((SECONDS - start)) s)"
}

sanitize() {  # $1: backend, $2: the stage's end (in $SECONDS); the four tools side by side, log on stdout
  # Side by side, each tool its own process and log, printed in this order once all are done: one
  # after another they would take the sum of four instrumented runs (a few small launches each,
  # host-bound under the tools), and the stages after the checks get what this one leaves.
  local tool pids=() part tools=(memcheck racecheck-block racecheck synccheck initcheck)  # the three asked for first
  part=$(mktemp -d)
  for tool in "${tools[@]}"; do
    {
      case $tool in
        # The cluster kernel's chain polls shared memory that other CTAs store into, ordered by a
        # step tag rather than a barrier: racecheck may report that as hazards. Every cuda case on
        # the block kernel first, so that the verdict on all the other kernels stands apart.
        racecheck-block) [ "$1" = cuda ] && sanitizer_run racecheck "$2" --backend cuda --greedy block ;;
        # cuda's Gram is a cuBLAS output: initcheck first reads the same bmm back by PyTorch alone
        # (nothing of ours). Errors there mean initcheck does not see that cuBLAS kernel's writes,
        # so its reports of our kernels reading the Gram are the same false positive.
        initcheck) [ "$1" = cuda ] && sanitizer_run initcheck "$2" --backend cuda --cublas-control
                   sanitizer_run initcheck "$2" --backend "$1" ;;
        *) sanitizer_run "$tool" "$2" --backend "$1" ;;
      esac
    } > "$part/$tool" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  for tool in "${tools[@]}"; do cat "$part/$tool"; done
  rm -rf "$part"
}

stage_checks() {  # $1: seconds allowed
  local log="$DEST/$STEM.tests.log" slog="$DEST/$STEM.sanitize.log" rc=0 xdist=() pids=()
  local end=$((SECONDS + $1)) sanitizer=true
  command -v compute-sanitizer > /dev/null || sanitizer=false
  "$PY" -m zspa_kernels.cli info > "$log" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$log" 2>&1
  # Side by side (16 cores, one GPU; nothing is timed): the csrc/ build, the GPU tests, and
  # the sanitizers (triton's at once, cuda's once the build is done).
  # Every timeout below ends at the stage's end (after `zspa info` and nvidia-smi, which start CUDA), not $1 from now.
  timeout -k 10 $((end - SECONDS)) "$PY" -m zspa_kernels.cli build > "$DEST/build.tmp" 2>&1 &
  local build_pid=$!
  has_module xdist && xdist=(-n 12)
  # The tests that exercise the GPU (65 s with 12+ workers on a warm H200). The first run also
  # ran the CPU-only rest of the suite here; beside the sanitizers neither half finished in
  # its 210 s, and the rest only repeats CI. A failing test is recorded, not fatal: the
  # benchmarks still run and say how fast; the logs say whether what they timed is right.
  # -rfE --tb=short: the failures' reasons stay in the log.
  local gpu_tests=(tests/test_select_tokens.py tests/test_triton.py tests/test_cuda_backend.py tests/test_op.py
                   tests/test_baselines.py tests/test_cli.py tests/integrations/test_prune_on_gpu.py
                   "tests/integrations/test_cross_attention_prune.py::test_fused_backends_prune_like_the_reference_on_the_gpu"
                   "tests/integrations/test_cross_attention_prune.py::test_the_hooks_wait_for_the_gpu_once_a_prefill_and_never_at_a_decode_step"
                   "tests/integrations/test_block_diffusion_prune.py::test_fused_backends_generate_like_the_reference_on_the_gpu"
                   "tests/integrations/test_encoder_decoder_prune.py::test_fused_backends_generate_like_the_reference_on_the_gpu"
                   "tests/integrations/test_action_expert_prune.py::test_fused_backends_sample_like_the_reference_on_the_gpu"
                   bench/test_sanitize.py bench/test_report.py)
  # --durations: the slowest tests in the log, to size this stage by (its first cold run with the
  # GPU tests alone; run 1's timed out beside the CPU half).
  local pytest_args=(-q -p no:cacheprovider -rfE --tb=short --durations=30 "${xdist[@]}")
  timeout -k 10 $((end - SECONDS)) "$PY" -m pytest "${pytest_args[@]}" "${gpu_tests[@]}" > "$DEST/tests-GPU.tmp" 2>&1 &
  local gpu_pid=$!
  $sanitizer && { sanitize triton "$end" > "$DEST/sanitize-triton.tmp" & pids+=($!); }
  wait "$build_pid" || rc=$?
  { echo "== zspa build (exit $rc)"; cat "$DEST/build.tmp"; } >> "$log"; rm -f "$DEST/build.tmp"
  if $sanitizer && [ "$rc" = 0 ]; then sanitize cuda "$end" > "$DEST/sanitize-cuda.tmp" & pids+=($!)
  elif $sanitizer; then  # each run would try the build again, one after another, and fail
    echo "== compute-sanitizer on cuda: skipped, zspa build failed (exit $rc; its log is in tests.log)" > "$DEST/sanitize-cuda.tmp"
  fi
  rc=0
  wait "$gpu_pid" || rc=$?
  { echo "== pytest: the GPU tests"; grep -v -e PytestBenchmarkWarning -e "^bringing up nodes" "$DEST/tests-GPU.tmp"
    echo; echo "pytest exit status (GPU): $rc"; } >> "$log"
  rm -f "$DEST/tests-GPU.tmp"
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  if $sanitizer; then cat "$DEST"/sanitize-*.tmp > "$slog"; rm -f "$DEST"/sanitize-*.tmp
  else echo "compute-sanitizer: not on PATH" > "$slog"; fi
  tail -4 "$log"; grep -E "^== (compute|exit|.*skipped)|ERROR SUMMARY|RACECHECK SUMMARY|every selection valid" "$slog"
}

main() {
  local STAGES=("${@:-all}") STAGE cap floor allowed end args extra kind f rc names=()
  [ "${STAGES[0]}" = all ] && STAGES=(install checks smoke micro profile e2e tune demo report)
  STEM=$("$PY" -m bench.report --print-stem) || exit 1  # -runN on a day that has results of this device
  GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')  # asked once: each ask starts CUDA
  for STAGE in "${STAGES[@]}"; do
    case $STAGE in  # cap and floor (seconds) of each stage
      install) cap=60; floor=5 ;;   checks) cap=180; floor=60 ;;  micro) cap=140; floor=60 ;;
      e2e) cap=120; floor=60 ;;     profile) cap=75; floor=20 ;;  demo) cap=60; floor=30 ;;
      tune) cap=60; floor=30 ;;     report) cap=30; floor=5 ;;    smoke) cap=90; floor=20 ;;
      *) echo "unknown stage '$STAGE' (all|install|checks|smoke|tune|micro|e2e|profile|demo|report)" >&2; exit 2 ;;
    esac
    allowed=$(allowance $cap $floor)
    echo "== $STAGE at ${SECONDS}s of ${BUDGET}s ($(date -u +%H:%M:%S) UTC), allowed ${allowed}s"
    if [ "$allowed" -eq 0 ]; then echo "   skipped: under ${floor}s left"; continue; fi
    case $STAGE in
      install)
        timeout -k 10 "$allowed" "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . ;;
      checks)
        stage_checks "$allowed" ;;
      micro)
        # SIGINT: pytest ends the session cleanly and pytest-benchmark still writes what was timed
        # (a case cut before its first timed round is left out and named: bench/conftest.py)
        # The whole output is kept (<stem>.micro.log): a failing case's reason is in it.
        ZSPA_BENCH=spec timeout -s INT -k 15 "$allowed" "$PY" -m pytest bench/test_bench_select_tokens.py -q -p no:cacheprovider \
          -rfE --tb=short --benchmark-json="$DEST/$STEM.micro-raw.json" --benchmark-columns=median,iqr,rounds \
          > "$DEST/$STEM.micro.log" 2>&1
        echo "pytest exit status: $?"; tail -25 "$DEST/$STEM.micro.log" ;;
      e2e)
        # One process a model, LLaVA first: each saves its rows, then its prefills' GPU kernel time (a profiler
        # session last in its process), so a cut during Qwen's rows keeps all of LLaVA's.
        end=$((SECONDS + allowed)); args=()
        if [ "$GPU" = 1 ]; then names=(llava-1.5-7b qwen2.5-vl-7b); else names=(llava-1.5-tiny qwen2.5-vl-tiny); fi
        for f in "${names[@]}"; do
          # A 7B model's rows need e2e's floor (build, timings, hook): a process started with less would only
          # take its time from tune and the demo.
          if [ $((end - SECONDS)) -lt "$floor" ]; then echo "   $f: skipped, under ${floor}s left"; break; fi
          timeout -k 10 $((end - SECONDS)) "$PY" -m bench.e2e --models "$f" --repeats 3 --new-tokens 16 --batch 1 8 \
            --out "$DEST/$STEM.e2e-raw.json" "${args[@]}"
          echo "bench.e2e $f exit status: $?"; args=(--append)
        done ;;
      profile)
        end=$((SECONDS + allowed))
        # The timing run leaves Nsight Compute its share. ncu prints its sections only when its
        # process ends, so a run cut short brings back nothing: LLaVA-1.5 first, video apart.
        timeout -k 10 $((allowed > 50 ? allowed - 30 : allowed)) "$PY" -m bench.profile --out "$DEST/$STEM.profile-raw.json"
        if command -v ncu > /dev/null; then
          : > "$DEST/$STEM.ncu.txt"
          for shapes in "llava-1.5 llava-1.5-b32" video; do
            if [ $((end - SECONDS)) -lt 15 ]; then echo "ncu ($shapes): skipped, under 15 s left" | tee -a "$DEST/$STEM.ncu.txt"; break; fi
            # --clock-control none: the card's clocks are left as found
            timeout -k 10 $((end - SECONDS)) ncu --clock-control none --profile-from-start off --target-processes all \
              --set detailed "$PY" -m bench.profile --ncu --shapes $shapes >> "$DEST/$STEM.ncu.txt" 2>&1
            echo "ncu ($shapes) exit status: $?"
          done
          echo "ncu: $(grep -c '^==PROF== Profiling' "$DEST/$STEM.ncu.txt") kernels profiled"
        fi ;;
      demo)
        # stdout only: library warnings on stderr would carry this machine's paths into the results
        timeout -k 10 "$allowed" "$PY" -m zspa_kernels.cli demo --out "$DEST/$STEM.demo" > "$DEST/$STEM.demo.txt"
        echo "demo exit status: $?"; cat "$DEST/$STEM.demo.txt"
        [ -f "$DEST/$STEM.demo/kept_patches.png" ] && mv "$DEST/$STEM.demo/kept_patches.png" "$DEST/$STEM.demo.png"
        rm -rf "$DEST/$STEM.demo" ;;
      smoke)  # the cluster kernel, before anything is timed; compiles csrc/ if checks did not
        if [ "$GPU" = 1 ]; then
          timeout -k 10 "$allowed" "$PY" -m bench.smoke > "$DEST/$STEM.smoke.txt" 2>&1
          rc=$?; cat "$DEST/$STEM.smoke.txt"
          if [ "$rc" = 3 ]; then
            export ZSPA_CUDA_GREEDY=block  # tune, too, then times the block kernel only
            echo "   the cluster kernel failed: the stages below run on the block kernel (ZSPA_CUDA_GREEDY=block)" \
              | tee -a "$DEST/$STEM.smoke.txt"
          elif [ "$rc" != 0 ]; then  # 4: the block kernel fails too; or a crash
            export ZSPA_BENCH_SKIP=cuda ZSPA_BACKEND=triton
            echo "   bench.smoke exit status $rc: the cuda backend fails here; the stages below leave it out" \
              "(ZSPA_BENCH_SKIP=cuda, ZSPA_BACKEND=triton)" | tee -a "$DEST/$STEM.smoke.txt"
          fi
        else echo "   no GPU: nothing to check"; fi ;;
      tune)
        timeout -k 10 "$allowed" "$PY" -m bench.tune --out "$DEST/$STEM.tune-raw.json" | tee "$DEST/$STEM.tune.txt" ;;
      report)
        if [ ! -f "$DEST/$STEM.micro-raw.json" ]; then echo "   no microbenchmark results: nothing to report"; continue; fi
        extra=()
        for kind in e2e demo profile; do
          f="$DEST/$STEM.$kind-raw.json"; [ "$kind" = demo ] && f="$DEST/$STEM.demo.txt"
          [ -f "$f" ] && extra+=("--$kind" "$f")
        done
        [ "$GPU" = 1 ] && extra+=(--auto-table "$DEST/$STEM.auto_cuda.json")  # auto's table, to review and commit
        timeout -k 10 "$allowed" "$PY" -m bench.report --micro "$DEST/$STEM.micro-raw.json" "${extra[@]}" --out "$DEST" \
          --stem "$STEM" && cat "$DEST/$STEM.md" ;;
    esac
    pack
  done
  echo "== done at ${SECONDS}s: $(ls "$DEST" | tr '\n' ' ')"
  summary
}

# Last, so that the tail of the output (all a device call returns inline) holds the verdicts.
summary() {
  local f
  echo "== summary"
  f="$DEST/$STEM.tests.log"; [ -f "$f" ] && grep -E "^== pytest|passed|failed|exit status" "$f" | tail -8
  f="$DEST/$STEM.sanitize.log"; [ -f "$f" ] && grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|not on PATH" "$f"
  f="$DEST/$STEM.md"; [ -f "$f" ] && sed -n '/^## Targets/,/^## Micro/p' "$f" | grep '^|'
  f="$DEST/$STEM.smoke.txt"; [ -f "$f" ] && cat "$f"
  f="$DEST/$STEM.tune.txt"; [ -f "$f" ] && cat "$f"
  return 0
}

# run.log is committed as it comes back: scrubbed as it is written
if [ -n "${OUT:-}" ]; then main "$@" 2>&1 | sed -u "${SCRUB[@]}" | tee "$OUT/run.log"; else main "$@"; fi
