"""Images embedded per second by the retrieval runtime (bench shapes: ViT-B/16 at 224, 12-layer
Q-Former, 32 queries, 256-d embeddings), FP32 and INT8, against transformers' own
Blip2ForImageTextRetrieval on the same weights, side by side on this CPU.

    flock /tmp/blip2-heavy.lock python bench/retrieval_bench.py            # builds what it needs once
    flock /tmp/blip2-heavy.lock python bench/retrieval_bench.py --rounds 3 --batch 8

1. Builds (once, under bench/out/) the random-weight `bench` retrieval checkpoint, its validated
   FP32 export and its INT8 quantization (vision and image_embed stages, uint8 activations for
   ONNX Runtime's x86 kernels, 64 synthetic calibration images; random weights: gates reported,
   not enforced).
2. Warms each up, then alternates rounds: every round times each variant embedding the same
   batch of decoded 224x224 images (preprocessing included), so a machine busy for a while
   slows all of them alike. ITC embeddings are checked against transformers' every round (max
   abs diff; INT8 shown for information).
3. Prints images/s (median round), the speedup over transformers eager, and text embeddings/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, machine  # noqa: E402
from runtime import synthetic  # noqa: E402


def ensure_artifacts(size: str, num_calib: int) -> tuple[Path, Path, Path]:
    from calibration.quantize import QuantizeOptions, quantize
    from exporter.export import ExportOptions, export
    from exporter.random_models import make_retrieval_model

    ckpt = OUT / "models" / f"retrieval-{size}"
    if not (ckpt / "config.json").is_file():
        make_retrieval_model(size, ckpt)
    fp32 = OUT / "artifacts" / f"retrieval-{size}-fp32"
    if not (fp32 / "manifest.json").is_file():
        export(str(ckpt), fp32, ExportOptions(overwrite=True))
    int8 = OUT / "artifacts" / f"retrieval-{size}-int8"
    if not (int8 / "manifest.json").is_file():
        quantize(fp32, int8, QuantizeOptions(num_calib=num_calib, held_out=32, gate=False, overwrite=True))
    return ckpt, fp32, int8


def torch_embedder(ckpt: Path):
    """transformers' ITC image embeddings: its forward's use_image_text_matching_head=False branch
    up to image_embeds (vision model, queries through the Q-Former, vision_projection, normalise)."""
    import torch

    from exporter.loading import LoadOptions, load_model

    model, processor = load_model(str(ckpt), LoadOptions())

    def embed(images):
        with torch.no_grad():
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            vision = model.vision_model(pixel_values=pixels).last_hidden_state
            queries = model.query_tokens.expand(vision.shape[0], -1, -1)
            out = model.qformer(query_embeds=queries, encoder_hidden_states=vision).last_hidden_state
            return torch.nn.functional.normalize(model.vision_projection(out), dim=-1).numpy()

    return embed, torch.get_num_threads()


def main(argv=None) -> int:
    import numpy as np

    from runtime.retriever import Blip2Retriever

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "bench", "full"), default="bench")
    ap.add_argument("--batch", type=int, default=8, help="images per embed call (default 8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--no-torch", action="store_true", help="skip transformers' eager reference")
    args = ap.parse_args(argv)

    ckpt, fp32_dir, int8_dir = ensure_artifacts(args.size, args.num_calib)
    images = [im.resize((224, 224)) for _, im in synthetic.make_scenes(args.batch, seed=3, image_size=224)]
    variants = {"onnxruntime fp32": Blip2Retriever.from_artifacts(fp32_dir, batch_size=args.batch).embed_images,
                "onnxruntime int8": Blip2Retriever.from_artifacts(int8_dir, batch_size=args.batch).embed_images}
    torch_threads = None
    if not args.no_torch:
        variants["transformers eager"], torch_threads = torch_embedder(ckpt)
    reference = variants.get("transformers eager", variants["onnxruntime fp32"])(images)
    for fn in variants.values():  # warm-up
        fn(images)
    times: dict[str, list[float]] = {k: [] for k in variants}
    diffs: dict[str, float] = {k: 0.0 for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn(images)
            times[name].append(time.perf_counter() - t0)
            diffs[name] = max(diffs[name], float(np.abs(out - reference).max()))

    texts = sorted({s.caption for s, _ in synthetic.make_scenes(64, seed=4)})
    fp32 = Blip2Retriever.from_artifacts(fp32_dir, batch_size=32)
    fp32.embed_texts(texts)
    t0 = time.perf_counter()
    fp32.embed_texts(texts)
    text_rate = len(texts) / (time.perf_counter() - t0)

    base = statistics.median(times["transformers eager"]) if "transformers eager" in times else None
    rows = {}
    print(f"{machine()}; {args.size} retrieval shapes, batch {args.batch}, {args.rounds} alternating rounds "
          f"(median), torch threads {torch_threads}")
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"images_per_s": args.batch / med, "median_s": med, "max_abs_diff_vs_reference": diffs[name]}
        speed = f"  {base / med:4.2f}x transformers" if base else ""
        print(f"  {name:<20} {args.batch / med:7.1f} images/s  ({med * 1000:7.1f} ms / batch){speed}  "
              f"max |embeds - transformers'| {diffs[name]:.1e}")
    print(f"  text embeddings (fp32): {text_rate:.0f} texts/s ({len(texts)} captions, batch 32)")
    result = {"size": args.size, "batch": args.batch, "rounds": args.rounds, "machine": machine(),
              "image_embedding": rows, "text_embeddings_per_s": text_rate}
    (OUT / f"retrieval-{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
