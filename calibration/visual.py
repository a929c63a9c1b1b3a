"""Static INT8 quantization of the visual stages, in QDQ form.

QDQ (QuantizeLinear/DequantizeLinear pairs around float ops) is what ONNX Runtime's CPU and GPU
providers and TensorRT's explicit quantization all consume. Only the weight-bearing MatMul /
Gemm / Conv nodes are quantized; LayerNorm, Softmax, GELU, residual adds and the activation x
activation attention MatMuls stay in float. Weights are int8, symmetric, per channel.

Activations follow the target, where the artifacts will run (TARGETS):
- "cpu" -> "uint8": asymmetric per tensor. ONNX Runtime's x86 kernels are built around u8 x s8
  products (VPMADDUBSW / VNNI): on this project's Xeon the ViT-B vision stage ran in 43 ms with
  uint8 activations, 105 ms with int8 and 130 ms in FP32. TensorRT refuses it. The default: the
  other form is slower than FP32 on a CPU, while a GPU user is stopped by build-engines with the
  command to run instead.
- "gpu", "portable" -> "int8": symmetric per tensor, zero point 0. TensorRT's explicit
  quantization accepts only this, and every ONNX Runtime provider runs it (slowly on x86 CPUs).

Biases follow the target too (VisualOptions.quantize_bias). ONNX Runtime's quantizer by default
stores a Conv/Gemm bias as INT32 behind a DequantizeLinear: its CPU kernels fuse that into
QLinearConv, so the "cpu" target keeps it. TensorRT's IDequantizeLayer takes INT8/FP8/INT4 only
(NvInfer.h 10.3 and 11; onnxruntime issues 14229 and 17738, onnx-tensorrt 850), so for "gpu" and
"portable" the bias stays in float ("QuantizeBias": False, the option's name in onnxruntime 1.18
through 1.32; NVIDIA's ModelOpt sets the same for TensorRT): every DequantizeLinear then reads
int8 with zero point 0. Weights are per channel on the output-channel axis, onnxruntime's default
for each op and what TensorRT expects: Conv [Cout, Cin, kh, kw] axis 0, MatMul [K, N] axis 1,
Gemm axis 0 with transB=1 ([N, K]) else 1 (onnxruntime's operators/{conv,matmul,gemm}.py).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from calibration.memory import CALIB_BATCH
from calibration.sources import ImageSource
from runtime.artifact.atomic_file import replace_file
from runtime.artifact.manifest import graph_digest
from runtime.backends.onnxrt import OrtRunner
from runtime.cli.progress import Progress
from runtime.errors import Blip2EdgeError, OptionError
from runtime.preprocess import Preprocessing

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")
TARGETS = {"cpu": "uint8", "gpu": "int8", "portable": "int8"}  # target -> activations
DEFAULT_TARGET = "cpu"
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class VisualOptions:
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    # Either, both or neither: the one not given follows the other (activations alone: uint8 ->
    # cpu, int8 -> portable); neither gives DEFAULT_TARGET; a contradicting pair is an error.
    activations: str | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise Blip2EdgeError(f"unknown calibration method '{self.method}'; valid: {', '.join(METHODS)}")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise OptionError(f"unknown --activations '{self.activations}'; valid: {', '.join(ACTIVATIONS)}")
        if self.target is not None and self.target not in TARGETS:
            raise OptionError(f"unknown --target '{self.target}'; valid: {', '.join(TARGETS)}")
        target, activations = self.target, self.activations
        if target is None:
            target = DEFAULT_TARGET if activations is None else ("cpu" if activations == "uint8" else "portable")
        if activations is None:
            activations = TARGETS[target]
        if activations != TARGETS[target]:
            raise OptionError(f"--activations {activations} contradicts --target {target}, which uses "
                              f"{TARGETS[target]} activations; drop one of the two")
        object.__setattr__(self, "target", target)  # frozen: resolved once, here
        object.__setattr__(self, "activations", activations)
        if not 90.0 <= self.percentile <= 100.0:  # also refuses NaN
            raise Blip2EdgeError(f"--percentile must be in [90, 100], got {self.percentile}")

    @property
    def symmetric(self) -> bool:
        return self.activations == "int8"

    @property
    def quantize_bias(self) -> bool:
        """INT32 biases behind a DequantizeLinear (ORT's CPU kernels fuse them into QLinearConv)
        for the "cpu" target only: TensorRT cannot dequantize INT32, so "gpu" and "portable"
        keep biases in float."""
        return self.target == "cpu"

    def extra_options(self) -> dict:
        """quantize_static's extra_options for these settings."""
        return {"ActivationSymmetric": self.symmetric, "WeightSymmetric": True, "QuantizeBias": self.quantize_bias}

    def describe(self) -> dict:
        """The stage settings recorded in the manifest."""
        return {"target": self.target,
                "weights": "int8 symmetric per-channel" if self.per_channel else "int8 symmetric per-tensor",
                "activations": f"{self.activations} {'symmetric' if self.symmetric else 'asymmetric'} per-tensor",
                "bias": "int32" if self.quantize_bias else "float",
                "tensorrt_compatible": self.symmetric and not self.quantize_bias}


def weight_nodes(model_path: Path, exclude: tuple[str, ...]) -> list[str]:
    """Nodes of WEIGHT_OPS with a constant weight, minus those matching an --exclude pattern."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    chosen = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and any(i in constants for i in node.input[1:2]):
            if not any(fnmatch.fnmatch(node.name, pat) for pat in exclude):
                chosen.append(node.name)
    return chosen


class _OneBatch:
    """A CalibrationDataReader holding a single batch."""

    def __init__(self, batch: dict):
        self._batch = batch

    def get_next(self):
        batch, self._batch = self._batch, None
        return batch


def stage_inputs(stage: str, source: ImageSource, preprocessing: Preprocessing, source_vision: OrtRunner,
                 float_dtype, qformer_feeds: Callable[[np.ndarray], dict] | None = None,
                 batch: int = CALIB_BATCH) -> Iterator[dict]:
    """Calibration inputs for a stage: pixel batches for vision; for the Q-Former, the source
    artifacts' vision stage's outputs on the same images (FP32/FP16, or already quantized with
    --allow-requantize), computed batch by batch, made into the Q-Former's feeds by
    `qformer_feeds` (InstructBLIP's adds instructions; default: the image embeddings alone)."""
    for images in source.calibration_batches(batch):
        pixels = preprocessing.batch(images).astype(float_dtype)
        if stage == "vision":
            yield {"pixel_values": pixels}
        else:
            embeds = source_vision.infer({"pixel_values": pixels})["image_embeds"]
            yield qformer_feeds(embeds) if qformer_feeds else {"image_embeds": embeds}


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def calibrate(stage: str, src: Path, source: ImageSource, preprocessing: Preprocessing, source_vision: OrtRunner,
              float_dtype, opts: VisualOptions, cache_file: Path, workdir: Path,
              qformer_feeds: Callable[[np.ndarray], dict] | None = None, batch: int = CALIB_BATCH) -> None:
    """Collects activation ranges one batch at a time and saves them in ONNX Runtime's cache format.

    Memory stays bounded: each collect_data call folds its batch into the running ranges (MinMax)
    or histograms (entropy, percentile) and drops the intermediate tensors. (quantize_static's
    own CalibMaxIntermediateOutputs is not used: in onnxruntime 1.32 it discards the collected
    batches instead of merging them.)"""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        src, list(WEIGHT_OPS), augmented_model_path=str(workdir / f"{stage}.augmented.onnx"),
        calibrate_method=_ort_method(opts.method), use_external_data_format=_has_external_data(src),
        providers=["CPUExecutionProvider"], extra_options={"symmetric": opts.symmetric, "percentile": opts.percentile},
    )
    progress = Progress(f"calibrating {stage}", len(source.calibration))
    for feeds in stage_inputs(stage, source, preprocessing, source_vision, float_dtype, qformer_feeds, batch):
        calibrator.collect_data(_OneBatch(feeds))
        progress.advance(next(iter(feeds.values())).shape[0])
    save_tensors_data(calibrator.compute_data(), cache_file)


class _NoPreprocessingHint(logging.Filter):
    """quantize_static suggests ORT's shape-inference pre-pass on every call; our graphs come
    straight from the exporter with shapes, and the hint is noise on the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


logging.getLogger().addFilter(_NoPreprocessingHint())


def _has_external_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()


# DequantizeLinear/QuantizeLinear take float16 scales from opset 19 on (ONNX's operator changelog:
# T2 gained float16 and bfloat16 in version 19). onnxruntime's quantizer gives a float16 graph's
# Q/DQ pairs float16 scales, which opset 17 (the export's default) refuses at load.
FLOAT16_QDQ_OPSET = 19


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def qdq_input(src: Path, float_dtype):
    """What quantize_static reads: `src` itself, or for a float16 graph below FLOAT16_QDQ_OPSET
    the graph converted to that opset by onnx's version converter (which rewrites the ops whose
    definition changed; the weights are read into the converted proto afterwards, so the converter
    never serializes them). TensorRT 10 and every ONNX Runtime provider parse opset 19."""
    if np.dtype(float_dtype) != np.float16 or graph_opset(src) >= FLOAT16_QDQ_OPSET:
        return str(src)
    import onnx
    from onnx import external_data_helper, version_converter

    model = version_converter.convert_version(onnx.load(str(src), load_external_data=False), FLOAT16_QDQ_OPSET)
    external_data_helper.load_external_data_for_model(model, str(src.parent))
    return model


def write_qdq(src, dst: Path, nodes: list[str], opts: VisualOptions, cache_file: Path,
              external_data: bool) -> None:
    """The QDQ graph of `src` (a path or ModelProto) with `nodes` quantized, from the activation
    ranges in `cache_file`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        src, str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHT_OPS),
        nodes_to_quantize=nodes, per_channel=opts.per_channel,
        activation_type=QuantType.QInt8 if opts.symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=_ort_method(opts.method),
        use_external_data_format=external_data, calibration_cache_path=str(cache_file),
        extra_options=opts.extra_options(),
    )


