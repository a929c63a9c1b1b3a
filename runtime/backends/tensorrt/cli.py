"""`blip2-edge build-engines`: TensorRT engines for an artifact directory, on the device."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from runtime.cli.outputs import check_output_file
from runtime.errors import Blip2EdgeError

STAGES = ("vision", "qformer", "encoder", "cross_kv", "decoder")  # every family's; a manifest has some
# The stages the tensorrt backend runs as engines (runtime.pipeline.VISUAL_STAGES).
ENGINE_STAGES = ("vision", "qformer")


def register(sub) -> None:
    p = sub.add_parser("build-engines", help="build TensorRT engines on this device",
                       description="Build TensorRT engines from an artifact directory's graphs, on the device that "
                                   "will run them (never copy engines between machines).")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--fp16", action="store_true",
                   help="require FP16 graphs (engines are strongly typed: they run in the graph's own types; "
                        "export with --dtype fp16)")
    p.add_argument("--int8", action="store_true", help="require the QDQ graphs of 'blip2-edge quantize --target gpu' "
                                                       "(explicit INT8)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(ENGINE_STAGES),
                   help="the visual stages (the only ones the tensorrt backend runs as engines; the LLM stages run "
                        "on ONNX Runtime CUDA, or TensorRT through --backend onnxruntime-trt)")
    # The visual stages' one dynamic dim (the LLM stages' ranges are the ORT TensorRT EP's, from
    # profiles.ProfileRanges).
    for kind, value in (("min", 1), ("opt", 1), ("max", 4)):
        p.add_argument(f"--{kind}-batch", type=int, default=value,
                       help="larger batches are split into batches of --max-batch" if kind == "max" else None)
    # InstructBLIP's instruction-aware Q-Former: the instruction's length in Q-Former tokens.
    for kind, value in (("min", 1), ("opt", 16), ("max", 64)):
        p.add_argument(f"--{kind}-instruction", type=int, default=value)
    p.add_argument("--workspace", type=int, default=2048, metavar="MB", help="builder workspace (Orin Nano: 1024)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="read and update this timing cache (one written by another TensorRT or GPU is replaced)")
    p.add_argument("--builder-optimization-level", type=int, default=3)
    p.add_argument("--contexts", type=int, default=1,
                   help="execution contexts the runner may use at once (one optimization profile each); threads "
                        "beyond this wait their turn")
    p.add_argument("--no-tf32", action="store_true",
                   help="full FP32 in FP32 layers: TensorRT otherwise lets them use TF32 on Ampere and newer (faster, "
                        "inputs rounded to 10-bit mantissas), so an FP32 engine's captions may differ from the CPU's")
    p.add_argument("--rebuild-stale", action="store_true", help="keep current engines, rebuild only stale ones")
    p.set_defaults(run=run)


def build_options(args):
    from runtime.backends.tensorrt.builder import BuildOptions
    from runtime.backends.tensorrt.profiles import ProfileRanges, Range

    ranges = ProfileRanges(batch=Range(args.min_batch, args.opt_batch, args.max_batch, "--min/opt/max-batch"),
                           instruction=Range(args.min_instruction, args.opt_instruction, args.max_instruction,
                                             "--min/opt/max-instruction"))
    return BuildOptions(workspace_mb=args.workspace, ranges=ranges, timing_cache=args.timing_cache,
                        optimization_level=args.builder_optimization_level, contexts=args.contexts,
                        tf32=not args.no_tf32)


def check_stages(manifest, stages, fp16: bool, int8: bool) -> None:
    """Refuses, before TensorRT is needed, what would build an engine nothing loads or a graph
    TensorRT cannot read, and graphs whose types are not the precision asked for."""
    from runtime.backends.tensorrt.engines import GPU_READY_COMMAND, require_tensorrt_readable

    others = [s for s in stages if s not in ENGINE_STAGES]
    if others:
        raise Blip2EdgeError(
            f"--stages {' '.join(others)}: the tensorrt backend runs only {' and '.join(ENGINE_STAGES)} as engines "
            "(an LLM stage's engine would never be loaded, and a weight-only quantized decoder's MatMulNBits is an "
            "ONNX Runtime operator TensorRT cannot parse); for TensorRT in the LLM stages use --backend onnxruntime-trt")
    for stage in stages:
        manifest.stage_file(stage)  # a stage this family lacks is an ArtifactError
    require_tensorrt_readable(manifest, stages)  # CPU-quantized graphs: the command that makes GPU ones
    for stage in stages:
        spec = manifest.stages[stage]
        q = spec.get("quantization") or {}
        if int8 and q.get("format") != "QDQ":
            raise Blip2EdgeError(f"--int8 needs QDQ graphs: stage '{stage}' of {manifest.root} is not quantized; "
                                 f"run '{GPU_READY_COMMAND}' first (TensorRT reads INT8 from the graph's Q/DQ pairs)")
        floats = {t["dtype"] for t in spec["inputs"] if t["dtype"].startswith("float")}
        if fp16 and floats != {"float16"}:
            raise Blip2EdgeError(
                f"--fp16: stage '{stage}' of {manifest.root} is a {'/'.join(sorted(floats)) or 'non-float'} graph, and "
                "TensorRT engines are strongly typed (they run in the graph's own types): export an FP16 artifact "
                "with 'blip2-edge export MODEL OUT --dtype fp16' and build from that")


def graph_precision(spec: dict) -> str:
    """What an engine built from this stage's graph computes in, for engines.json and the log."""
    floats = sorted({t["dtype"] for t in spec["inputs"] if t["dtype"].startswith("float")})
    base = {"float16": "fp16", "float32": "fp32"}.get(floats[0], floats[0]) if len(floats) == 1 else "mixed"
    q = spec.get("quantization") or {}
    return f"int8-qdq+{base}" if q.get("format") == "QDQ" else base


