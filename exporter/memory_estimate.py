"""Memory from a config alone: the weights of each exported stage per precision, and the peak
memory of `export`, which it prints (and checks against the memory available and --max-memory)
before loading anything.

    python -m exporter.memory_estimate full --llm llama          # both tables for a make-model shape
    python -m exporter.memory_estimate instructblip-flan-t5-xxl  # or a released checkpoint's (docs/families.md)

## Weights per stage

For checkpoints too large to export here. The parameters are counted on the stage wrappers the
exporter traces (exporter/families), built on the meta device and run once on meta example
inputs, so only parameters the graphs really read count (BLIP-2's Q-Former has a text
feed-forward path that the query-only graph never uses). tests/exporter/test_memory_estimate.py
checks the estimate against real artifacts' files (runtime.artifact.memory).

Bytes per parameter:
  fp32   4
  fp16   2, except the modules transformers keeps in fp32 (BLIP-2: query tokens, Q-Former; T5: wo)
  int8   visual stages: weight MatMul/Conv/Gemm int8 (+ one fp32 scale per output channel);
         LLM stages: weight-only 8 bits + one fp32 scale per block of 128; lm_head int8; the rest fp32
  int4   as int8 with 4-bit LLM weights (lm_head stays int8, quantize's default)
The embedding table is the float array the runtime holds (fp32, fp16 for an fp16 export).

## The peak of `export`

`export` builds the model without its weights, exports each stage with torch.onnx.export
(TorchScript) with that stage's weights read from the checkpoint (exporter/staged_weights.py),
then validates in two passes (exporter/deferred_runs.py): PyTorch's references with every weight
read, then, the model freed, the graphs on ONNX Runtime. What must fit is the anonymous memory
(RssAnon); weights stored in the export dtype are mapped from the safetensors files (file pages
the kernel can drop under pressure and read again), which `top` counts too:

    cast(x)     = the weights of x stored in another dtype than the export's (read as a copy)
    load          0.30 GB (interpreter, torch, transformers, onnx, onnxruntime)
    export s      0.30 GB + cast(s) + 0.9 GB + c x S_s    S_s the stage's weights in the export
                  dtype; c: 2.85 for a graph under 2 GiB (torch serializes it whole, it is reloaded
                  to place its data), 0.55 over (one file per tensor); LLaMA's decoder 5.35 under
                  (ExportFamily.trace_copies)
    references    0.30 GB + cast(model) + 1.4 GB   generate and the stage outputs (bench-llama: 1.39)
    validation    0.30 GB + r x G      the model freed; G the weights of the larger half of the
                  runtime's pipeline (visual stages, then the LLM's): r = 1.25 for fp32, 0.3 for
                  fp16 (sessions that keep one copy of the weights, mapped, each cast to float32
                  just before its use: ThreadSettings.low_memory)
    (a whole-model load, staged=False: cast(model) held from the start, in every phase)
    peak = the largest phase;  mapped = 0.12 GB + the checkpoint's tensors as stored

Validation phases, measured after the two-pass change (bench/export_bench.py --shapes bench
bench-t5 bench-llama --dtypes fp32 fp16; anonymous GB, G in brackets): bench fp32 2.04 (1.40),
fp16 1.82 (0.90); bench-t5 fp32 2.43 (1.73), fp16 1.98 (1.14); bench-llama fp32 2.84 (2.03),
fp16 2.35 (1.22). The fp16 figures are from before the sessions dropped MatMul prepacking
(the float32 Q-Former held 1.45x its file); the runtime pipeline of the bench fp16 export holds
1.07 GB for 0.90 GB of files with it.

Measured with bench/export_bench.py (per-phase RssAnon sampled every 20 ms from outside the
process; bench/EXPORT_RESULTS.md), on this 24 GB, 2-core machine (GB):

    export                          stage S (GB)        measured anon (phase)      estimate
    bench fp32 (OPT-125m)           vision 0.34         2.04-2.16                  2.18
                                    qformer 0.43        2.18-2.39                  2.34
                                    decoder 0.50        2.14-2.37                  2.63
    bench fp16 (fp32 checkpoint)    qformer 0.42        2.60-2.61                  2.76
    bench-llama fp32                decoder 1.16        6.88-7.37                  7.40
    bench-llama fp16 (fp32 ckpt)    decoder 0.58        4.43                       5.12
    blip2-opt-2.7b fp16 (fp16       vision 1.97         6.79                       6.82
      shards, as the hub's)         decoder 5.30        3.95                       4.12

(The stage rows are from before validation ran in two passes; then it held the torch model
beside ONNX Runtime sessions that cast fp16 weights to fp32: 20.21 GB for blip2-opt-2.7b fp16.)
Each stage's export also carries what the earlier ones left behind (allocator fragmentation):
that is in the 0.9 GB and the factors, which are fitted on the sequence, not on a stage exported alone. The tiny
models' peak is 0.28 GB; their estimate says 1.2 (the 0.9 GB term): an overestimate where it
costs nothing. The released shapes, stage by stage with the validation halves: bench/EXPORT_RESULTS.md
("Stage-by-stage export"). Change the export's phases and this model changes with them: refit it
with bench/export_bench.py.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from contextlib import contextmanager
from pathlib import Path

from exporter.families import export_family
from exporter.loading import RETRIEVAL_CLASSES, SUPPORTED_ARCHITECTURES
from exporter.random_models import RELEASED, SIZES, build_config

PRECISIONS = ("fp32", "fp16", "int8", "int4")
VISUAL = ("vision", "qformer")
BLOCK = 128  # calibration.llm.DEFAULT_BLOCK_SIZE


@contextmanager
def _hooks(root, called: set):
    handles = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in root.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def used_parameters(stage, inputs: tuple) -> list:
    """(module path, parameter, is a weight matrix) of each parameter the stage's forward reads:
    direct parameters of the modules it calls, the wrapper's own, and those of wrapper attributes
    it indexes without calling (OPT's learned positions)."""
    from torch import nn

    called: set = set()
    with _hooks(stage, called):
        stage(*inputs)
    out, seen = [], set()

    def add(module, path):
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                matrix = isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight"
                out.append((f"{path}.{name}", p, matrix))

    for path, module in stage.named_modules():
        if id(module) in called or module is stage:
            add(module, path)
    for name, child in stage.named_children():  # attributes indexed, never called
        if id(child) not in called and not isinstance(child, nn.ModuleList):
            for path, module in child.named_modules(prefix=name):
                add(module, path)
    return out


def meta_model(config):
    """The transformers model `export` loads for `config` (BLIP-2, InstructBLIP or the retrieval
    model), built on the meta device: shapes, no memory."""
    import torch
    import transformers

    family = export_family(config)
    names = RETRIEVAL_CLASSES if family.runtime.task == "retrieval" else SUPPORTED_ARCHITECTURES[config.model_type]
    with torch.device("meta"):
        return getattr(transformers, names[0])(config)


def kept_in_fp32(model):
    """name -> whether an fp16 load keeps that parameter in fp32: transformers' own rule
    (from_pretrained's regex over `_keep_in_fp32_modules`: BLIP-2's query tokens and Q-Former),
    with the language model's list too (T5's feed-forward output `wo`: the fp16 T5 export keeps
    it in fp32 as transformers runs T5, and InstructBLIP's list already carries it)."""
    names = list(getattr(model, "_keep_in_fp32_modules", None) or ())
    lm = getattr(model, "language_model", None)
    names += list(getattr(lm, "_keep_in_fp32_modules", None) or ())
    if not names:
        return lambda name: False
    pattern = re.compile("|".join(rf"((^|\.){re.escape(n)}($|\.))" for n in sorted(set(names))))
    return lambda name: pattern.search(name) is not None


def stage_parameters(config) -> dict:
    """stage -> list of (name, numel, kind, kept in fp32, output channels): kind "matrix",
    "lm_head" or "other"; the embedding table's size under "embeddings" (0 for retrieval, which
    has none), and the whole model as `export` loads it under "model": (name, numel, kept in fp32)
    of every parameter and buffer."""
    import torch

    family = export_family(config)
    dims = family.model_dims(config)
    model = meta_model(config)
    with torch.device("meta"):
        examples = family.example_inputs(model, dims)
        # example_int builds int64 ones on the default device; every tensor must be on meta.
        examples = {k: tuple(t.to("meta") for t in v) for k, v in examples.items()}
    kept = kept_in_fp32(model)
    full_names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    with torch.no_grad(), torch.device("meta"):  # tensors the wrappers create inside forward too
        for name, stage in family.modules(model).items():
            head = getattr(stage, "lm_head", None)
            rows = []
            for _, p, matrix in used_parameters(stage, examples[name]):
                kind = "lm_head" if head is not None and p is head.weight else "matrix" if matrix else "other"
                full = full_names.get(id(p), "?")
                rows.append((full, p.numel(), kind, kept(full), p.shape[0]))
            out[name] = rows
    out["embeddings"] = model.get_input_embeddings().weight.numel() if family.runtime.task != "retrieval" else 0
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    out["model"] = [(n, t.numel(), kept(n)) for n, t in tensors]
    return out


def _param_bytes(numel: int, kind: str, fp32_kept: bool, precision: str, visual: bool, out_channels: int) -> float:
    if precision == "fp32":
        return 4 * numel
    if precision == "fp16":
        return (4 if fp32_kept else 2) * numel
    if kind == "other":
        return 4 * numel
    if visual:  # QDQ int8 per channel
        return numel + 5 * out_channels  # int8 weights, fp32 scale + int8 zero point per channel
    bits = 8 if kind == "lm_head" or precision == "int8" else 4
    # MatMulNBits pads each input row (K = numel / out_channels) up to whole blocks, one fp32
    # scale per block: a matrix narrower than a block costs a full block per output channel.
    blocks = out_channels * -(-(numel // out_channels) // BLOCK)
    return blocks * BLOCK * bits / 8 + blocks * 4


def estimate(params: dict, precision: str) -> dict:
    """Bytes per stage and the embedding table at `precision`, as runtime.artifact.memory reports them."""
    stages = {}
    for name, rows in params.items():
        if name in ("embeddings", "model"):
            continue
        total = 0.0
        for _, numel, kind, kept, channels in rows:
            total += _param_bytes(numel, kind, kept, precision, name in VISUAL, channels)
        stages[name] = int(total)
    emb = params["embeddings"] * (2 if precision == "fp16" else 4)
    return {"stages": stages, "embeddings": emb, "total": emb + sum(stages.values())}


# ---- the peak of `export` --------------------------------------------------------------------
# Anonymous memory (RssAnon: what must fit, or the OOM killer ends the run), in bytes, fitted on
# bench/export_bench.py's per-phase samples (docstring above). Weights torch maps from the
# checkpoint's files (same dtype on disk as exported) are counted apart: the kernel can drop
# those pages under pressure and read them again.
BASE = 0.30e9  # interpreter + torch, transformers, onnx, onnxruntime imported (tiny: 0.28)
BASE_MAPPED = 0.12e9  # their shared libraries (tiny: VmRSS 0.40 - RssAnon 0.28)
TRACE_FIXED = 0.9e9  # torch.onnx.export of any stage, beside its weights
# x the stage's weights for the visual stages, graph under / over 2 GiB (serialized whole and
# reloaded, or one file per tensor); an LLM stage takes its family's (ExportFamily.trace_copies).
VISUAL_TRACE_COPIES = (2.85, 0.55)
PROTOBUF_LIMIT = 2**31  # torch switches to external data past it
# Validation runs after the torch model is freed (exporter/deferred_runs.py): the references
# pass holds the model and what transformers' generate and the stage references allocate;
# the graphs pass the runtime's pipeline, x the weights of its larger half, visual or LLM (fp16:
# sessions that keep one copy, ThreadSettings.low_memory).
REFERENCES_FIXED = 1.4e9
# fp16: the one-copy sessions map the weights from the graphs' data files and cast each just
# before its use (priority execution order); blip2-opt-2.7b's LLM half, 5.56 GB of files, peaked
# at 0.89 GB anonymous in a generate (0.15 of it the interpreter).
ORT = {"fp32": 1.25, "fp16": 0.3}
# Retrieval artifacts still validate in one pass (their models are small): the torch model beside
# full-optimisation sessions (fp16: float32 copies of the weights folded in).
ORT_ONE_PASS = {"fp32": 1.5, "fp16": 2.5}
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def stored_sizes(checkpoint) -> dict | None:
    """tensor name -> bytes per element as stored, from the safetensors headers of a local
    checkpoint directory (8 bytes and a JSON header per file; no weight is read); None when
    there is no such directory or a header cannot be read."""
    root = Path(str(checkpoint)).expanduser()
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    out = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > 100 * 2**20:
                    return None
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        out.update({k: _BYTES.get(v.get("dtype"), 4) for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict)})
    return out or None


def _config_size(config) -> int:
    fields = vars(config)  # transformers >= 4.56 keeps `dtype`, older ones `torch_dtype` (a warning to read now)
    dtype = str(fields.get("dtype") or fields.get("torch_dtype") or "float32")
    return 2 if dtype.endswith(("float16", "bfloat16")) else 4


def model_bytes(params: dict, dtype: str) -> int:
    """The whole model as from_pretrained holds it in `dtype` (fp16 keeps its fp32 modules)."""
    return sum(n * (4 if dtype == "fp32" or kept else 2) for _, n, kept in params["model"])


def export_peak(config, dtype: str, validate: bool = True, params: dict | None = None,
                stored: dict | None = None, staged: bool = True) -> dict:
    """The expected peak of `export` in bytes: "peak" the anonymous memory (what must fit),
    "mapped" the checkpoint's weights torch maps from its files (resident when touched, dropped
    under pressure), "rss" their sum (what `top` shows with memory to spare), and each phase's
    anonymous peak. `stored`: the checkpoint's bytes per element per tensor (stored_sizes); the
    config's dtype for every tensor without it (a hub id before download). `staged`: each stage's
    weights read for its own export (exporter/staged_weights.py), the whole model only for the
    references; else the whole model loaded first."""
    params = params if params is not None else stage_parameters(config)
    default = _config_size(config)

    def cast_copy(name: str, n: int, kept: bool) -> int:
        """Bytes of anonymous memory the tensor takes once read: a cast makes a copy; a tensor
        stored in the export dtype stays mapped from its file."""
        size = 4 if dtype == "fp32" or kept else 2
        return n * size if (stored or {}).get(name, default) != size else 0

    loaded = model_bytes(params, dtype)
    on_disk = sum(n * (stored or {}).get(name, default) for name, n, _ in params["model"])
    converted = sum(cast_copy(name, n, kept) for name, n, kept in params["model"])
    weights = estimate(params, dtype)
    family = export_family(config)
    held = BASE + (0 if staged else converted)
    phases = {"load": held}
    for name, size in weights["stages"].items():
        copies = VISUAL_TRACE_COPIES if name in family.runtime.visual_stages else family.trace_copies
        own = sum(cast_copy(full, n, kept) for full, n, _, kept, _ in params[name]) if staged else 0
        phases[f"export {name}"] = held + own + TRACE_FIXED + copies[size >= PROTOBUF_LIMIT] * size
    whole = BASE + converted  # the model as the references pass holds it
    if validate and family.runtime.task == "retrieval":  # one pass: torch and the sessions side by side
        phases["validation"] = whole + ORT_ONE_PASS[dtype] * weights["total"]
    elif validate:
        phases["references"] = whole + REFERENCES_FIXED
        # The generate parity loads the visual stages, frees them, then the LLM's (with the table).
        visual = sum(v for k, v in weights["stages"].items() if k in family.runtime.visual_stages)
        phases["validation"] = BASE + ORT[dtype] * max(visual, weights["total"] - visual)
    phases = {k: int(v) for k, v in phases.items()}
    mapped = int(BASE_MAPPED + on_disk)
    peak = max(phases.values())
    return {"peak": peak, "mapped": mapped, "rss": peak + mapped, "phases": phases, "model": loaded,
            "converted": converted, "stages": weights["stages"]}


def peak_table(config, label: str) -> str:
    """export's expected peak per dtype, with and without validation."""
    params = stage_parameters(config)
    lines = [f"expected peak memory of `export` for {label} (GB): anonymous (must fit) + checkpoint mapped "
             "from disk, when the checkpoint is stored in the export dtype:",
             f"{'dtype':<7}{'validate':<10}{'largest stage':>14}{'peak':>8}{'+ mapped':>10}  peak phase"]
    for dtype in ("fp32", "fp16"):
        size = 4 if dtype == "fp32" else 2
        stored = {name: (4 if kept and dtype == "fp16" else size) for name, _, kept in params["model"]}
        for validate in (True, False):
            e = export_peak(config, dtype, validate, params, stored)
            phase = max(e["phases"], key=e["phases"].get)
            lines.append(f"{dtype:<7}{'yes' if validate else 'no':<10}{max(e['stages'].values()) / 1e9:>14.2f}"
                         f"{e['peak'] / 1e9:>8.1f}{e['mapped'] / 1e9:>10.1f}  {phase}")
    return "\n".join(lines)


def table(config, label: str) -> str:
    params = stage_parameters(config)
    rows = {p: estimate(params, p) for p in PRECISIONS}
    names = [*rows["fp32"]["stages"], "embeddings", "total"]
    counts = {n: sum(r[1] for r in params[n]) for n in params if n not in ("embeddings", "model")}
    counts["embeddings"] = params["embeddings"]
    counts["total"] = sum(counts.values())
    lines = [f"weight memory of {label} (GB, 1e9 bytes), computed from parameter counts:",
             f"{'stage':<12}{'params (M)':>12}" + "".join(f"{p.upper():>9}" for p in PRECISIONS)]
    for n in names:
        values = [rows[p][n] if n in ("embeddings", "total") else rows[p]["stages"][n] for p in PRECISIONS]
        lines.append(f"{n:<12}{counts[n] / 1e6:>12.1f}" + "".join(f"{v / 1e9:>9.2f}" for v in values))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="weight memory per precision, and export's expected peak memory, of a "
                                             "make-model shape")
    ap.add_argument("size", choices=(*SIZES, *RELEASED))
    ap.add_argument("--llm", default=None, help="opt, t5 or llama (default: llama, or the released shape's)")
    ap.add_argument("--arch", default=None, help="blip-2 or instructblip (default: blip-2, or the released shape's)")
    args = ap.parse_args(argv)
    llm = args.llm or (None if args.size in RELEASED else "llama")
    config = build_config(args.size, llm=llm, arch=args.arch)
    label = args.size if args.size in RELEASED else f"make-model {args.size} --llm {llm} --arch {args.arch or 'blip-2'}"
    print(table(config, label))
    print()
    print(peak_table(config, label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
