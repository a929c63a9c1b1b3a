"""`blip2-edge quantize`."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from runtime.backends.onnxrt import import_onnxruntime
from runtime.cli.outputs import check_output_file
from runtime.errors import Blip2EdgeError, OptionError, require
from runtime.host_memory import parse_size


def register(sub) -> None:
    from calibration.llm import DEFAULT_BLOCK_SIZE
    from calibration.visual import ACTIVATIONS, TARGETS

    p = sub.add_parser(
        "quantize", help="INT8 visual stages + weight-only LLM, with a fidelity report and gates",
        description="Quantize an artifact directory: static INT8 (QDQ) for the visual stages from calibration "
                    "images, weight-only INT8/INT4 for the LLM decoder. Writes a new artifact directory.")
    p.add_argument("artifacts", type=Path, help="FP32/FP16 artifact directory from 'blip2-edge export'")
    p.add_argument("out_dir", type=Path)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="folder of calibration images (jpg, png, webp, bmp; recursive)")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="N synthetic scenes from the toy generator (sets --num-calib to N)")
    p.add_argument("--visual", choices=("int8", "none"), default="int8",
                   help="int8 (default): static INT8 for the visual stages, calibrated on the images; none: leave "
                        "them as exported (FP32/FP16) and quantize the LLM alone, for an engine that runs float "
                        "visual graphs faster than INT8 ones (OpenVINO bf16 on CPUs with AMX, which --backend auto "
                        "measures; TensorRT FP16). With none, only the held-out images are read")
    p.add_argument("--num-calib", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--held-out", type=int, default=100, help="held-out images for the fidelity report (default 100)")
    p.add_argument("--seed", type=int, default=0, help="image sampling seed")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"), default=None,
                   help="activation range calibration (default minmax)")
    p.add_argument("--percentile", type=float, default=None, help="for --method percentile (default 99.999)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight scales (default: on)")
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="where the artifacts will run. cpu (default): uint8 activations for the visual stages, "
                        "ONNX Runtime's fast x86 kernels (2-2.4x FP32 on the bench model; TensorRT cannot read "
                        "them); gpu: int8 symmetric, for build-engines and ONNX Runtime's CUDA/TensorRT "
                        "providers; portable: the same int8 graphs, which every provider and TensorRT run, but "
                        "slower than FP32 on x86 CPUs. The default is cpu because a CPU user would otherwise "
                        "get the slow form silently, while a GPU user is stopped by build-engines with the "
                        "command to run. Recorded in the manifest")
    p.add_argument("--activations", choices=ACTIVATIONS, default=None,
                   help="explicit activation type of the visual stages (int8: symmetric; uint8: asymmetric); "
                        "default: the --target's. An error if it contradicts --target")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                   help="keep nodes whose names match these glob patterns in float")
    p.add_argument("--llm", choices=("none", "int8", "int4"), default="none", help="weight-only LLM precision")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"weights per MatMulNBits scale (default {DEFAULT_BLOCK_SIZE}; bench/NBITS_RESULTS.md)")
    p.add_argument("--accuracy-level", type=int, default=4)
    p.add_argument("--lm-head", choices=("int8", "float", "same"), default="int8")
    p.add_argument("--embed-fp16", action="store_true", help="store the token embedding table in fp16")
    p.add_argument("--calibration-cache", type=Path, metavar="FILE",
                   help="JSON file of activation ranges: reused when it matches, written otherwise")
    p.add_argument("--no-gate", dest="gate", action="store_false", help="keep the artifacts even if a gate fails")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse up front, writing nothing, when the expected peak memory (printed before loading) "
                        "exceeds SIZE, e.g. 12GB or 11.5GiB; the memory available now is the limit in any case")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a blip2-edge artifact directory (anything else is refused)")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already-quantized input")
    p.set_defaults(run=run)


def check_onnxruntime_quantizer() -> None:
    """quantize reuses calibration ranges through quantize_static's calibration_cache_path, which
    ONNX Runtime's quantizer gained in 2026 (checked with 1.32; 1.21 and 1.22 lack it): an older
    one is one line naming the version, before any calibration."""
    quantization = import_onnxruntime("quantization")
    if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
        raise Blip2EdgeError(f"blip2-edge quantize needs an ONNX Runtime whose quantize_static takes "
                             f"calibration_cache_path (1.32 is checked; this one is "
                             f"{import_onnxruntime().__version__}): pip install -U 'onnxruntime>=1.32'")


# The options that shape the visual stages' INT8 graphs: refused with --visual none, which makes none.
VISUAL_ONLY = ("method", "percentile", "per_channel", "target", "activations", "exclude", "calibration_cache")


def visual_options(args):
    """The VisualOptions of the arguments (defaults where not given), or None for --visual none,
    where an option that only shapes the visual stages' INT8 graphs is one line."""
    from calibration.visual import VisualOptions

    given = {name: getattr(args, name) for name in VISUAL_ONLY if getattr(args, name) not in (None, [])}
    if args.visual == "none":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise OptionError(f"{flags}: {'applies' if len(given) == 1 else 'apply'} to the visual stages' INT8 "
                              "calibration, which --visual none skips")
        return None
    return VisualOptions(**{k: (tuple(v) if k == "exclude" else v) for k, v in given.items()
                            if k != "calibration_cache"})  # the cache is an option of QuantizeOptions


def run(args) -> int:
    require("onnx", "export", "blip2-edge quantize")
    check_onnxruntime_quantizer()
    if args.calibration_cache is not None:  # written after calibration, which it would otherwise lose
        check_output_file("--calibration-cache", args.calibration_cache)
    from calibration.llm import LLMOptions
    from calibration.quantize import QuantizeOptions, quantize

    opts = QuantizeOptions(
        images=args.images,
        num_calib=args.synthetic if args.synthetic is not None else args.num_calib,
        held_out=args.held_out, seed=args.seed,
        visual=visual_options(args),
        llm=LLMOptions(precision=args.llm, block_size=args.block_size, accuracy_level=args.accuracy_level,
                       lm_head=args.lm_head, embed_fp16=args.embed_fp16),
        calibration_cache=args.calibration_cache, gate=args.gate, overwrite=args.overwrite,
        allow_requantize=args.allow_requantize,
        max_memory=None if args.max_memory is None else parse_size(args.max_memory),
    )
    quantize(args.artifacts, args.out_dir, opts)
    return 0