def current_entries(directory: Path) -> dict:
    """The engines.json entries to keep (the other stages' engines). None when there is no
    engines.json or it is not a valid one, which the build then replaces: it is read as a
    bounded regular file only, so a FIFO or a device there never hangs the build."""
    from runtime.backends.tensorrt.engines import ENGINE_MANIFEST, read_engine_manifest

    if not os.path.lexists(directory / ENGINE_MANIFEST):
        return {}
    try:
        return read_engine_manifest(directory / ENGINE_MANIFEST)["engines"]
    except Blip2EdgeError as exc:
        print(f"  starting a new {ENGINE_MANIFEST}: {exc}")
        return {}


def run(args) -> int:
    opts = build_options(args)  # bad ranges or levels fail before TensorRT is needed
    if opts.timing_cache is not None:
        check_output_file("--timing-cache", opts.timing_cache)
    from runtime.artifact.manifest import load_manifest

    manifest = load_manifest(args.artifacts)
    check_stages(manifest, args.stages, args.fp16, args.int8)
    from runtime.backends.tensorrt.versions import import_tensorrt

    import_tensorrt("blip2-edge build-engines")  # missing or unsupported: one line naming what to install
    from runtime.artifact.atomic_file import replace_file
    from runtime.artifact.confinement import confined_path
    from runtime.backends.tensorrt.builder import build_engine
    from runtime.backends.tensorrt.engines import (
        StaleEngineError,
        engine_dir,
        find_engine,
        source_graph_sha,
        write_engine_manifest,
    )
    from runtime.backends.tensorrt.profiles import stage_profile
    from runtime.backends.tensorrt.runner import device_info

    device = device_info()
    # Written inside the artifact directory only, whatever symlinks it holds.
    directory = confined_path(manifest.root, f"engines/{engine_dir(manifest.root, device).name}",
                              "engine directory", manifest.root)
    directory.mkdir(parents=True, exist_ok=True)
    entries = current_entries(directory)
    for stage in args.stages:
        if args.rebuild_stale:
            try:
                find_engine(manifest, stage, device)
                print(f"  {stage}: engine is current")
                continue
            except StaleEngineError as exc:
                print(f"  {stage}: rebuilding ({exc})")
        engine_file = f"{stage}.engine"
        spec = manifest.stages[stage]
        built = build_engine(manifest.stage_file(stage), spec, opts)
        data = built.engine
        # The engine first: a timing cache that cannot be written never costs the build.
        replace_file(directory / engine_file, data)
        entries[stage] = {"engine": engine_file, "engine_sha256": hashlib.sha256(data).hexdigest(),
                          "source_graph": spec["file"], "source_graph_sha256": source_graph_sha(manifest, stage),
                          "precision": graph_precision(spec), "flags": opts.flags(),
                          "profile": {k: [list(s) for s in v] for k, v in stage_profile(spec, opts.ranges).items()}}
        write_engine_manifest(directory, device, entries)
        print(f"  {stage}: {directory / engine_file} ({len(data) / 1e6:.1f} MB, {graph_precision(spec)})")
        save_timing_cache(opts.timing_cache, built.timing_cache)
    return 0


def save_timing_cache(path: Path | None, data: bytes | None) -> None:
    """Writes the builder's timing cache; a failure is a warning (the engine is written already)."""
    from runtime.artifact.atomic_file import replace_file

    if path is None or data is None:
        return
    try:
        replace_file(path, data)
    except OSError as exc:
        print(f"warning: timing cache {path} not saved ({exc.strerror}); the engine is kept", file=sys.stderr)
