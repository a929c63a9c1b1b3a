"""How far quantized retrieval artifacts are from their FP32 source, on held-out images, measured
on retrieval itself.

- Per visual stage (vision, image_embed), each fed the same FP32 inputs: token cosine to FP32
  (mean and worst 1%) and max abs error, as for the generation families.
- End to end: cosine of each image's ITC embeddings (every query token) to FP32's.
- Recall of the quantized model vs FP32: each query's FP32 top-1 result, looked for in the
  quantized model's top 1 and top 5, text->image (text queries over the held-out images) and
  image->text (held-out images over the texts). Texts: the held-out scenes' captions for
  synthetic images; for an image folder, the synthetic scene captions (any fixed text set
  measures whether the ranking survives quantization).
- Where the images have ground truth (synthetic scenes): recall@1 against it, FP32 and quantized.
"""

from __future__ import annotations

import numpy as np

from calibration.fidelity import cosine_summary, stage_pair_fidelity
from calibration.gates import gate_line
from calibration.sources import ImageSource
from runtime import synthetic
from runtime.cosines import token_cosines
from runtime.retriever import Blip2Retriever, similarity
from runtime.stages import IMAGE_EMBEDS, ITC_IMAGE_EMBEDS

KS = (1, 5)


def probe_texts(source: ImageSource) -> list[str]:
    if source.scenes:
        return sorted({s.caption for s in source.scenes})
    rng = np.random.default_rng(0)
    return sorted({synthetic.random_scene(rng).caption for _ in range(400)})


def recall_vs_reference(ref: np.ndarray, got: np.ndarray, axis: int) -> dict:
    """For each query (a column when axis=0, a row when axis=1), whether the reference's top-1
    item is within the top k of `got`'s ranking, averaged: recall@k of `got` vs `ref`."""
    if axis == 0:
        ref, got = ref.T, got.T
    best = ref.argmax(axis=1)  # (queries,)
    # Rank of the reference's best item in got's order (0 = top): items scored strictly higher.
    rank = (got > got[np.arange(len(best)), best][:, None]).sum(axis=1)
    return {f"recall_at_{k}": float(np.mean(rank < k)) for k in KS}


def ground_truth_recall(scores: np.ndarray, image_captions: list[str], texts: list[str]) -> dict:
    """Recall@1 against the scenes' captions: text->image counts a top image with that caption."""
    image_captions = np.asarray(image_captions)
    t2i = np.mean([image_captions[scores[:, j].argmax()] == t for j, t in enumerate(texts)])
    i2t = np.mean([texts[scores[i].argmax()] == c for i, c in enumerate(image_captions)])
    return {"text_to_image_recall_at_1": float(t2i), "image_to_text_recall_at_1": float(i2t)}


def retrieval_fidelity_report(fp32: Blip2Retriever, quant: Blip2Retriever, source: ImageSource) -> dict:
    images = source.held_out_images()
    texts = probe_texts(source)
    report = {"held_out_images": len(images), "texts": len(texts), "stages": stage_pair_fidelity(
        fp32, quant, images, "image_embed", lambda v: {IMAGE_EMBEDS: v}, ITC_IMAGE_EMBEDS)}
    ref_e, got_e = fp32.embed_images(images), quant.embed_images(images)
    report["embeddings"] = cosine_summary([token_cosines(got_e, ref_e)],
                                          float(np.abs(ref_e.astype(np.float64) - got_e).max()))
    ref_s = similarity(ref_e, fp32.embed_texts(texts))
    got_s = similarity(got_e, quant.embed_texts(texts))
    report["recall_vs_fp32"] = {"text_to_image": recall_vs_reference(ref_s, got_s, axis=0),
                                "image_to_text": recall_vs_reference(ref_s, got_s, axis=1)}
    if source.scenes:
        captions = [s.caption for s in source.scenes]
        report["ground_truth"] = {"fp32": ground_truth_recall(ref_s, captions, texts),
                                  "quantized": ground_truth_recall(got_s, captions, texts)}
    return report


def retrieval_report_lines(report: dict) -> list[str]:
    lines = [f"fidelity on {report['held_out_images']} held-out images and {report['texts']} texts:"]
    for stage, s in report["stages"].items():
        lines.append(f"  {stage:<11} cosine mean {s['cosine_mean']:.5f}  worst 1% {s['cosine_worst_1pct']:.5f}  "
                     f"max abs err {s['max_abs_error']:.3e}")
    e = report["embeddings"]
    lines.append(f"  ITC image embeddings end to end: cosine mean {e['cosine_mean']:.5f}  worst 1% "
                 f"{e['cosine_worst_1pct']:.5f}")
    for direction, r in report["recall_vs_fp32"].items():
        lines.append(f"  {direction.replace('_', ' ')} vs FP32's top 1: "
                     + "  ".join(f"recall@{k} {r[f'recall_at_{k}']:.3f}" for k in KS))
    if "ground_truth" in report:
        g = report["ground_truth"]
        for direction in ("text_to_image_recall_at_1", "image_to_text_recall_at_1"):
            lines.append(f"  {direction.replace('_', ' ')} vs ground truth: FP32 {g['fp32'][direction]:.3f}, "
                         f"quantized {g['quantized'][direction]:.3f}")
    for g in report.get("gates", []):
        lines.append(gate_line(g, 40))
    return lines
