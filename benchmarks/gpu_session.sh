#!/usr/bin/env bash
# One GPU session in two calls of at most 6 minutes each, for a lent H100/H200 without network (torch with CUDA,
# Triton, nvcc; no rasterio or lmdb):
#
#   bash benchmarks/gpu_session.sh 1          # device facts, ceilings, extension build (ninja, in the background),
#                                             # kernel correctness tests (fixed tiles), CUDA crop_resize tests, the
#                                             # CUDA-graph step tests; spare time: crop_resize and the
#                                             # uncompiled train-step rows of the baselines
#   bash benchmarks/gpu_session.sh 2          # the benchmarks: attention, InfoNCE, crop_resize, train step of the
#                                             # paper's model (base, small), compiled rows of the baselines
#   bash benchmarks/gpu_session.sh --dry-run  # every stage of both calls on the CPU at tiny sizes (make test runs it)
#
# Everything goes to $OUT (default runs/gpu/), written as it happens: session.log (every command and its output),
# stages.csv (stage, exit code, seconds, budget), facts.json (device, versions, measured ceilings), autotune.log
# (the autotuner's choices), and per benchmark one CSV to which each row is appended the moment it is measured, so
# a stage killed at its time limit keeps every row before it. Each stage has a budget (seconds): a benchmark skips
# the rows it has no time left for and records them as skipped, and `timeout` stops a stage that overruns.
# The A/B switches of the kernels and of the step are measured next to the defaults in the same run (each
# benchmark's AB_VARIANTS). Environment: PYTHON (default python3), SESSION_S (seconds per call, default 345).
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:-}
case $call in
    1 | 2 | --dry-run) ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
