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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from runtime import synthetic  # noqa: E402

OUT = HERE / "out"


def read_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes/s for a streaming read on every core at once (as ORT's threads read weights), of
    an array larger than the last-level cache; best of N. numpy's sum releases the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, os.cpu_count() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def graph_weight_bytes(path: Path) -> int:
    import onnx

    from exporter.onnx_export import tensor_bytes

    model = onnx.load(str(path), load_external_data=False)
    return sum(tensor_bytes(t, path.parent) for t in model.graph.initializer)


def ensure_artifacts(size: str) -> tuple[Path, Path]:
    from exporter.export import ExportOptions, export
    from exporter.random_models import make_model

    ckpt = OUT / "models" / size
    if not (ckpt / "config.json").is_file():
        make_model(size, ckpt)
    art = OUT / "artifacts" / f"{size}-fp32"
    if not (art / "manifest.json").is_file():
        export(str(ckpt), art, ExportOptions(overwrite=True))
    return ckpt, art


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

    ckpt, art = ensure_artifacts(args.model)
    model, processor = load_model(str(ckpt), LoadOptions())
    pipe = Blip2Pipeline.from_artifacts(art)
    image = synthetic.make_scenes(1, seed=99)[0][1]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n)  # forced length, so both sides do the same work

    def hf() -> list[int]:
        inputs = processor(images=[image], text=[""], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=1, **gen)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

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
