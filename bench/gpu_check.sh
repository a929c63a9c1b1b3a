#!/usr/bin/env bash
# The GPU check, in one command of under 10 minutes. Two modes:
#
#   bench/gpu_check.sh          the lent machine: one H100/H200 with torch and CUDA, but no TensorRT,
#                               no onnxruntime-gpu, no network, and only what the working tree carries.
#                               It prints one line per capability (torch CUDA, ONNX Runtime providers,
#                               TensorRT, cuda-python, ...), runs what torch alone can prove there
#                               (bench/gpu_torch_check.py: the exporter's stage wrappers of every LLM
#                               family in fp16 on the GPU against fp32, overflow margins, an fp16
#                               export's graphs against them, what TF32 changes) and lists what it
#                               could not prove. A machine without Pillow or onnx: carry them, see
#                               "Preparing" below.
#   bench/gpu_check.sh --full   your device (a Jetson with JetPack 6.1+, or a desktop GPU) with
#                               TensorRT 10.3+, cuda-python 12.x and onnxruntime-gpu: doctor, the toy
#                               exported with the concat KV cache, doctor DIR --build-engines (every
#                               backend against the CPU, TF32 off), and the tests marked gpu (real
#                               engines at batch 1, the profile maximum and a split batch, captions
#                               equal to the CPU's, 4 threads on 2 contexts, closed runners, a
#                               timing cache from elsewhere, INT8 engines from QDQ graphs, the ONNX
#                               Runtime TensorRT provider's profiles and engine cache).
#
# Both need this repository's runtime + export + dev dependencies in the Python it runs (PYTHON,
# default python3). Work goes to a temporary directory, removed at the end; at most 8 small files
# (logs, summary.json) go to $OUT when it is set, else they stay in a temporary folder named at the end.
#
# Exit status: 0 when something was tested on the GPU and nothing failed; the first failing step's
# status; 3 with "nothing was tested on the GPU" when every GPU test skipped (never 0).
#
# Preparing a lent machine that lacks onnx or Pillow (both modes print which it lacks), here:
#   python -m bench.gpu_torch_check --prepare        # the fp16 toys, exported into bench/.gpu_check/
#   pip install --target bench/.gpu_check/site --only-binary=:all: --python-version 3.X pillow
# and carry bench/.gpu_check with the working tree (it is git-ignored; this script puts
# bench/.gpu_check/site on PYTHONPATH when it exists).
set -u
cd "$(dirname "$0")/.."
MODE=torch
case "${1:-}" in
    "") ;;
    --full) MODE=full ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bench/gpu_check.sh [--full]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; else OUT=$(mktemp -d /tmp/blip2-gpu-check.XXXXXX); fi
WORK=$(mktemp -d /tmp/blip2-gpu-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d bench/.gpu_check/site ]; then export PYTHONPATH=$PYTHONPATH:$PWD/bench/.gpu_check/site; fi
# The hash cache and anything else written under the user's cache go to the work directory.
export XDG_CACHE_HOME=$WORK/cache

STEPS=()
step() {  # step NAME TIMEOUT COMMAND...: runs it, logs to $OUT/NAME.log, prints its tail, records its status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    if [ $rc -eq 124 ]; then echo "== $name: timed out after ${limit}s"; fi
    echo "== $name: exit $rc"
    STEPS+=("--step" "$name=$rc")
}

torch_mode() {
    # One line per capability first, then the checks; the Python decides the exit status.
    timeout 560 "$PY" -m bench.gpu_torch_check --device cuda --budget 420 --work "$WORK" \
        --json "$OUT/summary.json" 2>"$OUT/torch-check.log"
    local status=$?
    if [ $status -eq 124 ]; then echo "gpu_check: the torch checks timed out (see $OUT/torch-check.log)"; fi
    if [ $status -eq 3 ]; then echo "gpu_check: nothing was tested on the GPU"; fi
    echo "gpu_check: exit $status (logs and summary.json in $OUT)"
    return $status
}

full_mode() {
    "$PY" -m bench.gpu_torch_check --capabilities
    step environment 60 "$PY" -m runtime.cli doctor
    # the concat KV cache: fp32 on CUDA and the TensorRT provider run that form (docs/export.md)
    step export 90 "$PY" -m runtime.cli export toy "$WORK/toy" --kv-cache concat
    step doctor 200 "$PY" -m runtime.cli doctor "$WORK/toy" --build-engines --json "$OUT/doctor.json"
    # The tests compare with the CPU token for token: TF32 off for the whole process too (the TensorRT
    # provider has no option of its own, and TensorRT may read the variable once, when it loads).
    step gpu-tests 270 env NVIDIA_TF32_OVERRIDE="${NVIDIA_TF32_OVERRIDE:-0}" "$PY" -m pytest -q -rs -m gpu \
        -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" \
        tests/runtime/test_tensorrt_gpu.py tests/runtime/test_tensorrt.py tests/runtime/test_devices.py
    "$PY" -m bench.gpu_check_report --junit "$OUT/gpu-tests.xml" --doctor "$OUT/doctor.json" "${STEPS[@]}" \
        --json "$OUT/summary.json"
    local status=$?
    echo "gpu_check: exit $status (logs and reports in $OUT)"
    return $status
}

main() {
    echo "gpu_check ($MODE mode), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 \
            | sed 's/^/nvidia-smi: /'
    else
        echo "nvidia-smi: not found"
    fi
    if [ "$MODE" = torch ]; then torch_mode; else full_mode; fi
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
