"""BLIP-2 Flan-T5 (bench shapes: ViT-B/16 + 12-layer Q-Former + t5-base) on the CPU: transformers'
eager `generate` vs the FP32 export vs weight-only quantized exports, side by side.

    python bench/t5_bench.py                  # batch 1, 20 forced new tokens
    python bench/t5_bench.py --num-calib 32   # quicker calibration of the visual stages

1. Builds the random-weight bench T5 checkpoint and its validated FP32 export once under
   bench/out/, then quantizes it (INT8 visual stages, weight-only INT8 and INT4 encoder, cross_kv
   and decoder; random weights: gates reported, not enforced), each in its own process.
2. Times alternating runs after warm-up: transformers eager, FP32, INT8, INT4. Token identity
   with transformers is checked for FP32 on every run.
3. Prints per-stage medians (vision, qformer, encoder, prefill = cross K/V + first decoder step,
   decode) and the per-token decode step against its floor: the bytes one step must read (the
   decoder graph's weights + the cross K/V) / this machine's measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, dir_size, ensure_fp32_artifacts, graph_weight_bytes, hf_generate_fn, machine, read_bandwidth, timed  # noqa: E402
from runtime import synthetic  # noqa: E402

STAGES = ("preprocess", "vision", "qformer", "encoder", "prefill", "decode")


def quantize(fp32: Path, llm: str, num_calib: int) -> dict:
    art = OUT / "artifacts" / f"bench-t5-int8-{llm}"
    cmd = [sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(art), "--synthetic", str(num_calib),
           "--llm", llm, "--held-out", "8", "--no-gate", "--overwrite",
           "--calibration-cache", str(OUT / "bench-t5-ranges.json")]
    wall, rss = timed(cmd)
    return {"path": art, "wall": wall, "rss": rss, "fidelity": json.loads((art / "fidelity.json").read_text())}


def cross_kv_bytes(pipe, image) -> int:
    """Bytes of the cross K/V one decode step reads at batch 1 for this image's prompt."""
    m = pipe.model
    inputs = pipe.layout(pipe.encode([image], {}), [pipe.caption_prompt(None)])
    return 2 * m["num_layers"] * m["num_heads"] * inputs.embeds.shape[1] * m["head_dim"] * 4


def main() -> int:
    import torch

    from exporter.loading import LoadOptions, load_model
    from runtime.pipeline import Blip2Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-calib", type=int, default=64)
    args = ap.parse_args()

    t0 = time.perf_counter()
    ckpt, fp32 = ensure_fp32_artifacts("bench", llm="t5")
    print(f"bench T5 checkpoint + validated FP32 export ready ({time.perf_counter() - t0:.0f}s)")
    quantized = {llm: quantize(fp32, llm, args.num_calib) for llm in ("int8", "int4")}

    model, processor = load_model(str(ckpt), LoadOptions())
    image = synthetic.make_scenes(1, seed=99)[0][1]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n)
    hf = hf_generate_fn(model, processor, image, **gen)
    dirs = {"fp32": fp32, **{k: v["path"] for k, v in quantized.items()}}
    pipes = {k: Blip2Pipeline.from_artifacts(d) for k, d in dirs.items()}

    def ours(k):
        return pipes[k].caption([image], stop_strings=(), **gen)[0]

    for _ in range(args.warmup):
        hf(), *(ours(k) for k in pipes)
    t_hf, totals, stages, steps, identical = [], {k: [] for k in pipes}, {k: [] for k in pipes}, \
        {k: [] for k in pipes}, []
    for _ in range(args.runs):
        t = time.perf_counter()
        ref = hf()
        t_hf.append(time.perf_counter() - t)
        for k in pipes:
            t = time.perf_counter()
            r = ours(k)
            totals[k].append(time.perf_counter() - t)
            stages[k].append(r.timings)
            steps[k] += r.timings["decode_steps"]
            if k == "fp32":
                identical.append(r.tokens == ref)

    bw = read_bandwidth()
    kv = cross_kv_bytes(pipes["fp32"], image)
    med_hf = statistics.median(t_hf)
    print(f"\nmachine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"bench T5, batch 1, {n} forced new tokens, median of {args.runs} alternating runs after {args.warmup} "
          f"warm-up; FP32 tokens identical to transformers on every run: {all(identical)} ({sum(identical)}/{len(identical)})")
    print(f"{'':<14}{'end to end ms':>14}{'speedup':>9}" + "".join(f"{s + ' ms':>14}" for s in STAGES)
          + f"{'step ms':>9}{'floor ms':>10}{'x floor':>8}{'disk MB':>9}")
    print(f"{'transformers':<14}{med_hf * 1e3:>14.1f}{1.0:>9.2f}")
    for k in pipes:
        floor = (graph_weight_bytes(dirs[k] / "decoder.onnx") + kv) / bw
        step = statistics.median(steps[k])
        med = statistics.median(totals[k])
        per_stage = "".join(f"{statistics.median(t[s] for t in stages[k]) * 1e3:>14.1f}" for s in STAGES)
        print(f"{k:<14}{med * 1e3:>14.1f}{med_hf / med:>9.2f}{per_stage}{step * 1e3:>9.2f}{floor * 1e3:>10.2f}"
              f"{step / floor:>8.2f}{dir_size(dirs[k]) / 1e6:>9.0f}")
    print(f"(floor = decoder weight bytes + {kv / 1e6:.1f} MB cross K/V, read once per step, / {bw / 1e9:.1f} GB/s)")
    for k, q in quantized.items():
        s = q["fidelity"]["stages"]
        print(f"fidelity {k}: vision cos {s['vision']['cosine_mean']:.4f}, qformer cos {s['qformer']['cosine_mean']:.4f}, "
              f"decoder top-1 {s['decoder']['top1_agreement']:.3f}, KL {s['decoder']['mean_kl']:.3e}; "
              f"quantize {q['wall']:.0f}s, peak RSS {q['rss'] / 1e9:.2f} GB")
    return 0 if all(identical) else 1


if __name__ == "__main__":
    raise SystemExit(main())
