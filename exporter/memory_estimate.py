"""Weight memory per precision from a config alone: the parameters each exported stage uses,
times the bytes the exporter (FP32, FP16) and `quantize` (INT8 / INT4) store per parameter.

For checkpoints too large to export here (instructblip-vicuna-7b's LLaMA). The parameters are
counted on the stage wrappers the exporter traces (exporter/families), built on the meta device
and run once on meta example inputs, so only parameters the graphs really read count (BLIP-2's
Q-Former has a text feed-forward path that the query-only graph never uses). tests/exporter/
test_memory_estimate.py checks the estimate against real artifacts' files (runtime.artifact.memory).

    python -m exporter.memory_estimate full --llm llama      # the table in docs/families.md

Bytes per parameter:
  fp32   4
  fp16   2, except the modules transformers keeps in fp32 (BLIP-2: query tokens, Q-Former;
         T5's feed-forward output projections `wo`)
  int8   visual stages: weight MatMul/Conv/Gemm int8 (+ one fp32 scale per output channel);
         LLM stages: weight-only 8 bits + one fp32 scale per block of 32; lm_head int8; the rest fp32
  int4   as int8 with 4-bit LLM weights (lm_head stays int8, quantize's default)
The embedding table is the float array the runtime holds (fp32, fp16 for an fp16 export).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from exporter.families import export_family
from exporter.loading import SUPPORTED_ARCHITECTURES, keeps_fp32, kept_in_fp32
from exporter.random_models import SIZES, build_config

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


def stage_parameters(config) -> dict:
    """stage -> list of (name, numel, kind, kept in fp32, output channels): kind "matrix",
    "lm_head" or "other"; and the embedding table's size under "embeddings"."""
    import torch
    import transformers

    family = export_family(config)
    dims = family.model_dims(config)
    # BLIP-2 or InstructBLIP, with the fp32 modules a float16 load keeps (exporter.loading)
    model_class = keeps_fp32(getattr(transformers, SUPPORTED_ARCHITECTURES[config.model_type][0]), family)
    with torch.device("meta"):
        model = model_class(config)
        examples = family.example_inputs(model, dims)
        # example_int builds int64 ones on the default device; every tensor must be on meta.
        examples = {k: tuple(t.to("meta") for t in v) for k, v in examples.items()}
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    full_names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    with torch.no_grad(), torch.device("meta"):  # tensors the wrappers create inside forward too
        for name, stage in family.modules(model).items():
            head = getattr(stage, "lm_head", None)
            rows = []
            for _, p, matrix in used_parameters(stage, examples[name]):
                kind = "lm_head" if head is not None and p is head.weight else "matrix" if matrix else "other"
                fp32_kept = kept_in_fp32(full_names.get(id(p), ""), keep_fp32)
                rows.append((full_names.get(id(p), "?"), p.numel(), kind, fp32_kept, p.shape[0]))
            out[name] = rows
    out["embeddings"] = model.get_input_embeddings().weight.numel()
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
        if name == "embeddings":
            continue
        total = 0.0
        for _, numel, kind, kept, channels in rows:
            total += _param_bytes(numel, kind, kept, precision, name in VISUAL, channels)
        stages[name] = int(total)
    emb = params["embeddings"] * (2 if precision == "fp16" else 4)
    return {"stages": stages, "embeddings": emb, "total": emb + sum(stages.values())}


def table(config, label: str) -> str:
    params = stage_parameters(config)
    rows = {p: estimate(params, p) for p in PRECISIONS}
    names = [*rows["fp32"]["stages"], "embeddings", "total"]
    counts = {n: sum(r[1] for r in params[n]) for n in params if n != "embeddings"}
    counts["embeddings"] = params["embeddings"]
    counts["total"] = sum(counts.values())
    lines = [f"weight memory of {label} (GB, 1e9 bytes), computed from parameter counts:",
             f"{'stage':<12}{'params (M)':>12}" + "".join(f"{p.upper():>9}" for p in PRECISIONS)]
    for n in names:
        values = [rows[p][n] if n in ("embeddings", "total") else rows[p]["stages"][n] for p in PRECISIONS]
        lines.append(f"{n:<12}{counts[n] / 1e6:>12.1f}" + "".join(f"{v / 1e9:>9.2f}" for v in values))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="weight memory per precision of a make-model shape")
    ap.add_argument("size", choices=SIZES)
    ap.add_argument("--llm", default="llama")
    ap.add_argument("--arch", default="blip-2", help="blip-2 or instructblip")
    args = ap.parse_args(argv)
    print(table(build_config(args.size, llm=args.llm, arch=args.arch),
                f"make-model {args.size} --llm {args.llm} --arch {args.arch}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