def quantize_stage(stage: str, src: Path, dst: Path, source: ImageSource, preprocessing: Preprocessing,
                   source_vision: OrtRunner, float_dtype, opts: VisualOptions, cache: "RangeCache",
                   qformer_feeds: Callable[[np.ndarray], dict] | None = None, batch: int = CALIB_BATCH) -> dict:
    """Calibrates (or reuses cached ranges) and writes `dst`; returns the stage's settings.
    `batch`: images per calibration batch (calibration.memory.vision_calibration_batch)."""
    nodes = weight_nodes(src, opts.exclude)
    if not nodes:
        raise Blip2EdgeError(f"{stage}: nothing left to quantize after --exclude {' '.join(opts.exclude)}")
    graph_sha = graph_digest(src)
    with tempfile.TemporaryDirectory() as tmp:
        cache_file = cache.extract(stage, graph_sha, opts, Path(tmp) / f"{stage}.json")
        if not cache_file.exists():
            calibrate(stage, src, source, preprocessing, source_vision, float_dtype, opts, cache_file, Path(tmp),
                      qformer_feeds, batch)
        write_qdq(qdq_input(src, float_dtype), dst, nodes, opts, cache_file, _has_external_data(src))
        cache.store(stage, graph_sha, opts, cache_file)
    return {"quantized_nodes": len(nodes), "op_types": list(WEIGHT_OPS)}


