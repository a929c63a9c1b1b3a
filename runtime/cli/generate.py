"""`blip2-edge caption` and `blip2-edge ask`."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import warnings
from pathlib import Path

from runtime.artifact.verified_files import file_kind
from runtime.backends.stage_runners import BACKENDS, PRECISIONS
from runtime.errors import ImageError, OptionError
from runtime.images import IMAGE_SUFFIXES


def _integer(text: str) -> int:
    """An integer argument; integral float notation ("1e9") is read as the integer it names, so
    that a limit check, not the parser, explains what is wrong with it."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the artifact's manifest, else transformers')")
    g.add_argument("--max-new-tokens", type=_integer)
    g.add_argument("--min-new-tokens", type=_integer)
    g.add_argument("--num-beams", type=_integer)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--early-stopping", choices=("true", "false", "never"))
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=_integer)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=_integer)
    g.add_argument("--repetition-penalty", type=float)


BACKEND_HELP = ("auto (default): on the CPU with the openvino extra, each stage on the engine and precision a short "
                "measurement (cached) finds fastest at the fidelity gate, else onnxruntime; onnxruntime; "
                "onnxruntime-trt (its TensorRT provider); tensorrt (engines from build-engines for the visual stages); "
                "openvino (every stage OpenVINO runs; the openvino extra)")


def add_engine_options(p: argparse.ArgumentParser, backends: tuple[str, ...] | None = None) -> None:
    """--device, --backend and --precision (caption, ask, profile)."""
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or auto (default: cpu); under --backend openvino: cpu, gpu or npu (Intel)")
    p.add_argument("--backend", default="auto", choices=backends or BACKENDS, help=BACKEND_HELP)
    p.add_argument("--precision", default="f32", choices=PRECISIONS,
                   help="OpenVINO's inference precision (--backend openvino): f32 (default), bf16 (CPUs with "
                        "AVX-512 BF16 or AMX), f16; refused in one line where the device lacks it")


def placement_notes(artifact) -> list[str]:
    """One line per stage that is not on the engine its backend names, and why. Under auto
    every stage is where it was chosen to be: its reasons are for doctor and profile."""
    if artifact.backend == "auto":
        return []
    return [f"note: {stage} runs on {p['engine']} ({p['device']}): {p['reason']}"
            for stage, p in artifact.placement.items() if "reason" in p]


def add_thread_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("threads (ONNX Runtime; --intra-op-threads is OpenVINO's too)")
    g.add_argument("--spin", choices=("auto", "on", "off"), default="auto",
                   help="intra-op threads spinning. auto (default): only the decoder's, whose steps follow each "
                        "other, and only until a step returns, so no stage's threads take the cores from the next "
                        "stage (on either engine); on: every stage, lingering after a run (ONNX Runtime's "
                        "default); off: none")
    g.add_argument("--intra-op-threads", type=_integer, default=0, metavar="N",
                   help="threads per stage, on ONNX Runtime and OpenVINO alike (default 0: each engine's own, one "
                        "per physical core)")
    g.add_argument("--no-tf32", action="store_true",
                   help="on CUDA, full FP32 in FP32 graphs: ONNX Runtime otherwise lets matrix products use TF32 on "
                        "Ampere and newer (faster, inputs rounded to 10-bit mantissas)")


def thread_settings(args):
    from runtime.backends.threads import ThreadSettings

    if args.intra_op_threads < 0:
        raise OptionError(f"--intra-op-threads must be >= 0, got {args.intra_op_threads}")
    return ThreadSettings(spin=args.spin, intra_op_threads=args.intra_op_threads, tf32=not args.no_tf32)


