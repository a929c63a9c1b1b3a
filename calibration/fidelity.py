"""How far quantized artifacts are from their FP32 source, on held-out images.

Per visual stage: cosine similarity of each output token to FP32 (mean, and the 1st percentile
as "worst 1%") and max abs error; each stage fed the same FP32 inputs, so its own error is
measured. Decoder (when the LLM is quantized): next-token top-1 agreement and mean
KL(FP32 || quantized) under teacher forcing on the FP32 model's own captions, through the whole
LLM as its family runs it (Flan-T5: encoder, cross K/V and decoder). End to end: caption exact match against
FP32 and, where the images have ground truth (synthetic scenes), accuracy against it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from calibration.gates import gate_line
from calibration.sources import ImageSource
from runtime.cosines import token_cosines, worst_1pct
from runtime.generation.logits import log_softmax
from runtime.pipeline import Blip2Pipeline
from runtime.stages import IMAGE_EMBEDS, PIXEL_VALUES, QUERY_EMBEDS

BATCH = 16


def cosine_summary(cos: list[np.ndarray], max_abs: float) -> dict:
    c = np.concatenate(cos)
    return {"cosine_mean": float(c.mean()), "cosine_worst_1pct": worst_1pct(c),
            "max_abs_error": float(max_abs), "tokens": int(c.size)}


def stage_pair_references(fp32, images, second: str, feeds: Callable[[np.ndarray], dict], output: str) -> list:
    """FP32's side of stage_pair_fidelity, per batch: (pixels, vision output, the second stage's
    feeds made from it, the second stage's output)."""
    batches = []
    for start in range(0, len(images), BATCH):
        pixels = fp32.preprocessing.batch(images[start:start + BATCH]).astype(fp32.float_dtype)
        ref_v = fp32.runners["vision"].infer({PIXEL_VALUES: pixels})[IMAGE_EMBEDS]
        second_feeds = feeds(ref_v)
        batches.append((pixels, ref_v, second_feeds, fp32.runners[second].infer(second_feeds)[output]))
    return batches


def stage_pair_against(batches: list, quant, second: str, output: str) -> dict:
    """The quantized side: each stage on FP32's inputs, against FP32's outputs."""
    cos = {"vision": [], second: []}
    worst = {"vision": 0.0, second: 0.0}
    for pixels, ref_v, second_feeds, ref_s in batches:
        got_v = quant.runners["vision"].infer({PIXEL_VALUES: pixels})[IMAGE_EMBEDS]
        got_s = quant.runners[second].infer(second_feeds)[output]
        for stage, ref, got in (("vision", ref_v, got_v), (second, ref_s, got_s)):
            cos[stage].append(token_cosines(got, ref))
            worst[stage] = max(worst[stage], float(np.abs(ref.astype(np.float64) - got).max()))
    return {stage: cosine_summary(cos[stage], worst[stage]) for stage in cos}


def stage_pair_fidelity(fp32, quant, images, second: str, feeds: Callable[[np.ndarray], dict], output: str) -> dict:
    """Per-token cosine and worst error of the quantized vision stage and of the stage after it
    (`second`, fed `feeds(vision output)`, read at `output`), both against FP32. The second stage
    reads FP32's vision output in both runs, so each stage's own error is what is measured.
    `fp32` and `quant` are any two loaded artifacts of one model (pipeline or retriever)."""
    return stage_pair_against(stage_pair_references(fp32, images, second, feeds, output), quant, second, output)


def _forced_logits(pipe: Blip2Pipeline, inputs, captions: list[list[int]]) -> list[list[np.ndarray]]:
    """Each row's next-token logits along its own caption (teacher forcing), the rows of one
    batch decoded together: on a large decoder a step's cost is reading the weights, whatever
    the batch. A row past the end of its caption is fed padding, and its logits are dropped."""
    decoder = pipe.new_decoder(io_binding=False)
    logits = decoder.prefill(inputs.embeds, inputs.mask)
    longest = max((len(c) for c in captions), default=0)
    rows: list[list[np.ndarray]] = [[] for _ in captions]
    for t in range(longest):
        for i, caption in enumerate(captions):
            if t < len(caption):
                rows[i].append(logits[i].copy())
        if t + 1 < longest:
            ids = [caption[t] if t < len(caption) else pipe.pad_id for caption in captions]
            logits = decoder.step(np.array(ids, np.int64))
    return rows


