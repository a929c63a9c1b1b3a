"""Re-runnable comparison on the `bench` model: transformers eager vs the FP32 ONNX artifacts vs
the quantized ones, with the profiler; writes the table and the machine to bench/RESULTS.md.

    python bench/profile_bench.py            # builds what is missing under bench/out/ first

The quantized directories are the ones bench/quant_bench.py writes (bench-<activations>-<llm>);
missing ones are made here from 128 synthetic calibration scenes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import HERE, OUT, ensure_fp32_artifacts  # noqa: E402


def ensure_quantized(fp32: Path, activations: str, llm: str) -> Path:
    from calibration.llm import LLMOptions
    from calibration.quantize import QuantizeOptions, quantize
    from calibration.visual import VisualOptions

    out = OUT / "artifacts" / f"bench-{activations}-{llm}"
    if not (out / "manifest.json").is_file():
        quantize(fp32, out, QuantizeOptions(num_calib=128, held_out=16, gate=False, overwrite=True,
                                            visual=VisualOptions(activations=activations),
                                            llm=LLMOptions(precision=llm)))
    return out


def main() -> int:
    from exporter.reference import profile_reference
    from runtime import synthetic
    from runtime.profiling import environment, report
    from runtime.profiling.profiler import ProfileOptions, profile_artifacts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()

    ckpt, fp32 = ensure_fp32_artifacts("bench")
    dirs = [fp32, ensure_quantized(fp32, "int8", "int4"), ensure_quantized(fp32, "uint8", "int8"),
            ensure_quantized(fp32, "uint8", "int4")]
    images = [im for _, im in synthetic.make_scenes(4, seed=0)]
    opts = ProfileOptions(runs=args.runs, warmup=2, new_tokens=args.new_tokens)
    profiles = [profile_artifacts(d, images, opts) for d in dirs]
    reference = profile_reference(str(ckpt), images, opts)
    table = report.table(profiles, reference)
    print(table)
    env = environment.describe()
    def describe(path: Path) -> str:
        stages = json.loads((path / "manifest.json").read_text())["stages"]
        parts = []
        for name in ("vision", "qformer", "decoder"):
            q = stages[name].get("quantization") or {}
            detail = f" ({q['activations']} activations)" if "activations" in q else ""
            parts.append(f"{name} {stages[name]['precision']}{detail}")
        return ", ".join(parts)

    precisions = "\n".join(f"- `{d.name}`: {describe(d)}" for d in dirs)
    args.out.write_text(
        f"# Benchmark results\n\nWritten by `python bench/profile_bench.py` on {datetime.date.today()}.\n\n"
        f"Model: `bench` (random weights; ViT-B/16 at 224 + 12-layer Q-Former with 32 queries + OPT-125m "
        f"shapes). Batch 1, {args.new_tokens} forced new tokens, plain captioning, mean of {args.runs} runs "
        f"after 2 warm-up, times in ms.\n\n{precisions}\n\n```\n{table}\n```\n\n"
        f"Machine:\n\n```json\n{json.dumps(env, indent=2)}\n```\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
