"""Building TensorRT engines from the artifact graphs with TensorRT 10's Python API.

Not run on this project's machines (no GPU with TensorRT): kept small, written against the
documented API (Builder, OnnxParser, IBuilderConfig, IOptimizationProfile, IProgressMonitor).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.tensorrt.profiles import ProfileRanges, stage_profile
from runtime.errors import Blip2EdgeError, OptionError, require

HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    int8: bool = False  # explicit quantization: the QDQ graphs written by `blip2-edge quantize`
    workspace_mb: int = 2048
    ranges: ProfileRanges = ProfileRanges()
    timing_cache: Path | None = None
    optimization_level: int = 3
    version_compatible: bool = False
    hardware_compatibility: str = "none"

    def __post_init__(self) -> None:
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise OptionError(f"unknown --hardware-compatibility '{self.hardware_compatibility}'; "
                              f"valid: {', '.join(HARDWARE_COMPATIBILITY)}")
        if not 0 <= self.optimization_level <= 5:
            raise OptionError(f"--builder-optimization-level must be 0-5, got {self.optimization_level}")
        if self.workspace_mb < 64:
            raise OptionError(f"--workspace must be >= 64 MB, got {self.workspace_mb}")

    def flags(self) -> dict:
        return {"fp16": self.fp16, "int8": self.int8, "workspace_mb": self.workspace_mb,
                "optimization_level": self.optimization_level, "version_compatible": self.version_compatible,
                "hardware_compatibility": self.hardware_compatibility}


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        """Prints the builder's phases to stderr, so a 10-minute Orin build is not silent."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            sys.stderr.write(f"  [{phase_name}] {num_steps} steps\n")

        def step_complete(self, phase_name, step):
            return True  # True = keep building

        def phase_finish(self, phase_name):
            pass

    return Progress()


def build_engine(onnx_path: Path, stage: dict, opts: BuildOptions) -> bytes:
    """Parses the graph and returns the serialized engine."""
    trt = require("tensorrt", "tensorrt", "blip2-edge build-engines")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves <graph>.onnx.data beside the file
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise Blip2EdgeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_COMPATIBILITY[opts.hardware_compatibility])
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.int8:
        config.set_flag(trt.BuilderFlag.INT8)  # with Q/DQ in the graph, scales come from the graph
    if opts.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        # LayerNorm and Softmax overflow in FP16 on ViTs: pin them (and their outputs) to FP32.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    config.progress_monitor = _progress_monitor(trt)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in stage_profile(stage, opts.ranges).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_bytes = opts.timing_cache.read_bytes() if opts.timing_cache and opts.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Blip2EdgeError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    if opts.timing_cache:
        opts.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)
