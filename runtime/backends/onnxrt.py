"""ONNX Runtime backend: one InferenceSession per stage graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda", "auto")


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name; `auto` falls back to the CPU with a warning."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
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

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
