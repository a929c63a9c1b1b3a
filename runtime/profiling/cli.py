"""`blip2-edge profile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime import synthetic
from runtime.artifact.memory import weights_line
from runtime.backends.onnxrt import providers_for
from runtime.backends.stage_runners import BACKENDS, PRECISIONS, placement_line
from runtime.cli.generate import (
    add_engine_options,
    add_thread_options,
    expand_images,
    text_argument,
    thread_settings,
)
from runtime.cli.outputs import check_output_file
from runtime.errors import Blip2EdgeError, ImageError, require, require_installed
from runtime.preprocess import load_image
from runtime.profiling import environment, report
from runtime.profiling.machine import machine_line
from runtime.profiling.plot import plot
from runtime.profiling.profiler import ProfileOptions, profile_artifacts, profile_interleaved
from runtime.profiling.reference import time_reference
from runtime.profiling.stats import duration_stats
from runtime.profiling.tegrastats import Sampler


def register(sub) -> None:
    p = sub.add_parser("profile", help="per-stage latency of one or more artifact directories, side by side",
                       description="Profile artifact directories with the pipeline's own stage timings.")
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact directories; ratios are to the first")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="folder of images (recursive)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic scenes (default 8)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt", help="caption prefix (default: plain captioning)")
    p.add_argument("--new-tokens", type=int, default=20, help="forced generated length, so runs compare")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    add_engine_options(p)
    p.add_argument("--backends", type=engines_argument, metavar="B[:P],...",
                   help="side by side on each directory, e.g. onnxruntime,openvino,openvino:bf16,auto (backend, "
                        "optionally :precision for openvino): one pipeline each, interleaved rounds, medians")
    p.add_argument("--reference", metavar="MODEL", help="also time transformers' generate on this checkpoint")
    p.add_argument("--reference-compile", action="store_true", help="torch.compile the reference's LLM")
    add_thread_options(p)
    p.add_argument("--json", type=Path, metavar="F")
    p.add_argument("--csv", type=Path, metavar="F")
    p.add_argument("--trace", type=Path, metavar="F", help="Chrome trace / Perfetto JSON of one run")
    p.add_argument("--plot", type=Path, metavar="F.png")
    p.set_defaults(run=run)


def engines_argument(text: str) -> list[tuple[str, str]]:
    """'onnxruntime,openvino:bf16' -> [("onnxruntime", "f32"), ("openvino", "bf16")]."""
    engines = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        backend, _, precision = item.partition(":")
        if backend not in BACKENDS:
            raise argparse.ArgumentTypeError(f"unknown backend '{backend}'; valid: {', '.join(BACKENDS)}")
        if (precision or "f32") not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"unknown precision '{precision}' in '{item}'; valid: {', '.join(PRECISIONS)}")
        engines.append((backend, precision or "f32"))
    if not engines:
        raise argparse.ArgumentTypeError("expected a comma-separated list of backends")
    if len(set(engines)) != len(engines):
        raise argparse.ArgumentTypeError(f"a backend is named twice in '{text}'")
    return engines


def load_images(args) -> list:
    if args.images is None:
        n = 8 if args.synthetic is None else args.synthetic
        if n < 1:
            raise Blip2EdgeError(f"--synthetic must be >= 1, got {n}")
        return [im for _, im in synthetic.make_scenes(n, seed=0)]
    paths, errors = expand_images([str(args.images)])
    readable = []
    for p in paths:
        try:
            load_image(p)
            readable.append(p)  # profiled from the path, so image decode is timed
        except ImageError:
            pass
    if not readable:
        raise Blip2EdgeError(f"{args.images}: no readable images" + (f" ({errors[0]})" if errors else ""))
    return readable


def run(args) -> int:
    opts = ProfileOptions(batch_size=args.batch_size, new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup,
                          prompt=args.prompt, device=args.device, backend=args.backend, threads=thread_settings(args),
                          precision=args.precision)
    for flag in ("json", "csv", "trace", "plot"):  # checked before the runs, which they would lose
        if getattr(args, flag):
            check_output_file(f"--{flag}", getattr(args, flag))
    if args.plot:
        require("matplotlib", "plot", "--plot")
    if args.reference:
        for module in ("torch", "transformers"):  # run by a child process: checked, not imported
            require_installed(module, "export", "--reference")
    text_argument(args.prompt, "--prompt")
    if "openvino" not in [args.backend, *(b for b, _ in args.backends or ())]:
        providers_for(args.device)  # an unknown or unavailable device fails before any work
    images = load_images(args)
    machine = machine_line()
    print(machine, flush=True)
    with Sampler() as sampler:
        if args.backends:
            profiles = profile_interleaved(args.artifacts, args.backends, images, opts)
        else:
            profiles = [profile_artifacts(path, images, opts) for path in args.artifacts]
    reference = None
    if args.reference:
        reference = time_reference(args.reference, images, opts.batch_size, opts.warmup + opts.runs,
                                   prompt=opts.prompt or "", new_tokens=opts.new_tokens, warmup=opts.warmup,
                                   compile=args.reference_compile)
        reference["end_to_end"] = duration_stats(reference.pop("times"))
    print(report.table(profiles, reference, stat="p50" if args.backends else "mean"))
    for path in dict.fromkeys(p["artifacts"] for p in profiles):  # what each directory's weights take, by stage
        print(f"{Path(path).name}: {weights_line(next(p for p in profiles if p['artifacts'] == path)['weights'])}")
    for p in profiles:  # which engine, device and precision ran each stage (and why there)
        print(f"{p.get('label') or Path(p['artifacts']).name} placement: {placement_line(p['placement'])}")
    env = {**environment.describe(opts.threads, [s for p in profiles for s in p["precision"]]), "machine": machine}
    tegra = sampler.summary()
    if tegra:
        print(f"tegrastats: {tegra}")
    settings = {k: getattr(opts, k)
                for k in ("batch_size", "new_tokens", "runs", "warmup", "prompt", "device", "backend", "precision")}
    settings["backends"] = [list(e) for e in args.backends] if args.backends else None
    if args.json:
        report.to_json(args.json, profiles, env, settings, reference, tegra)
    if args.csv:
        report.to_csv(args.csv, profiles, env, reference)
    if args.trace:
        report.chrome_trace(args.trace, profiles[0])
    if args.plot:
        plot(args.plot, profiles)
    return 0
