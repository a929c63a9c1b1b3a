"""ONNX Runtime backend: one InferenceSession per stage graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError, OptionError

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda", "auto")


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name; `auto` falls back to the CPU with a warning."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise OptionError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise Blip2EdgeError(
            "--device cuda: ONNX Runtime has no CUDA provider here; install 'blip2-edge[gpu]' "
            "(onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --device cpu"
        )
    log.warning("no CUDA execution provider available; running on the CPU")
    return ["CPUExecutionProvider"]


def tensorrt_provider(cache_dir: Path, fp16: bool, int8: bool) -> tuple[str, dict]:
    """ONNX Runtime's TensorRT execution provider, with its engine and timing caches in
    `cache_dir` (keyed by onnxruntime, TensorRT and GPU: engines.ort_trt_cache_dir)."""
    return ("TensorrtExecutionProvider", {
        "trt_fp16_enable": fp16, "trt_int8_enable": int8,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
    })


def gpu_providers(artifacts: Path, fp16: bool, int8: bool) -> list:
    """TensorRT EP first, then CUDA, then CPU for whatever neither takes."""
    import onnxruntime as ort

    from runtime.backends.tensorrt.engines import nvidia_device, ort_trt_cache_dir

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise Blip2EdgeError("backend 'onnxruntime-trt' needs onnxruntime-gpu with its TensorRT provider and "
                             "TensorRT's libraries: pip install 'blip2-edge[gpu]' on a machine with an NVIDIA GPU")
    cache = ort_trt_cache_dir(artifacts, ort.__version__, nvidia_device())
    cache.mkdir(parents=True, exist_ok=True)
    return [tensorrt_provider(cache, fp16, int8), "CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtRunner:
    """Runs one graph. InferenceSession.run is thread-safe, so one runner serves all threads."""

    def __init__(self, path: Path, providers: list[str], intra_op_threads: int = 0):
        import onnxruntime as ort

        so = ort.SessionOptions()
        # Full optimisation: constant folding, LayerNorm/GELU/attention fusions on CPU and CUDA.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = intra_op_threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise Blip2EdgeError(f"{path}: ONNX Runtime cannot load this graph ({' '.join(str(exc).split())[:300]})") from None
        self.path = Path(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device = "cuda" if self.session.get_providers()[0] in gpu else "cpu"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))

    def infer_bound(self, feeds: dict, host_outputs: set[str]) -> dict:
        """Runs with I/O binding: inputs may be numpy arrays or OrtValues already on the device;
        outputs not in `host_outputs` stay on the device as OrtValues (the KV cache, between
        decode steps), the others come back as numpy arrays."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name in host_outputs else self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: (v.numpy() if n in host_outputs else v) for n, v in zip(self.output_names, values)}

    def to_device(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
