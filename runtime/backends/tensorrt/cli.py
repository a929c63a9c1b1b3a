"""`blip2-edge build-engines`: TensorRT engines for an artifact directory, on the device."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from runtime.errors import Blip2EdgeError, require

STAGES = ("vision", "qformer", "encoder", "cross_kv", "decoder")  # every family's; a manifest has some


def register(sub) -> None:
    p = sub.add_parser("build-engines", help="build TensorRT engines on this device",
                       description="Build TensorRT engines from an artifact directory's graphs, on the device that "
                                   "will run them (never copy engines between machines).")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels (LayerNorm/Softmax stay FP32)")
    p.add_argument("--int8", action="store_true", help="explicit INT8 from the QDQ graphs of 'blip2-edge quantize'")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["vision", "qformer"],
                   help="default: the visual stages (the decoder runs well on ONNX Runtime CUDA)")
    # encoder-seq: an encoder-decoder's input length (queries + prompt), for Flan-T5's LLM stages;
    # instruction: InstructBLIP's instruction length in Q-Former tokens, for its qformer stage.
    for dim, (lo, opt, hi) in (("batch", (1, 1, 4)), ("seq", (1, 1, 64)), ("past", (0, 64, 256)),
                               ("encoder-seq", (1, 40, 128)), ("instruction", (1, 16, 64))):
        for kind, value in (("min", lo), ("opt", opt), ("max", hi)):
            p.add_argument(f"--{kind}-{dim}", type=int, default=value)
    p.add_argument("--workspace", type=int, default=2048, metavar="MB", help="builder workspace (Orin Nano: 1024)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE")
    p.add_argument("--builder-optimization-level", type=int, default=3)
    p.add_argument("--version-compatible", action="store_true")
    p.add_argument("--hardware-compatibility", choices=("none", "ampere+", "same-cc"), default="none")
    p.add_argument("--rebuild-stale", action="store_true", help="keep current engines, rebuild only stale ones")
    p.set_defaults(run=run)


def build_options(args):
    from runtime.backends.tensorrt.builder import BuildOptions
    from runtime.backends.tensorrt.profiles import ProfileRanges, Range

    ranges = ProfileRanges(batch=Range(args.min_batch, args.opt_batch, args.max_batch, "--min/opt/max-batch"),
                           sequence=Range(args.min_seq, args.opt_seq, args.max_seq, "--min/opt/max-seq"),
                           past=Range(args.min_past, args.opt_past, args.max_past, "--min/opt/max-past"),
                           encoder=Range(args.min_encoder_seq, args.opt_encoder_seq, args.max_encoder_seq,
                                         "--min/opt/max-encoder-seq"),
                           instruction=Range(args.min_instruction, args.opt_instruction, args.max_instruction,
                                             "--min/opt/max-instruction"))
    return BuildOptions(fp16=args.fp16, int8=args.int8, workspace_mb=args.workspace, ranges=ranges,
                        timing_cache=args.timing_cache, optimization_level=args.builder_optimization_level,
                        version_compatible=args.version_compatible, hardware_compatibility=args.hardware_compatibility)


def check_int8_graphs(manifest, stages, int8: bool) -> None:
    from runtime.backends.tensorrt.engines import GPU_READY_COMMAND, require_tensorrt_readable

    for stage in stages:
        manifest.stage_file(stage)  # a stage this family lacks (OPT has no encoder) is an ArtifactError
        q = manifest.stages[stage].get("quantization") or {}
        if int8 and stage in ("vision", "qformer") and q.get("format") != "QDQ":
            raise Blip2EdgeError(f"--int8 needs QDQ graphs: stage '{stage}' of {manifest.root} is not quantized; "
                                 f"run '{GPU_READY_COMMAND}' first (the implicit INT8 calibrators are deprecated)")
    require_tensorrt_readable(manifest, stages)


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
    from runtime.manifest import load_manifest

    manifest = load_manifest(args.artifacts)
    check_int8_graphs(manifest, args.stages, args.int8)
    require("tensorrt", "tensorrt", "blip2-edge build-engines")
    from runtime.backends.tensorrt.builder import build_engine
    from runtime.backends.tensorrt.profiles import stage_profile
    from runtime.atomic_file import replace_file
    from runtime.backends.tensorrt.engines import (StaleEngineError, engine_dir, find_engine, source_graph_sha,
                                                   write_engine_manifest)
    from runtime.backends.tensorrt.runner import device_info
    from runtime.confinement import confined_path

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
        data = build_engine(manifest.stage_file(stage), manifest.stages[stage], opts)
        replace_file(directory / engine_file, data)
        entries[stage] = {"engine": engine_file, "engine_sha256": hashlib.sha256(data).hexdigest(),
                          "source_graph": manifest.stages[stage]["file"],
                          "source_graph_sha256": source_graph_sha(manifest, stage),
                          "flags": opts.flags(),
                          "profile": {k: [list(s) for s in v]
                                      for k, v in stage_profile(manifest.stages[stage], opts.ranges).items()}}
        write_engine_manifest(directory, device, entries)
        print(f"  {stage}: {directory / engine_file} ({len(data) / 1e6:.1f} MB)")
    return 0
