"""Building TensorRT engines from the artifact graphs: strongly typed networks only.

Precision comes from the graph's own types, never from builder flags: an FP16 export gives an
FP16 engine, a QDQ graph from `blip2-edge quantize --target gpu` gives explicit INT8 where its
Q/DQ pairs are, FP32 elsewhere. That is the one mode TensorRT 11 has (it removed
BuilderFlag.FP16/INT8, OBEY_PRECISION_CONSTRAINTS, layer.precision and set_output_type) and the
STRONGLY_TYPED flag gives the same on TensorRT 10. Nothing is pinned to FP32 by the builder:
INormalizationLayer accumulates in FP32 already, and pinning adds reformat layers.

TF32 is the one precision choice left to the builder (BuilderFlag.TF32, in 10.3 and 11.x, valid
on strongly typed networks): TensorRT allows it by default, so FP32 matrix products and
convolutions round their inputs to 10-bit mantissas on Ampere and newer. `BuildOptions.tf32`
keeps that default; False (build-engines --no-tf32) clears the flag, for full FP32 engines whose
outputs a comparison with the CPU can demand token for token.

Written against the Python bindings of TensorRT 10.3 and 11.0 (python/src/infer/pyCore.cpp):
Builder.create_network, OnnxParser.parse_from_file, IBuilderConfig.set_memory_pool_limit /
builder_optimization_level / progress_monitor / create_timing_cache / set_timing_cache (returns
a bool) / get_timing_cache (may be None), IOptimizationProfile.set_shape,
IBuilderConfig.set_flag / clear_flag, Builder.build_serialized_network (None on failure). Not run on this project's machines.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.tensorrt.profiles import ProfileRanges, stage_profile
from runtime.backends.tensorrt.versions import import_tensorrt, tensorrt_major, trt_logger
from runtime.errors import Blip2EdgeError, OptionError

MAX_CONTEXTS = 8


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class BuildOptions:
    workspace_mb: int = 2048
    ranges: ProfileRanges = ProfileRanges()
    timing_cache: Path | None = None
    optimization_level: int = 3
    # Identical optimization profiles, one per execution context the runner may use at once
    # (TensorRT requires a profile per concurrently used context).
    contexts: int = 1
    # FP32 layers may use TF32 (TensorRT's default); False: full FP32.
    tf32: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise OptionError(f"--builder-optimization-level must be 0-5, got {self.optimization_level}")
        if self.workspace_mb < 64:
            raise OptionError(f"--workspace must be >= 64 MB, got {self.workspace_mb}")
        if not 1 <= self.contexts <= MAX_CONTEXTS:
            raise OptionError(f"--contexts must be 1-{MAX_CONTEXTS}, got {self.contexts}")

    def flags(self) -> dict:
        return {"strongly_typed": True, "workspace_mb": self.workspace_mb,
                "optimization_level": self.optimization_level, "contexts": self.contexts, "tf32": self.tf32}


def network_flags(trt) -> int:
    """Strongly typed: TensorRT 11 always is (its STRONGLY_TYPED flag is deprecated and
    ignored); TensorRT 10 needs the flag (and without it, 10.x means explicit batch)."""
    if tensorrt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def set_tf32(config, trt, tf32: bool) -> None:
    """Sets or clears BuilderFlag.TF32 explicitly, so that engines.json's `tf32` is what the
    engine was built with whatever a TensorRT version's default."""
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)


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


def attach_timing_cache(config, cache_bytes: bytes, where: Path | None, warn=_stderr) -> None:
    """Gives the builder the timing cache read from `where` (empty: a new one). A cache that
    TensorRT refuses (another TensorRT version or GPU: set_timing_cache returns False, or
    create_timing_cache returns None for a damaged file) is replaced by a new, empty one with a
    warning: the build goes on, only slower."""
    cache = config.create_timing_cache(cache_bytes)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if cache_bytes:
        warn(f"warning: timing cache {where} was written by another TensorRT or GPU (or is damaged); "
             "starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise Blip2EdgeError("TensorRT refused a new, empty timing cache")


def serialized_timing_cache(config, warn=_stderr) -> bytes | None:
    """The timing cache after a build, or None with a warning: never an exception, so a
    finished engine is never lost to its cache."""
    cache = config.get_timing_cache()
    if cache is None:
        warn("warning: TensorRT returned no timing cache after the build; the engine is kept, the cache is not saved")
        return None
    try:
        return bytes(cache.serialize())
    except Exception as exc:  # noqa: BLE001  (any binding error: the engine matters more)
        warn(f"warning: the timing cache could not be serialised ({exc}); the engine is kept")
        return None


@dataclass(frozen=True)
class BuiltEngine:
    engine: bytes
    timing_cache: bytes | None  # to save after the engine, when a cache file was asked for


def build_engine(onnx_path: Path, stage: dict, opts: BuildOptions) -> BuiltEngine:
    """Parses the graph and returns the serialized engine (and the updated timing cache)."""
    trt = import_tensorrt("blip2-edge build-engines")
    logger = trt_logger(trt)  # the process's one logger (TensorRT ignores a second one)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves <graph>.onnx.data beside the file
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise Blip2EdgeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.optimization_level
    set_tf32(config, trt, opts.tf32)
    config.progress_monitor = _progress_monitor(trt)
    shapes = stage_profile(stage, opts.ranges)
    for _ in range(opts.contexts):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    cache_bytes = b""
    if opts.timing_cache and opts.timing_cache.is_file():
        cache_bytes = opts.timing_cache.read_bytes()
    attach_timing_cache(config, cache_bytes, opts.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Blip2EdgeError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    engine = bytes(serialized)
    return BuiltEngine(engine, serialized_timing_cache(config) if opts.timing_cache else None)
