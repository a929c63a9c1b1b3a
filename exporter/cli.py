"""`blip2-edge export`, `make-model` and `demo`: the commands that need the 'export' extra."""

from __future__ import annotations

from pathlib import Path

from exporter.random_models import RELEASED, SIZES
from runtime.errors import require
from runtime.host_memory import parse_size

TOY = "toy"  # the embedded default model (OPT decoder)
TOY_T5 = "toy-t5"  # the embedded toy with a Flan-T5-style encoder-decoder
TOY_INSTRUCTBLIP = "toy-instructblip"  # the embedded toy InstructBLIP with a Vicuna-style LLaMA decoder
TOY_RETRIEVAL = "toy-retrieval"  # the embedded toy retrieval model (ITC/ITM heads, no LLM)


def _need_export_extra(what: str) -> None:
    for module in ("torch", "transformers", "onnx"):
        require(module, "export", what)


def register(sub) -> None:
    p = sub.add_parser("export", help="BLIP-2 checkpoint -> validated ONNX artifact directory",
                       description="Export a BLIP-2 or InstructBLIP checkpoint (OPT, Flan-T5 or LLaMA/Vicuna), or a "
                                   "Blip2ForImageTextRetrieval such as Salesforce/blip2-itm-vit-g, to ONNX graphs, "
                                   "validated against PyTorch.")
    p.add_argument("model", help=f"hub id, local checkpoint directory, or '{TOY}' / '{TOY_T5}' / '{TOY_INSTRUCTBLIP}' / "
                                 f"'{TOY_RETRIEVAL}' for the embedded toy models (OPT / Flan-T5 / InstructBLIP with "
                                 "LLaMA / retrieval)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default 17); refused up front outside what torch writes and onnxruntime runs")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--atol", type=float, help="max abs diff allowed per stage output, times the output's largest "
                   "magnitude where that exceeds 1 (default 1e-4 fp32, 2e-2 fp16)")
    p.add_argument("--kv-cache", choices=("auto", "shared", "concat"), default="auto",
                   help="how the OPT/LLaMA decoder keeps its KV cache: shared = preallocated buffers that ONNX "
                        "Runtime's GroupQueryAttention updates in place (CPU; CUDA in fp16), concat = concatenated "
                        "each step (every provider, TensorRT's included); auto (default): shared for fp32, concat "
                        "for fp16. Flan-T5 always concatenates")
    p.add_argument("--no-validate", dest="validate", action="store_false")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse up front, writing nothing, when the expected peak memory (printed before loading) "
                        "exceeds SIZE, e.g. 12GB or 11.5GiB; the memory available now is the limit in any case")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a blip2-edge artifact directory (anything else is refused)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (they can run code)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run_export)

    p = sub.add_parser("make-model", help="write a random-weight BLIP-2 checkpoint (tests, benchmarks)")
    p.add_argument("size", choices=(*SIZES, *RELEASED), metavar="SIZE",
                   help="tiny, bench, full (with --arch/--llm below), or a released checkpoint's shapes by name: "
                        f"{', '.join(RELEASED)}")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--arch", choices=("blip-2", "instructblip", "retrieval"), default=None,
                   help="blip-2 (default); instructblip: the Q-Former also reads the instruction (full: "
                        "instructblip-flan-t5-xl with --llm t5, instructblip-vicuna-7b with --llm llama, "
                        "blip2-opt-2.7b's OPT with --llm opt); retrieval: Blip2ForImageTextRetrieval "
                        "(ITC/ITM heads, no LLM; full = Salesforce/blip2-itm-vit-g shapes)")
    p.add_argument("--llm", choices=("opt", "t5", "llama"), default=None, help="language model family (default: opt)")
    p.add_argument("--variant", choices=("default", "post-ln", "no-bias", "relu", "tied", "shallow-decoder", "mha",
                                         "head16"), default="default",
                   help="opt: default, post-ln, no-bias; t5: default (Flan-T5: gated-GELU, untied), relu, tied, "
                        "shallow-decoder (half as many decoder layers as encoder layers); "
                        "llama: default (grouped-query attention in tiny), mha, head16")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="weights' dtype (default: fp16 for full and the released shapes, as the hub's are "
                        "deployed; fp32 for tiny and bench)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file (default 5GB, as transformers writes): larger weights go into "
                        "model-0000k-of-0000N.safetensors shards with model.safetensors.index.json, as on the hub")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_make_model)

    p = sub.add_parser("demo", help="export and quantize the embedded toy model, caption synthetic images on the CPU, "
                                    "then search them")
    p.add_argument("--out", type=Path, default=Path("out/toy"), help="artifact directory (default: out/toy)")
    p.add_argument("--images", type=int, default=8, help="synthetic images to caption")
    p.set_defaults(run=run_demo)


