#!/usr/bin/env bash
# Validates the TensorRT path on a machine with an NVIDIA GPU, in one call (under 10 minutes):
#   1. what the machine has (blip2-edge doctor, no artifacts);
#   2. the toy model exported, its engines built with a timing cache, and every backend the
#      machine allows compared with the CPU (blip2-edge doctor DIR --build-engines);
#   3. the tests marked `gpu` (real engines: batch 1, the profile maximum and a split batch
#      against ONNX Runtime on the CPU, captions equal, 4 threads on 2 contexts, closed runners,
#      a timing cache from elsewhere, INT8 from QDQ graphs, the ORT TensorRT EP's profiles).
# Needs this repository's runtime + export + dev dependencies, onnxruntime-gpu and TensorRT 10.3+
# with cuda-python 12.x in the Python it runs (PYTHON, default python3). Results go to $OUT
# (default /tmp/blip2-gpu-check); the exit status is the first failing step's.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/blip2-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
step() {  # step NAME TIMEOUT COMMAND...: runs it, logs to $OUT/NAME.log, remembers the first failure
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
cat "$OUT/nvidia-smi.csv"
step environment 30 "$PY" -m runtime.cli doctor --json "$OUT/environment.json"
rm -rf "$OUT/toy"
# the concat KV cache: fp32 on CUDA and the TensorRT provider run that form (docs/export.md)
step export 90 "$PY" -m runtime.cli export toy "$OUT/toy" --kv-cache concat
step doctor 200 "$PY" -m runtime.cli doctor "$OUT/toy" --build-engines --json "$OUT/doctor.json"
step gpu-tests 270 "$PY" -m pytest -q -rs -m gpu --junitxml "$OUT/gpu-tests.xml" \
    tests/runtime/test_tensorrt_gpu.py tests/runtime/test_tensorrt.py tests/runtime/test_devices.py
echo "gpu_check: exit $status (logs and reports in $OUT)"
exit $status
