"""BLIP-2 with a LLaMA LLM (bench shapes: ViT-B/16 + 12-layer Q-Former + a ~320M-parameter
LLaMA, Vicuna's layout) on the CPU: transformers' eager `generate` vs the FP32 export vs the
INT4 weight-only export, side by side.

    python bench/llama_bench.py                  # batch 1, 20 forced new tokens
    python bench/llama_bench.py --num-calib 16   # quicker calibration of the visual stages

1. Builds the random-weight bench LLaMA checkpoint and its validated FP32 export once under
   bench/out/, then quantizes it (INT8 visual stages, weight-only INT4 decoder with an INT8
   lm_head; random weights: gates reported, not enforced) in its own process.
2. Times alternating runs after warm-up: transformers eager, FP32, INT4; token identity with
   transformers is checked for FP32 on every run.
3. Prints per-stage medians and the per-token decode step against its floor: the bytes one step
   must read (the decoder graph's weights + the KV cache at the mean step's length) / this
   machine's measured read bandwidth; and each directory's weight memory from its files
   (runtime.artifact.memory) next to the arithmetic estimate (exporter.memory_estimate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, ensure_fp32_artifacts, graph_weight_bytes, hf_generate_fn, machine, read_bandwidth, timed  # noqa: E402
from runtime import synthetic  # noqa: E402

STAGES = ("preprocess", "vision", "qformer", "prefill", "decode")


def quantize(fp32: Path, llm: str, num_calib: int) -> dict:
    art = OUT / "artifacts" / f"bench-llama-int8-{llm}"
    cmd = [sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(art), "--synthetic", str(num_calib),
           "--llm", llm, "--held-out", "8", "--no-gate", "--overwrite",
           "--calibration-cache", str(OUT / "bench-llama-ranges.json")]
    wall, rss = timed(cmd)
    return {"path": art, "wall": wall, "rss": rss, "fidelity": json.loads((art / "fidelity.json").read_text())}


def main() -> int:
    import torch

    from exporter.loading import LoadOptions, load_model
    from exporter.memory_estimate import estimate, stage_parameters
    from runtime.artifact.manifest import load_manifest
    from runtime.artifact.memory import artifact_weights, kv_cache_bytes
    from runtime.pipeline import Blip2Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-calib", type=int, default=32)
    args = ap.parse_args()

    t0 = time.perf_counter()
    ckpt, fp32 = ensure_fp32_artifacts("bench", llm="llama")
    print(f"bench LLaMA checkpoint + validated FP32 export ready ({time.perf_counter() - t0:.0f}s)")
    int4 = quantize(fp32, "int4", args.num_calib)

    model, processor = load_model(str(ckpt), LoadOptions())
    image = synthetic.make_scenes(1, seed=99)[0][1]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n)
    hf = hf_generate_fn(model, processor, image, **gen)  # prompt "" (BOS only), as ours below
    dirs = {"fp32": fp32, "int4": int4["path"]}
    pipes = {k: Blip2Pipeline.from_artifacts(d) for k, d in dirs.items()}

    def ours(k):
        return pipes[k].generate([image], [""], stop_strings=(), **gen)[0]

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
    m = pipes["fp32"].model
    prompt_len = pipes["fp32"].layout(pipes["fp32"].encode([image], {}), [""]).embeds.shape[1]
    kv = kv_cache_bytes(m, positions=prompt_len + n // 2)  # the mean decode step's cache, fp32
    med_hf = statistics.median(t_hf)
    print(f"\nmachine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"bench LLaMA ({m['num_layers']} layers, hidden {m['text_hidden']}, {m['num_heads']} heads, "
          f"{m['num_kv_heads']} KV heads), batch 1, {n} forced new tokens, median of {args.runs} alternating runs "
          f"after {args.warmup} warm-up; FP32 tokens identical to transformers on every run: {all(identical)} "
          f"({sum(identical)}/{len(identical)})")
    print(f"{'':<14}{'end to end ms':>14}{'speedup':>9}" + "".join(f"{s + ' ms':>14}" for s in STAGES)
          + f"{'step ms':>9}{'floor ms':>10}{'x floor':>8}{'weights MB':>12}")
    print(f"{'transformers':<14}{med_hf * 1e3:>14.1f}{1.0:>9.2f}")
    for k in pipes:
        floor = (graph_weight_bytes(dirs[k] / "decoder.onnx") + kv) / bw
        step = statistics.median(steps[k])
        med = statistics.median(totals[k])
        per_stage = "".join(f"{statistics.median(t[s] for t in stages[k]) * 1e3:>14.1f}" for s in STAGES)
        weights = artifact_weights(load_manifest(dirs[k], verify=False))["total"]
        print(f"{k:<14}{med * 1e3:>14.1f}{med_hf / med:>9.2f}{per_stage}{step * 1e3:>9.2f}{floor * 1e3:>10.2f}"
              f"{step / floor:>8.2f}{weights / 1e6:>12.0f}")
    print(f"(floor = decoder weight bytes + {kv / 1e6:.1f} MB KV cache, read once per step, / {bw / 1e9:.1f} GB/s)")
    s = int4["fidelity"]["stages"]
    print(f"fidelity int4: vision cos {s['vision']['cosine_mean']:.4f}, qformer cos {s['qformer']['cosine_mean']:.4f}, "
          f"decoder top-1 {s['decoder']['top1_agreement']:.3f}, KL {s['decoder']['mean_kl']:.3e}; "
          f"quantize {int4['wall']:.0f}s, peak RSS {int4['rss'] / 1e9:.2f} GB")
    params = stage_parameters(model.config)
    for k, precision in (("fp32", "fp32"), ("int4", "int4")):
        real = artifact_weights(load_manifest(dirs[k], verify=False))
        est = estimate(params, precision)
        print(f"weights {k}: files " + ", ".join(f"{st} {real['stages'][st]['bytes'] / 1e6:.1f}" for st in est["stages"])
              + f", embeddings {real['embeddings'] / 1e6:.1f} MB; estimate " +
              ", ".join(f"{st} {v / 1e6:.1f}" for st, v in est["stages"].items()) + f", embeddings "
              f"{est['embeddings'] / 1e6:.1f} MB")
    return 0 if all(identical) else 1


if __name__ == "__main__":
    raise SystemExit(main())