def resolve_model(model: str) -> str:
    if model == TOY_INSTRUCTBLIP:
        from exporter.toy import INSTRUCTBLIP_CHECKPOINT

        return str(INSTRUCTBLIP_CHECKPOINT)
    if model == TOY_RETRIEVAL:
        from exporter.toy import CHECKPOINT_RETRIEVAL_DIR

        return str(CHECKPOINT_RETRIEVAL_DIR)
    if model in (TOY, TOY_T5):
        from exporter.toy import CHECKPOINTS

        return str(CHECKPOINTS["t5" if model == TOY_T5 else "opt"])
    return model


def run_export(args) -> int:
    _need_export_extra("blip2-edge export")
    from exporter.export import ExportOptions, export
    from exporter.loading import LoadOptions

    opts = ExportOptions(
        opset=args.opset, atol=args.atol, validate=args.validate, overwrite=args.overwrite, kv_cache=args.kv_cache,
        max_memory=None if args.max_memory is None else parse_size(args.max_memory),
        load=LoadOptions(revision=args.revision, local_files_only=args.local_files_only,
                         allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, dtype=args.dtype),
    )
    export(resolve_model(args.model), args.out_dir, opts)
    return 0


def run_make_model(args) -> int:
    _need_export_extra("blip2-edge make-model")
    from exporter.random_models import make_model, resolve_shape
    from runtime.errors import Blip2EdgeError

    if args.out_dir.exists():
        raise Blip2EdgeError(f"{args.out_dir}: already exists")
    shard = parse_size(args.max_shard_size, "--max-shard-size")
    dtype = args.dtype or ("fp16" if args.size not in ("tiny", "bench") else "fp32")
    if args.arch == "retrieval":
        from exporter.random_models import make_retrieval_model

        if args.llm is not None or args.variant != "default":
            raise Blip2EdgeError("--arch retrieval has no language model: --llm and --variant do not apply")
        if args.size not in SIZES:
            raise Blip2EdgeError(f"--arch retrieval takes tiny, bench or full (blip2-itm-vit-g's shapes), "
                                 f"not {args.size}")
        make_retrieval_model(args.size, args.out_dir, seed=args.seed)
        print(f"wrote a random-weight '{args.size}' BLIP-2 retrieval (ITC/ITM) checkpoint to {args.out_dir}")
        return 0
    if args.size in RELEASED and args.variant != "default":
        raise Blip2EdgeError(f"{args.size} is a released checkpoint's shape: --variant does not apply "
                             "(use full with --llm and --variant)")
    _, llm, arch, _ = resolve_shape(args.size, args.llm, args.arch)
    try:
        make_model(args.size, args.out_dir, variant=args.variant, seed=args.seed, llm=llm, arch=arch, dtype=dtype,
                   max_shard_size=shard)
    except ValueError as exc:  # a variant of the other family
        raise Blip2EdgeError(str(exc)) from None
    kind = "InstructBLIP" if arch == "instructblip" else "BLIP-2"
    shards = len(list(args.out_dir.glob("model-*-of-*.safetensors")))
    print(f"wrote a random-weight '{args.size}' {llm} ({args.variant}) {kind} checkpoint ({dtype}"
          f"{f', {shards} shards' if shards else ''}) to {args.out_dir}")
    return 0


def run_demo(args) -> int:
    _need_export_extra("blip2-edge demo")
    from exporter.demo import demo

    return demo(args.out, args.images)
