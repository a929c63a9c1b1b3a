"""One runner per stage for a backend name: the ONNX Runtime sessions (CPU, CUDA, or its
TensorRT execution provider with explicit profiles), native TensorRT engines for the visual
stages (TensorRT itself is imported only when an engine is loaded: it needs the tensorrt extra),
or OpenVINO for every stage it can run (the openvino extra), the others on ONNX Runtime's CPU.

Each stage's placement (engine, device, precision, threads, and why a stage is not where the
backend would put it) is returned beside the runners: mixing engines is normal, never silent."""

from __future__ import annotations

from runtime.artifact.manifest import Manifest, artifact_digest
from runtime.backends import openvino_cache
from runtime.backends.onnxrt import gpu_providers, providers_for, required_provider, stage_runner
from runtime.backends.openvino import (
    OpenVinoCannotRunError,
    OpenVinoRunner,
    check_device,
    check_precision,
    import_openvino,
    openvino_version,
    ov_device,
)
from runtime.backends.tensorrt.engines import find_engine, require_tensorrt_readable
from runtime.backends.tensorrt.profiles import pipeline_ranges
from runtime.backends.tensorrt.runner import TrtRunner, device_info
from runtime.backends.threads import ThreadSettings
from runtime.errors import OptionError
from runtime.stages import kv_cache_form

# onnxruntime: ORT on the CPU or CUDA (by `device`); onnxruntime-trt: ORT with its TensorRT
# execution provider; tensorrt: native engines from `blip2-edge build-engines` for the visual
# stages, the LLM stages on ORT CUDA; openvino: OpenVINO (CPU, or an Intel GPU / NPU by `device`)
# for every stage it runs, the others on ORT's CPU.
# auto: on the CPU with the openvino extra, each stage on the engine and precision measured
# fastest at the artifact's fidelity (runtime.backends.auto); elsewhere the same as onnxruntime.
BACKENDS = ("onnxruntime", "onnxruntime-trt", "tensorrt", "openvino", "auto")
VISUAL_STAGES = ("vision", "qformer")
PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's inference precision; ONNX Runtime runs the graph's own
SHARED_KV_REASON = ("its shared KV cache (GroupQueryAttention) is updated in place in buffers bound by ONNX "
                    "Runtime; re-export with --kv-cache concat to run the decoder on OpenVINO")


def check_backend(backend: str, precision: str = "f32") -> None:
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision != "f32" and backend == "auto":
        raise OptionError(f"--precision {precision}: --backend auto chooses each stage's precision itself (bf16 only "
                          f"where it is native and within the fidelity gate); ask for it by name with --backend "
                          f"openvino --precision {precision}")
    if precision != "f32" and backend != "openvino":
        raise OptionError(f"--precision {precision} is OpenVINO's inference precision: it needs --backend openvino "
                          f"(--backend {backend} runs each graph in the precision it was exported in)")


def placement_of(runner, reason: str | None = None) -> dict:
    """What a stage runs on: engine, device, precision (OpenVINO's) and threads; `reason` says
    why it is not on the engine its backend names."""
    describe = getattr(runner, "describe", None)
    if describe is not None:
        where = describe()
    elif hasattr(runner, "session"):
        where = {"engine": "onnxruntime", "device": runner.session.get_providers()[0]}
    else:
        where = {"engine": "tensorrt", "device": "cuda"}
    return {**where, **({"reason": reason} if reason else {})}


def placement_line(placement: dict) -> str:
    """One line: 'vision: openvino CPU bf16; decoder: onnxruntime CPUExecutionProvider (why)'."""
    return "; ".join(f"{stage}: {' '.join(str(p[k]) for k in ('engine', 'device', 'precision') if k in p)}"
                     + (f" ({p['reason']})" if "reason" in p else "") for stage, p in placement.items())


def openvino_unfit(manifest: Manifest, stage: str) -> str | None:
    """Why a stage stays on ONNX Runtime under --backend openvino before OpenVINO is asked to
    read it, or None. (A graph OpenVINO cannot read says so when it is compiled.)"""
    if stage == "decoder" and kv_cache_form(manifest.model) == "shared":
        return SHARED_KV_REASON
    return None


def openvino_stage_runner(manifest: Manifest, stage: str, device: str, precision: str,
                          threads: ThreadSettings, cache: bool = True) -> OpenVinoRunner:
    """One stage compiled by OpenVINO on `device` (OpenVINO's name) at `precision`, its ports
    named as the manifest names them, with the thread policy's count and pinning
    (ThreadSettings); OpenVinoCannotRunError when OpenVINO cannot read it. cache: keep and reuse
    the compiled blobs (openvino_cache) in the user's cache directory."""
    def directory(config: dict):
        return openvino_cache.stage_cache_dir(artifact_digest(manifest.data), stage, device, precision,
                                              openvino_version(), config)

    return OpenVinoRunner(manifest.stage_file(stage), device, precision, threads.intra_op_threads,
                          tuple(t["name"] for t in manifest.stages[stage]["inputs"]),
                          tuple(t["name"] for t in manifest.stages[stage]["outputs"]),
                          threads.openvino_pinning, directory if cache and openvino_cache.limit() else None)


def ort_cpu_runner(manifest: Manifest, stage: str, threads: ThreadSettings):
    """One stage on ONNX Runtime's CPU provider, with its thread settings."""
    return stage_runner(manifest.stage_file(stage), providers_for("cpu"), stage, threads)


def openvino_runners(manifest: Manifest, device: str, stage_names: tuple[str, ...], threads: ThreadSettings,
                     precision: str) -> tuple[dict, dict]:
    """OpenVINO runners for the stages it can run, ONNX Runtime CPU sessions for the others;
    the precision and device are checked before anything is compiled."""
    import_openvino()  # names the extra when it is missing
    name = ov_device(device)
    check_precision(precision, name)
    check_device(name)
    runners, placement = {}, {}
    for s in stage_names:
        reason = openvino_unfit(manifest, s)
        if reason is None:
            try:
                runners[s] = openvino_stage_runner(manifest, s, name, precision, threads)
                placement[s] = placement_of(runners[s])
                continue
            except OpenVinoCannotRunError as exc:
                reason = str(exc)
        runners[s] = ort_cpu_runner(manifest, s, threads)
        placement[s] = placement_of(runners[s], reason)
    return runners, placement


def build_runners(manifest: Manifest, device: str, backend: str, stage_names: tuple[str, ...],
                  threads: ThreadSettings, position_limit: int | None = None,
                  precision: str = "f32") -> tuple[dict, dict]:
    """(stage -> runner, stage -> placement_of). `position_limit`: the family's (queries +
    prompt + new tokens), which bounds the TensorRT provider's profile shapes. `precision`:
    OpenVINO's (--backend openvino only)."""
    check_backend(backend, precision)
    if backend == "openvino":
        return openvino_runners(manifest, device, stage_names, threads, precision)
    runners = _runners(manifest, device, backend, stage_names, threads, position_limit)
    return runners, {s: placement_of(r) for s, r in runners.items()}


def _runners(manifest: Manifest, device: str, backend: str, stage_names: tuple[str, ...],
             threads: ThreadSettings, position_limit: int | None) -> dict:
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