def generation_kwargs(args) -> dict:
    names = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "do_sample", "temperature",
             "top_k", "top_p", "seed", "repetition_penalty")
    kw = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.early_stopping is not None:
        kw["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return kw


def register(sub) -> None:
    for name, helptext in (("caption", "caption images"), ("ask", "answer a question about images")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("artifacts", help="artifact directory written by 'blip2-edge export'")
        p.add_argument("images", nargs="+", help="image files, directories (recursive) or glob patterns")
        if name == "ask":
            p.add_argument("--question", "-q", required=True)
        else:
            p.add_argument("--prompt", help="caption prefix, e.g. 'a photo of'")
        p.add_argument("--batch-size", type=int, default=1)
        add_engine_options(p)
        p.add_argument("--stream", action="store_true", help="print text as it is generated (batch size 1)")
        p.add_argument("--json", action="store_true", help="one JSON object per image")
        p.add_argument("--max-image-pixels", type=_integer, metavar="N", default=None,
                       help="refuse image files over N pixels before decoding them (default: 8192x8192)")
        add_generation_options(p)
        add_thread_options(p)
        p.set_defaults(run=run_naming_flags, mode=name)


def run_naming_flags(args) -> int:
    """run(), with a bad generation option reported by its flag (--max-new-tokens)."""
    from runtime.generation.options import GenerationOptionError

    try:
        return run(args)
    except GenerationOptionError as exc:
        raise exc.as_flag() from None


def expand_images(items: list[str]) -> tuple[list[str], list[str]]:
    """Files, directories and globs -> (image paths in a stable order, error lines)."""
    paths, errors = [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{item}: no images in this directory")
            paths += found
        elif p.is_file():
            paths.append(item)
        elif os.path.exists(item):  # a FIFO or a device: never read as an image
            errors.append(f"{item}: not an image file but {file_kind(os.stat(item).st_mode)}")
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                errors.append(f"{item}: no files match")
            paths += found
        else:
            errors.append(f"{item}: no such file or directory")
    return paths, errors


def text_argument(value: str | None, flag: str) -> str | None:
    """A text option as typed: bytes that are not valid in the locale's encoding reach Python as
    lone surrogates, which no tokenizer can encode; refuse them in one line."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(value).decode("ascii", "backslashreplace")
            raise OptionError(f"{flag}: not valid text in this terminal's encoding ({raw})") from None
    return value


def run(args) -> int:
    from PIL import Image

    from runtime.pipeline import Blip2Pipeline
    from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels

    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and args.json:
        raise OptionError("--stream prints text as it is generated and --json one object per image: choose one")
    if args.stream and args.batch_size > 1:
        raise OptionError("--stream runs one image at a time: leave out --batch-size")
    max_pixels = check_max_pixels(
        DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels, "--max-image-pixels")
    # --max-image-pixels is the check here; Pillow's own warning above 89 Mpx would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    text_argument(getattr(args, "question", None), "--question")
    text_argument(getattr(args, "prompt", None), "--prompt")
    paths, errors = expand_images(args.images)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    pipe = Blip2Pipeline.from_artifacts(args.artifacts, device=args.device, backend=args.backend,
                                        threads=thread_settings(args), precision=args.precision)
    for note in placement_notes(pipe.artifact):
        print(note, file=sys.stderr)
    gen = generation_kwargs(args)
    pipe.options(**gen)  # invalid options fail before any work
    failed = len(errors) + _answer_files(pipe, paths, args, gen, max_pixels)
    return 2 if failed else 0


def _answer_files(pipe, paths: list[str], args, gen: dict, max_pixels: int) -> int:
    """Captions or answers each file, in batches of --batch-size (one by one when streaming),
    printing each result as it comes; returns the number of files that could not be read."""
    prompt = pipe.vqa_prompt(args.question) if args.mode == "ask" else pipe.caption_prompt(args.prompt)
    question = args.question if args.mode == "ask" else None
    batch: list[tuple[str, object]] = []
    failed = 0

    def flush() -> None:
        if batch:
            results = pipe.generate([im for _, im in batch], [prompt] * len(batch), **gen)
            for (path, _), result in zip(batch, results):
                _print_result(path, result, args.json)
            batch.clear()

    for path in paths:
        try:
            # Shrunk to the model's size as soon as it is decoded: a batch holds small images only.
            image = pipe.preprocessing.load(path, max_pixels)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.stream:
            print(f"{path}: ", end="", flush=True)
            for piece in pipe.stream(image, prompt=getattr(args, "prompt", None), question=question, **gen):
                print(piece, end="", flush=True)
            print()
            continue
        batch.append((path, image))
        if len(batch) == args.batch_size:
            flush()
    flush()
    return failed


def _print_result(path: str, result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"path": path, "text": result.text, "tokens": result.tokens, "timings": result.timings}))
    else:
        print(f"{path}: {result.text}")
    sys.stdout.flush()