def teacher_forced_references(fp32: Blip2Pipeline, images, captions: list[list[int]]) -> list:
    """FP32's side of the decoder comparison, per batch of images: the LLM's inputs (FP32's
    query), the captions they are forced along, and FP32's logits at each position of each, as
    the decoder gave them (half the bytes of the float64 log-probabilities they become in
    decoder_against)."""
    out = []
    for start in range(0, len(images), BATCH):
        batch, forced = images[start:start + BATCH], captions[start:start + BATCH]
        inputs = fp32.layout(fp32.encode(batch, {}), [fp32.caption_prompt(None)] * len(batch))
        out.append((inputs, forced, _forced_logits(fp32, inputs, forced)))
    return out


def decoder_against(references: list, quant: Blip2Pipeline) -> dict:
    """Teacher forcing: the quantized decoder reads FP32's inputs and captions; next-token top-1
    agreement and KL(FP32 || quantized) at each position."""
    agree = total = 0
    kls = []
    for inputs, captions, ref_rows in references:
        for ref_row, got_row in zip(ref_rows, _forced_logits(quant, inputs, captions)):
            for ref_logits, logits in zip(ref_row, got_row):
                lp_ref = log_softmax(ref_logits[None].astype(np.float64))[0]
                lp_got = log_softmax(logits[None].astype(np.float64))[0]
                agree += int(lp_ref.argmax() == lp_got.argmax())
                total += 1
                kls.append(float(np.sum(np.exp(lp_ref) * (lp_ref - lp_got))))
    return {"top1_agreement": agree / max(total, 1), "mean_kl": float(np.mean(kls)) if kls else 0.0,
            "positions": total}


def _captions(pipe: Blip2Pipeline, images) -> list:
    return [r for start in range(0, len(images), BATCH) for r in pipe.caption(images[start:start + BATCH])]


def fidelity_references(fp32: Blip2Pipeline, source: ImageSource, llm_quantized: bool) -> dict:
    """Everything the report needs from FP32 (the source), so that it can be freed before the
    quantized artifacts are loaded: the two never hold their weights side by side."""
    images = source.held_out_images()
    refs = {"images": images, "scenes": source.scenes,
            "visual": stage_pair_references(fp32, images, "qformer", fp32.qformer_feeds, QUERY_EMBEDS),
            "captions": _captions(fp32, images)}
    if llm_quantized:
        refs["decoder"] = teacher_forced_references(fp32, images, [r.tokens for r in refs["captions"]])
    return refs


def fidelity_against(refs: dict, quant: Blip2Pipeline) -> dict:
    """The report: the quantized artifacts against fidelity_references' FP32 side."""
    images, ref = refs["images"], refs["captions"]
    report = {"held_out_images": len(images), "stages": stage_pair_against(refs["visual"], quant, "qformer",
                                                                            QUERY_EMBEDS)}
    got = _captions(quant, images)
    if "decoder" in refs:
        report["stages"]["decoder"] = decoder_against(refs["decoder"], quant)
    e2e = {"caption_exact_match_vs_fp32": float(np.mean([a.text == b.text for a, b in zip(ref, got)]))}
    if refs["scenes"]:
        truth = [s.caption for s in refs["scenes"]]
        e2e["fp32_accuracy"] = float(np.mean([r.text == t for r, t in zip(ref, truth)]))
        e2e["quantized_accuracy"] = float(np.mean([r.text == t for r, t in zip(got, truth)]))
    report["end_to_end"] = e2e
    return report


def fidelity_report(fp32: Blip2Pipeline, quant: Blip2Pipeline, source: ImageSource, llm_quantized: bool) -> dict:
    return fidelity_against(fidelity_references(fp32, source, llm_quantized), quant)


def report_lines(report: dict) -> list[str]:
    lines = [f"fidelity on {report['held_out_images']} held-out images:"]
    for stage, s in report["stages"].items():
        if "cosine_mean" in s:
            lines.append(f"  {stage:<8} cosine mean {s['cosine_mean']:.5f}  worst 1% {s['cosine_worst_1pct']:.5f}  "
                         f"max abs err {s['max_abs_error']:.3e}")
        else:
            lines.append(f"  {stage:<8} top-1 agreement {s['top1_agreement']:.4f}  mean KL {s['mean_kl']:.2e}  "
                         f"({s['positions']} positions, teacher-forced)")
    e = report["end_to_end"]
    line = f"  end to end: caption exact match vs FP32 {e['caption_exact_match_vs_fp32']:.3f}"
    if "fp32_accuracy" in e:
        line += f"; accuracy vs ground truth FP32 {e['fp32_accuracy']:.3f}, quantized {e['quantized_accuracy']:.3f}"
    lines.append(line)
    for g in report.get("gates", []):
        lines.append(gate_line(g, 34))
    return lines