class RangeCache:
    """Activation ranges per stage in one JSON file, reusable across runs.

    Each entry is tied to the digest of the graph it was computed on (weights included), to the
    method, and to the images that produced it (ImageSource.calibration_identity), so ranges from
    other images, another method or another graph are recomputed rather than silently reused
    while the manifest records the current source."""

    def __init__(self, path: Path | None, images: dict):
        self.path = Path(path) if path else None
        self.images = images
        self.data = self._read(self.path) if self.path else {}
        self.reused: list[str] = []

    @staticmethod
    def _read(path: Path) -> dict:
        if not os.path.lexists(path):
            return {}
        fix = "delete it (the ranges are recomputed) or pass another --calibration-cache"
        if not path.is_file():  # a FIFO or a device would block or never end
            raise Blip2EdgeError(f"{path}: calibration cache is not a regular file; {fix}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise Blip2EdgeError(f"{path}: unreadable calibration cache ({str(exc).splitlines()[0]}); {fix}") from None
        if not (isinstance(data, dict) and all(isinstance(e, dict) and isinstance(e.get("ranges"), dict)
                                               for e in data.values())):
            raise Blip2EdgeError(f"{path}: not a calibration cache written by blip2-edge quantize; {fix}")
        return data

    def _key(self, opts: VisualOptions) -> str:
        """Ranges depend on the method (and percentile) and on symmetry, not on anything else."""
        return f"{opts.method}:{opts.percentile if opts.method == 'percentile' else ''}:{opts.activations}"

    def extract(self, stage: str, graph_sha: str, opts: VisualOptions, tmp_file: Path) -> Path:
        """Writes the stage's cached ranges to `tmp_file` when they match; returns its path."""
        entry = self.data.get(stage)
        if (entry and entry.get("graph_sha256") == graph_sha and entry.get("method") == self._key(opts)
                and entry.get("images") == self.images):
            tmp_file.write_text(json.dumps(entry["ranges"]))
            self.reused.append(stage)
        return tmp_file

    def store(self, stage: str, graph_sha: str, opts: VisualOptions, tmp_file: Path) -> None:
        self.data[stage] = {"graph_sha256": graph_sha, "method": self._key(opts), "images": self.images,
                            "ranges": json.loads(tmp_file.read_text())}
        if self.path:  # written whole and renamed: a reader never sees half a file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(self.path, json.dumps(self.data).encode())
