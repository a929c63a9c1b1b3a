"""End-to-end latency: the ONNX Runtime pipeline vs transformers' eager `generate`, side by side.

    python bench/runtime_bench.py                  # bench model, CPU, batch 1, 20 new tokens

Both sides start from the same PIL image and produce token ids; runs alternate between them so
that both see the same machine state; warm-up runs are excluded. The tokens must be identical.
Per-token decode time is set against its floor: the decoder's weight bytes (read once per token)
divided by this machine's measured memory read bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ensure_fp32_artifacts, graph_weight_bytes, hf_generate_fn, read_bandwidth  # noqa: E402
from runtime import synthetic  # noqa: E402


def main() -> int:
    import torch

    from exporter.loading import LoadOptions, load_model
    from runtime.pipeline import Blip2Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    ckpt, art = ensure_fp32_artifacts(args.model)
    model, processor = load_model(str(ckpt), LoadOptions())
    pipe = Blip2Pipeline.from_artifacts(art)
    image = synthetic.make_scenes(1, seed=99)[0][1]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n)  # forced length, so both sides do the same work

    hf = hf_generate_fn(model, processor, image, **gen)

    def ours():
        return pipe.caption([image], stop_strings=(), **gen)[0]

    for _ in range(args.warmup):
        hf(), ours()
    t_hf, t_ours, steps = [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ref = hf()
        t_hf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = ours()
        t_ours.append(time.perf_counter() - t0)
        steps += r.timings["decode_steps"]
    identical = ref == r.tokens

    bw = read_bandwidth()
    weights = graph_weight_bytes(art / "decoder.onnx")
    floor = weights / bw
    step = statistics.median(steps)
    med_hf, med_ours = statistics.median(t_hf), statistics.median(t_ours)
    print(f"model {args.model}, CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), batch 1, "
          f"{n} new tokens, median of {args.runs} runs after {args.warmup} warm-up")
    print(f"  transformers eager generate : {med_hf * 1e3:8.1f} ms")
    print(f"  blip2-edge ORT fp32 pipeline: {med_ours * 1e3:8.1f} ms   speedup x{med_hf / med_ours:.2f}")
    print(f"  tokens identical            : {identical}")
    t = r.timings
    print(f"  ORT stages (last run)       : preprocess {t['preprocess'] * 1e3:.1f} ms, vision {t['vision'] * 1e3:.1f} ms, "
          f"qformer {t['qformer'] * 1e3:.1f} ms, prefill {t['prefill'] * 1e3:.1f} ms, decode {t['decode'] * 1e3:.1f} ms")
    print(f"  per-token decode (median)   : {step * 1e3:.2f} ms; floor {floor * 1e3:.2f} ms "
          f"= {weights / 1e6:.0f} MB decoder weights / {bw / 1e9:.1f} GB/s read bandwidth "
          f"(x{step / floor:.2f} the floor)")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
