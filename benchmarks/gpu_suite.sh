#!/usr/bin/env bash
# Every check that needs a GPU, for a machine with CUDA torch, Triton and nvcc but no network (the lent H100/H200
# machines: their torch is not the 2.13.0 pinned for the CPU, and lmdb/rasterio are absent, so the data tests that
# import them are left out). Stages run in the order given, each under its own time limit, so that the whole fits
# one 10-minute device call once the extension is built:
#
#   bash benchmarks/gpu_suite.sh build tests         # CUDA extension, then the @pytest.mark.gpu tests
#   bash benchmarks/gpu_suite.sh bench               # the GPU benchmarks (append to benchmarks/results/*.csv)
#
# Everything is logged to $OUT/suite.log (OUT defaults to runs/gpu); the result CSVs are copied there at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log="$out/suite.log"
status=0

run() {  # run LIMIT_SECONDS CMD...: logs the command and its output, remembers a failure, goes on
    local limit=$1
    shift
    echo "== $* ($(date +%T), limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== exit $rc: $*" | tee -a "$log"; status=1; }
}

build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
    run 60 "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    MAX_JOBS=${MAX_JOBS:-16} run 420 "$py" setup.py -q build_ext --inplace
    run 60 "$py" -c "import torch, mmfuse_fast._C; print('extension ops:', torch.ops.mmfuse.crop_resize)"
}

tests() {
    run 480 "$py" -m pytest -m gpu -q -ra -p no:cacheprovider --continue-on-collection-errors \
        tests/ops tests/models tests/engine
}

bench() {
    run 150 "$py" benchmarks/bench_crop_resize.py --device cuda --backward
    run 150 "$py" benchmarks/bench_infonce.py --device cuda
    run 150 "$py" benchmarks/bench_modality_attention.py --full
    run 240 "$py" benchmarks/bench_train_step.py --device cuda --scales tiny small base --batch-size 64
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build tests)
for stage in "${stages[@]}"; do
    case $stage in
        build | tests | bench) $stage ;;
        *) echo "unknown stage '$stage' (build, tests, bench)" >&2; exit 2 ;;
    esac
done
cp benchmarks/results/*.csv "$out/" 2>/dev/null
exit $status
