"""Shared vs concat KV cache (exporter --kv-cache): the decode step through the runtime's own
decoders (SharedKVCacheDecoder, KVCacheDecoder as the pipeline runs it on the CPU), FP32 and the
quantize defaults INT8/INT4, at several cache lengths and batches.

For each case both forms are prefilled once with the same random embeddings, then step the same
token ids in interleaved rounds (a few steps each, so the cache grows by rounds x steps); the
step time is the median over all rounds. The argmax of both forms' logits is compared on every
step. Results: bench/KV_CACHE_RESULTS.md.

    flock /tmp/blip2-heavy.lock python bench/kv_cache_bench.py [--llm opt|llama]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, ensure_fp32_artifacts, machine  # noqa: E402

FORMS = ("concat", "shared")


def decoder_files(llm: str, precisions: list[str]) -> dict:
    """(form, precision) -> (decoder graph, artifact dir): the FP32 exports, and their decoders
    quantized as `quantize --llm` quantizes them."""
    import logging

    from calibration.llm import LLMOptions, quantize_decoder

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    out = {}
    for form in FORMS:
        _, art = ensure_fp32_artifacts("bench", llm=llm, kv_cache=form)
        for precision in precisions:
            path = art / "decoder.onnx"
            if precision != "fp32":
                path = OUT / "decoders" / f"{art.name}-{precision}.onnx"
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    quantize_decoder(art / "decoder.onnx", path, LLMOptions(precision=precision))
            out[(form, precision)] = (path, art)
    return out


def new_decoder(form: str, path: Path, art: Path):
    from runtime.backends.onnxrt import OrtRunner
    from runtime.generation.kv_cache import KVCacheDecoder
    from runtime.generation.shared_kv_cache import SharedKVCacheDecoder

    model = json.loads((art / "manifest.json").read_text())["model"]
    table = np.load(art / "embed_tokens.npy")
    runner = OrtRunner(path, ["CPUExecutionProvider"], allow_spinning=True)  # the pipeline's decoder setting
    if form == "shared":
        return SharedKVCacheDecoder(runner, table, model, np.float32), model
    return KVCacheDecoder(runner, table, model, np.float32), model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", choices=("opt", "llama"), default="opt")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[40, 200, 500], help="cache length after prefill")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    args = ap.parse_args()

    files = decoder_files(args.llm, args.precisions)
    rng = np.random.default_rng(0)
    print(f"# shared vs concat KV cache, bench {args.llm} decoder, decode step through the runtime's decoders")
    print(f"# {machine()}; median step over {args.rounds} interleaved rounds x {args.steps} steps after one prefill\n")
    print("| LLM | batch | cache length | concat step ms | shared step ms | shared / concat | argmax agree |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for precision in args.precisions:
        decoders = {form: new_decoder(form, *files[(form, precision)]) for form in FORMS}
        model = decoders["shared"][1]
        for batch in args.batches:
            for length in args.lengths:
                embeds = rng.standard_normal((batch, length, model["text_hidden"])).astype(np.float32) * 0.1
                mask = np.ones((batch, length), np.int64)
                for dec, _ in decoders.values():
                    dec.prefill(embeds, mask)
                    dec.step_times.clear()
                agree = total = 0
                for r in range(args.rounds):
                    ids = rng.integers(4, model["vocab_size"], size=(args.steps, batch))
                    order = FORMS if r % 2 == 0 else FORMS[::-1]
                    logits = {}
                    for form in order:
                        time.sleep(0.05)  # the other session's spinning threads settle first
                        logits[form] = [decoders[form][0].step(t) for t in ids]
                    for a, b in zip(logits["concat"], logits["shared"]):
                        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                        total += batch
                med = {form: statistics.median(decoders[form][0].step_times) * 1e3 for form in FORMS}
                print(f"| {precision} | {batch} | {length} | {med['concat']:.2f} | {med['shared']:.2f} | "
                      f"x{med['shared'] / med['concat']:.2f} | {agree}/{total} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
