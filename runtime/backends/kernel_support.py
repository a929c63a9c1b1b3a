"""Kernels an artifact's graphs need from the installed ONNX Runtime, checked at load, before any
session is built (LoadedArtifact).

8-bit MatMulNBits (`quantize --llm int8`, and the INT8 lm_head that `--lm-head int8`, the
default, gives an INT4 LLM too): ONNX Runtime 1.22 is the first with kernels for it (onnxruntime
PR 24509, release 1.22.0, for CUDA). Before that the CUDA kernel is 4-bit only, and so is the CPU
one: 1.18.1 and 1.21.1 refuse the session ("Only 4b quantization is supported"), 1.22.0 runs it.
So an older ONNX Runtime cannot run such an LLM where it was asked to (at best its lm_head would
run on the CPU with a copy every step). The rule is a pure function of the manifest's stages,
where the LLM runs and the ONNX Runtime version, tested over every case without a GPU.
"""

from __future__ import annotations

import re

from runtime.backends.onnxrt import import_onnxruntime
from runtime.errors import Blip2EdgeError

EIGHT_BIT_NBITS = (1, 22)  # the first ONNX Runtime with 8-bit MatMulNBits kernels (CPU and CUDA)
WEIGHT_ONLY = "MatMulNBits weight-only"  # calibration/llm.py's method in the manifest


def version_tuple(version: str) -> tuple[int, int]:
    """'1.22.0', '1.21.1+cu118', '1.23.0.dev20250501' -> (major, minor); (0, 0) when unreadable."""
    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def eight_bit_stages(stages: dict) -> list[str]:
    """The stages holding 8-bit MatMulNBits weights: an INT8 body, or an INT8 lm_head."""
    found = []
    for name, stage in stages.items():
        q = stage.get("quantization") or {}
        if q.get("method") == WEIGHT_ONLY and (q.get("bits") == 8 or q.get("lm_head") == "int8"):
            found.append(name)
    return found


def llm_provider(device: str, backend: str, available) -> str:
    """The ONNX Runtime provider the LLM stages run on: CUDA under both TensorRT backends
    (MatMulNBits is an ONNX Runtime operator TensorRT does not build, and the tensorrt backend
    runs the LLM on ONNX Runtime CUDA); under onnxruntime, CUDA for --device cuda, and for auto
    where this install has the CUDA provider."""
    if backend != "onnxruntime" or device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available):
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def check_weight_only_kernels(where, stages: dict, device: str, backend: str, ort_version: str, available) -> None:
    """Refuses, in one line naming the version, 8-bit weight-only stages that the installed
    ONNX Runtime (`ort_version`, with its `available` providers) has no kernel for where the LLM
    runs (`device`, `backend`)."""
    eight = eight_bit_stages(stages)
    if not eight or version_tuple(ort_version) >= EIGHT_BIT_NBITS:
        return
    floor = ".".join(map(str, EIGHT_BIT_NBITS))
    if llm_provider(device, backend, available) == "CUDAExecutionProvider":
        where_it_runs, fix = ("CUDA", f"pip install 'onnxruntime-gpu>={floor}' (on a Jetson, NVIDIA's onnxruntime-gpu "
                                      f"{floor} or newer for your JetPack)")
    else:
        where_it_runs, fix = "CPU", f"pip install 'onnxruntime>={floor}'"
    which = f"stage {eight[0]} holds" if len(eight) == 1 else f"stages {', '.join(eight)} hold"
    raise Blip2EdgeError(f"{where}: {which} 8-bit weight-only (MatMulNBits) weights, which ONNX Runtime "
                      f"{ort_version} has no {where_it_runs} kernel for (8-bit arrived in {floor}); {fix}, or quantize "
                      "the export with --llm int4 --lm-head float")


def check_installed_kernels(where, stages: dict, device: str, backend: str) -> None:
    """check_weight_only_kernels against this install's ONNX Runtime."""
    ort = import_onnxruntime()
    check_weight_only_kernels(where, stages, device, backend, ort.__version__, ort.get_available_providers())
