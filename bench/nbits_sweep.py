"""MatMulNBits settings for the weight-only LLM decoder, chosen by measurement on this CPU.

    python bench/nbits_sweep.py                     # bench model (OPT-125m shapes), past length 40
    python bench/nbits_sweep.py --rounds 30 --past 100

Quantizes the `bench` FP32 decoder once per (bits, block size, accuracy level) with the same
code `quantize --llm` runs (calibration/llm.py), then times one decode step (batch 1, one new
token, a KV cache of --past positions) of every variant in interleaved rounds with a rotating
order, so that every variant sees the same machine state; medians. Each variant's step is
compared with the step's FP32 floor: the graph's weight bytes / all-core read bandwidth
measured in the same run. Fidelity: top-1 agreement and logit cosine with FP32 over the same
random steps (random weights: a relative signal only).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ensure_fp32_artifacts, graph_weight_bytes, machine, read_bandwidth  # noqa: E402

DIMS = {"batch": 1, "sequence": 1}


def step_inputs(session, past: int, rng: np.random.Generator, batch: int = 1) -> dict:
    """One decode step's feed from the graph's own input metadata (a decoder of the concat KV
    cache form: bench/kv_cache_bench.py measures the shared one through the runtime)."""
    dims = {**DIMS, "batch": batch, "past_sequence": past, "total_sequence": past + 1}
    feed = {}
    for i in session.get_inputs():
        shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
        if i.type == "tensor(int64)":
            feed[i.name] = (np.arange(past, past + shape[-1]).reshape(shape) if "position" in i.name
                            else np.ones(shape, np.int64))
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32) * 0.5
    return feed


def main() -> int:
    import logging

    import onnxruntime as ort

    from calibration.llm import LLMOptions, quantize_decoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench")
    ap.add_argument("--past", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    # Level 0 (float kernels) measured 20-60x slower than level 4 here (bench/NBITS_RESULTS.md).
    ap.add_argument("--levels", type=int, nargs="+", default=[4])
    args = ap.parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node

    _, art = ensure_fp32_artifacts(args.size, kv_cache="concat")  # step_inputs fills the concat form's inputs
    src = art / "decoder.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {"fp32": ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])}
    floors = {"fp32": graph_weight_bytes(src)}
    with tempfile.TemporaryDirectory() as tmp:
        for bits, block, level in itertools.product((8, 4), args.blocks, args.levels):
            label = f"int{bits} b{block} acc{level}"
            dst = Path(tmp) / f"{label.replace(' ', '_')}.onnx"
            quantize_decoder(src, dst, LLMOptions(precision=f"int{bits}", block_size=block, accuracy_level=level))
            sessions[label] = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
            floors[label] = graph_weight_bytes(dst)

        rng = np.random.default_rng(0)
        feeds = [step_inputs(sessions["fp32"], args.past, rng) for _ in range(4)]
        want = [sessions["fp32"].run(["logits"], f)[0][:, -1] for f in feeds]
        bandwidth = read_bandwidth()
        times = {k: [] for k in sessions}
        labels = list(sessions)
        for _ in range(3):  # warm-up
            for s in sessions.values():
                s.run(["logits"], feeds[0])
        for r in range(args.rounds):
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                t0 = time.perf_counter()
                sessions[k].run(["logits"], feeds[r % len(feeds)])
                times[k].append(time.perf_counter() - t0)

        print(f"# MatMulNBits sweep, {args.size} decoder, batch 1, past {args.past}, {args.rounds} rounds")
        print(f"# {machine()}; read bandwidth {bandwidth / 1e9:.1f} GB/s (best of 5, all cores)\n")
        print("| variant | step ms (median) | vs fp32 | weight MB | floor ms | x floor | top-1 agree | logit cosine |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        base = statistics.median(times["fp32"])
        for k in labels:
            med = statistics.median(times[k])
            got = [sessions[k].run(["logits"], f)[0][:, -1] for f in feeds]
            agree = np.mean([int(g.argmax() == w.argmax()) for g, w in zip(got, want)])
            cos = np.mean([float((g * w).sum() / np.linalg.norm(g) / np.linalg.norm(w)) for g, w in zip(got, want)])
            floor = floors[k] / bandwidth
            print(f"| {k} | {med * 1e3:.2f} | x{base / med:.2f} | {floors[k] / 1e6:.1f} | {floor * 1e3:.2f} | "
                  f"{med / floor:.2f} | {agree:.2f} | {cos:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
