"""Batched decode on the CPU: images/s and tokens/s at batch 1, 4 and 8, and what one decode
step costs at each batch against batch 1.

    python bench/batch_bench.py                  # bench model, uint8 visual + INT4 LLM
    python bench/batch_bench.py --rounds 3       # quicker

Quantizes the `bench` FP32 export once (uint8 visual stages, INT4 LLM, the `quantize` defaults
otherwise), as bench/quant_bench.py does, and reuses that directory when it is there. Each
batch captions different synthetic scenes with greedy search and exactly --new-tokens new
tokens (min = max), rounds interleaved with a rotating order of batch sizes, medians. A decode
step reads every weight once whatever the batch, so a memory-bound step should cost little more
at batch 8 than at batch 1. Also checks that each batched caption's tokens equal the same image
captioned alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, ensure_fp32_artifacts, machine, timed  # noqa: E402
from runtime import synthetic  # noqa: E402

QUANTIZED = OUT / "artifacts" / "bench-uint8-int4"


def ensure_quantized(fp32: Path, num_calib: int) -> Path:
    if not (QUANTIZED / "manifest.json").is_file():
        timed([sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(QUANTIZED), "--synthetic",
               str(num_calib), "--activations", "uint8", "--llm", "int4", "--held-out", "16", "--no-gate",
               "--overwrite", "--calibration-cache", str(OUT / "bench-ranges-uint8.json")])
    return QUANTIZED


def decoder_alone(fp32: Path, batches: list[int], past: int, rounds: int) -> None:
    """The decoder graph alone, one step at each batch (ONNX Runtime sessions, random feeds, no
    pipeline): FP32, INT8 and INT4 (the quantize defaults), rounds interleaved. Also each
    batched row against the same row run alone: max |logit difference| and argmax changes.
    `fp32`: an export with the concat KV cache, whose inputs plain feeds fill."""
    import logging
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from bench.nbits_sweep import step_inputs
    from calibration.llm import LLMOptions, quantize_decoder

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": fp32 / "decoder.onnx", "int8": Path(tmp) / "int8.onnx", "int4": Path(tmp) / "int4.onnx"}
        for precision in ("int8", "int4"):
            quantize_decoder(paths["fp32"], paths[precision], LLMOptions(precision=precision))
        sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    rows = [step_inputs(sessions["fp32"], past, rng) for _ in range(max(batches))]
    feeds = {b: {k: np.concatenate([r[k] for r in rows[:b]]) for k in rows[0]} for b in batches}
    cases = [(k, b) for k in sessions for b in batches]
    times: dict = {c: [] for c in cases}
    for c in cases:  # warm-up
        sessions[c[0]].run(["logits"], feeds[c[1]])
    for r in range(rounds):
        for k, b in cases[r % len(cases):] + cases[: r % len(cases)]:
            t0 = time.perf_counter()
            sessions[k].run(["logits"], feeds[b])
            times[(k, b)].append(time.perf_counter() - t0)
    print(f"\n## decoder graph alone: one step, KV cache of {past} positions, median of {rounds} interleaved rounds\n")
    print("| LLM | " + " | ".join(f"step ms at batch {b}" for b in batches) + " | batch "
          f"{batches[-1]} vs 1 | batched rows vs alone: max abs logit diff, argmax changes |")
    print("| --- " * (len(batches) + 3) + "|")
    for k, s in sessions.items():
        med = [statistics.median(times[(k, b)]) for b in batches]
        alone = [s.run(["logits"], r)[0][:, -1] for r in rows]
        together = s.run(["logits"], feeds[max(batches)])[0][:, -1]
        diff = max(float(np.abs(a[0] - t).max()) for a, t in zip(alone, together))
        changed = sum(int(a[0].argmax() != t.argmax()) for a, t in zip(alone, together))
        print(f"| {k} | " + " | ".join(f"{m * 1e3:.2f}" for m in med) + f" | x{med[-1] / med[0]:.2f} | "
              f"{diff:.2e}, {changed}/{len(rows)} |")


def main() -> int:
    from runtime.pipeline import Blip2Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-calib", type=int, default=64, help="calibration images if it must quantize")
    ap.add_argument("--past", type=int, default=50, help="KV cache length of the decoder-alone steps")
    args = ap.parse_args()

    _, fp32 = ensure_fp32_artifacts("bench")
    art = ensure_quantized(fp32, args.num_calib)
    q = json.loads((art / "manifest.json").read_text())["quantization"]["llm"]
    pipe = Blip2Pipeline.from_artifacts(art)
    images = [img for _, img, *_ in synthetic.make_scenes(max(args.batches), seed=7)]
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n, num_beams=1, stop_strings=())

    alone = [pipe.caption([img], **gen)[0].tokens for img in images]  # also the warm-up of batch 1
    for b in args.batches:
        pipe.caption(images[:b], **gen)  # warm-up
    runs: dict[int, list] = {b: [] for b in args.batches}
    mismatched = {b: 0 for b in args.batches}
    for r in range(args.rounds):
        order = args.batches[r % len(args.batches):] + args.batches[: r % len(args.batches)]
        for b in order:
            t0 = time.perf_counter()
            results = pipe.caption(images[:b], **gen)
            wall = time.perf_counter() - t0
            t = results[0].timings
            assert all(len(x.tokens) == n for x in results), "min_new_tokens = max_new_tokens not honoured"
            mismatched[b] += sum(x.tokens != alone[i] for i, x in enumerate(results))
            runs[b].append({"wall": wall, "visual": t["vision"] + t["qformer"], "prefill": t["prefill"],
                            "decode": t["decode"], "step": statistics.median(t["decode_steps"])})

    med = {b: {k: statistics.median(x[k] for x in runs[b]) for k in runs[b][0]} for b in args.batches}
    base = med[args.batches[0]]
    print(f"# batched decode, bench model (ViT-B/16 + 12-layer Q-Former + OPT-125m shapes), uint8 visual + INT4 LLM "
          f"(LLM {q.get('precision')}, block {q.get('block_size')}, accuracy level {q.get('accuracy_level')}, "
          f"lm_head {q.get('lm_head')})")
    print(f"# {machine()}; greedy, {n} new tokens forced, different synthetic images per row, "
          f"median of {args.rounds} interleaved rounds after one warm-up\n")
    print("| batch | end to end ms | images/s | tokens/s (end to end) | vision+qformer ms | prefill ms | decode ms | "
          "decode tokens/s | step ms (median) | step vs batch 1 | rows != alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in args.batches:
        m = med[b]
        print(f"| {b} | {m['wall'] * 1e3:.0f} | {b / m['wall']:.2f} | {b * n / m['wall']:.1f} | {m['visual'] * 1e3:.0f} | "
              f"{m['prefill'] * 1e3:.0f} | {m['decode'] * 1e3:.0f} | {b * n / m['decode']:.1f} | {m['step'] * 1e3:.2f} | "
              f"x{m['step'] / base['step']:.2f} | {mismatched[b]}/{b * args.rounds} |")
    decoder_alone(ensure_fp32_artifacts("bench", kv_cache="concat")[1], args.batches, args.past, args.rounds * 4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
