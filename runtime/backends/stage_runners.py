"""One runner per stage for a backend name: the ONNX Runtime sessions (CPU, CUDA, or its
TensorRT execution provider with explicit profiles) or native TensorRT engines for the visual
stages (TensorRT itself is imported only when an engine is loaded: it needs the tensorrt extra)."""

from __future__ import annotations

from runtime.artifact.manifest import Manifest
from runtime.backends.onnxrt import ThreadSettings, gpu_providers, providers_for, required_provider, stage_runner
from runtime.backends.tensorrt.engines import find_engine, require_tensorrt_readable
from runtime.backends.tensorrt.profiles import pipeline_ranges
from runtime.backends.tensorrt.runner import TrtRunner, device_info
from runtime.errors import OptionError

# onnxruntime: ORT on the CPU or CUDA (by `device`); onnxruntime-trt: ORT with its TensorRT
# execution provider; tensorrt: native engines from `blip2-edge build-engines` for the visual
# stages, the LLM stages on ORT CUDA.
BACKENDS = ("onnxruntime", "onnxruntime-trt", "tensorrt")
VISUAL_STAGES = ("vision", "qformer")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend '{backend}'; valid: {', '.join(BACKENDS)}")


def build_runners(manifest: Manifest, device: str, backend: str, stage_names: tuple[str, ...],
                  threads: ThreadSettings, position_limit: int | None = None) -> dict:
    """stage -> runner. `position_limit`: the family's (queries + prompt + new tokens), which
    bounds the TensorRT provider's profile shapes."""
    check_backend(backend)
    if backend == "onnxruntime":
        providers = providers_for(device, tf32=threads.tf32)
        # --device cuda must really run on CUDA (a missing cuDNN makes ONNX Runtime fall back).
        return {s: stage_runner(manifest.stage_file(s), providers, s, threads, required_provider(device))
                for s in stage_names}
    require_tensorrt_readable(manifest, VISUAL_STAGES)
    if backend == "onnxruntime-trt":
        int8 = any((manifest.stages[s].get("quantization") or {}).get("format") == "QDQ" for s in stage_names)
        fp16 = manifest.stages["decoder"]["precision"] == "fp16"
        # One provider list per stage: each has its own explicit TensorRT profile shapes.
        ranges = pipeline_ranges(manifest.model, position_limit)
        return {s: stage_runner(manifest.stage_file(s),
                                gpu_providers(manifest.root, manifest.stages[s], fp16, int8, ranges, threads.tf32),
                                s, threads, required_provider(device, backend)) for s in stage_names}
    gpu = device_info()  # names the 'tensorrt' extra when it is missing
    runners = {s: TrtRunner(find_engine(manifest, s, gpu), manifest.stages[s]) for s in VISUAL_STAGES}
    # The LLM stages run on ONNX Runtime CUDA (KV cache on the device with I/O binding).
    runners.update({s: stage_runner(manifest.stage_file(s), providers_for("cuda", tf32=threads.tf32), s, threads,
                                    required_provider("cuda", backend))
                    for s in stage_names if s not in VISUAL_STAGES})
    return runners