dry=0
[ "$call" = --dry-run ] && dry=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
session_s=${SESSION_S:-345}
log="$out/session.log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
selections=()

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} BENCH_OUT=$out
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
dry_flag=()
if [ $dry = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    dry_flag=(--dry-run)
fi
[ -f "$out/stages.csv" ] || echo "call,stage,exit,seconds,budget_s,started" >"$out/stages.csv"

say() { echo "== $* [$(date +%T), ${SECONDS}s]" | tee -a "$log"; }

left() { echo $((session_s - SECONDS)); }

budget_for() {  # budget_for PLANNED_S RESERVE_S: the planned seconds, or what is left after the reserve
    local planned=$1 reserve=$2 rest
    rest=$(($(left) - reserve))
    [ "$rest" -lt "$planned" ] && planned=$rest
    [ "$planned" -lt 0 ] && planned=0
    echo "$planned"
}

stage() {  # stage NAME BUDGET_S GRACE_S CMD...: CMD under a timeout of budget + grace (never past the call's end)
    local name=$1 budget=$2 grace=$3 start=$SECONDS rc limit
    shift 3
    limit=$((budget + grace))
    [ "$limit" -le "$(($(left) - 5))" ] || limit=$(($(left) - 5))
    if [ "$budget" -le 5 ] || [ "$limit" -le 5 ]; then
        say "$name skipped: no time left"
        echo "$call,$name,skipped,0,$budget,$(date +%T)" >>"$out/stages.csv"
        return 0
    fi
    say "$name (budget ${budget}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$work/stage.out" 2>&1 &
    local pid=$!
    tail -n +1 --pid=$pid -f "$work/stage.out" | tee -a "$log"
    wait $pid
    rc=$?
    extract_autotune "$work/stage.out"
    echo "$call,$name,$rc,$((SECONDS - start)),$budget,$(date +%T)" >>"$out/stages.csv"
    [ "$rc" -eq 0 ] || { say "$name exited $rc"; status=1; }
    return 0
}

extract_autotune() {  # the autotuner's 4-line reports and the benchmarks' AUTOTUNE lines, into autotune.log
    awk '/^Triton autotuning for function/{grab=1} grab{printf "%s ", $0} /best config selected/{print ""; grab=0}
         /^AUTOTUNE /{print}' "$1" >>"$out/autotune.log"
}

build_start() {  # the extension, in the background: its log joins session.log when build_wait collects it
    if [ $dry = 1 ]; then
        "$py" benchmarks/build_extension.py --check >"$work/build.log" 2>&1 &
    elif ls mmfuse_fast/_C.*.so >/dev/null 2>&1 && "$py" -c "import torch, mmfuse_fast._C" >/dev/null 2>&1; then
        echo "extension already built" >"$work/build.log" &
    else
        (timeout 420 "$py" benchmarks/build_extension.py || MAX_JOBS=${MAX_JOBS:-16} timeout 300 \
            "$py" setup.py -q build_ext --inplace) >"$work/build.log" 2>&1 &
    fi
    build_pid=$!
    build_started=$SECONDS
}

build_wait() {  # build_wait MAX_S: waits for the build at most MAX_S seconds, then goes on without it
    local rc waited=0
    while kill -0 "$build_pid" 2>/dev/null && [ "$waited" -lt "$1" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$build_pid" 2>/dev/null; then
        say "extension build still running after $((SECONDS - build_started))s: going on without it"
        echo "$call,build_extension,running,$((SECONDS - build_started)),420,$(date +%T)" >>"$out/stages.csv"
        status=1
        return 0
    fi
    wait "$build_pid"
    rc=$?
    say "extension build finished (exit $rc, $((SECONDS - build_started))s since start)"
    tail -n 40 "$work/build.log" | tee -a "$log"
    echo "$call,build_extension,$rc,$((SECONDS - build_started)),420,$(date +%T)" >>"$out/stages.csv"
    [ "$rc" -eq 0 ] || status=1
}

pytest_stage() {  # pytest_stage NAME BUDGET ARGS...: the tests, for real; the dry run only collects them
    local name=$1 budget=$2
    shift 2
    if [ $dry = 1 ]; then
        selections+=("$(printf '%q ' "$@")")
        return 0
    fi
    stage "$name" "$budget" 0 env PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" "$py" -m pytest -q -rfEs \
        -p no:cacheprovider -p _pytest_fixed_tiles "$@"
}

bench() {  # bench NAME BUDGET SCRIPT ARGS...: the script skips rows past its budget; the grace covers start-up and
    local name=$1 budget=$2 script=$3  # the row under way when the budget runs out
    shift 3
    stage "$name" "$budget" 40 "$py" "benchmarks/$script" --budget "$budget" "${dry_flag[@]}" "$@"
}

# The selections: the kernels' tests compiled for real (edge cases, opcheck, torch.compile and bf16 included; the
# compile-only checks for other archs and the multi-process test left out), the CUDA crop_resize tests (with the CPU
# ones of the same file, seconds), the engine's CUDA-graph step tests and its overlapped input copy.
KERNEL_TESTS=(tests/ops/test_modality_attention.py tests/ops/test_modality_attention_variants.py
              tests/ops/test_infonce.py -k "not compile_for_hopper and not autotune_pruning and not distributed")
EXTENSION_TESTS=(tests/ops/test_crop_resize.py)
GRAPH_STEP_TESTS=(tests/engine/test_engine_fast_step.py tests/ops/test_staged_input_copy.py
                  -k "cuda_graph or on_cuda or input_copy")
BASELINES=(satvit fus_mae dino_mm)

call1() {
    build_start
    bench device_facts "$(budget_for 20 300)" bench_device.py
    pytest_stage kernel_tests "$(budget_for 170 150)" "${KERNEL_TESTS[@]}"
    build_wait "$(budget_for 120 150)"
    pytest_stage extension_tests "$(budget_for 45 110)" "${EXTENSION_TESTS[@]}"
    pytest_stage graph_step_tests "$(budget_for 120 10)" "${GRAPH_STEP_TESTS[@]}"
    [ $dry = 0 ] || stage test_selections 300 0 "$py" benchmarks/collect_tests.py "${selections[@]}"
    # spare time: crop_resize (seconds) and the uncompiled train-step rows of the baselines, which call 2 leaves out
    bench crop_resize "$(budget_for 20 40)" bench_crop_resize.py
    bench train_step_baselines "$(budget_for 120 15)" bench_train_step.py --models "${BASELINES[@]}" \
        --variants reference,engine
}

call2() {  # in the dry run without the stages that repeat call 1's code (the CPU's minutes are few too)
    [ $dry = 1 ] || build_start
    [ $dry = 1 ] || bench device_facts "$(budget_for 20 300)" bench_device.py
    bench attention "$(budget_for 95 210)" bench_modality_attention.py
    bench infonce "$(budget_for 45 140)" bench_infonce.py
    [ $dry = 1 ] || build_wait "$(budget_for 60 150)"
    [ $dry = 1 ] || bench crop_resize "$(budget_for 20 120)" bench_crop_resize.py
    bench train_step "$(budget_for 400 25)" bench_train_step.py --models mmfuse
    [ $dry = 1 ] || bench train_step_baselines "$(budget_for 400 15)" bench_train_step.py \
        --models "${BASELINES[@]}" --variants stock,engine+compile
}

say "gpu_session call $call: out=$out python=$py budget=${session_s}s"
if [ $dry = 1 ]; then
    session_s=100000
    call=1 call1
    call=2 call2
else
    call$call
fi
say "gpu_session call $call done in ${SECONDS}s, status $status; files: $(ls "$out" | tr '\n' ' ')"
exit $status
