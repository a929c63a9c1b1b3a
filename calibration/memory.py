"""The expected peak memory of `quantize`, from the source artifact directory's files, before
anything is loaded: `quantize` prints it and refuses in one line when it does not fit the memory
available or --max-memory (runtime/host_memory.py).

What quantize holds (calibration/quantize.py), in anonymous memory (RssAnon, what must fit):

    base       the interpreter with onnx and onnxruntime (no torch)                         0.1 GB
    reference  the source's ONNX Runtime sessions, every stage, while the FP32 (FP16) side   R x G
               of the fidelity report is taken: R = 1.4 for fp32 graphs, 1.2 for fp16 ones
               (sessions that keep one copy of the weights, ThreadSettings.low_memory: the CPU
               provider would fold float32 copies beside them, 2.5x), G = the source's graph
               files (runtime.artifact.memory)
    then only the source's vision stage (R x S_vision, none with --visual none; a retrieval
    source stays whole), and
    the largest of, one after the other:
      calibration of the vision stage: the augmented graph's session     2.25 x S_vision
               and one batch (8 images, fewer where they would pass       + 13.5 x S_vision x P / H
               ACTIVATION_BUDGET) of every intermediate output, which        x batch / 8
               grow with the tokens P and shrink per weight with the
               width H (ViT-B: 197 / 768)
      calibration of another visual stage (the Q-Former: 32 queries)      2.7 x S
      weight-only quantization of an LLM stage: onnx.load of the graph    2.0 x S_llm
               and MatMulNBits' quantized initializers; a graph with
               external data one weight at a time                         4.5 GB
    then, the source freed, the fidelity report: the quantized pipeline   1.5 x G_quantized

Fitted on bench/export_bench.py's per-phase samples of `quantize --llm int4 --synthetic 8` from
fp32 exports, two runs each (GB; anonymous memory; bench/EXPORT_RESULTS.md):

    source         G      vision  qformer  LLM stage   measured: calibrate vision / qformer / LLM   estimate
    bench (OPT)    1.40   0.34    0.40     0.50           3.83-3.97 / 3.14 / 2.94-2.98              4.02 / 3.14 / 3.06
    bench-t5       1.73   0.34    0.40     0.50           4.27-4.47 / 3.54-3.56 / 3.07-3.45         4.48 / 3.61 / 3.52
    bench-llama    2.03   0.34    0.40     1.16           4.67-4.71 / 3.81-3.83 / 4.63-4.71         4.90 / 4.03 / 5.27

The vision term was fitted on ViT-B at 224 (fp32); bench/EXPORT_RESULTS.md has the fp16 sources
of the released shapes (ViT-g/14: P 257, H 1408) beside their estimates.
"""

from __future__ import annotations

from runtime.artifact.manifest import Manifest
from runtime.artifact.memory import artifact_weights
from runtime.families import family_for

BASE = 0.1e9
SOURCE = {"fp32": 1.4, "fp16": 1.2}  # ONNX Runtime CPU sessions of the source, x their files (fp16: low_memory)
CALIBRATION = 2.25  # x the vision stage's files: the augmented graph's session
ACTIVATIONS = 13.5  # x the vision stage's files x tokens / width: one batch of intermediate outputs
CALIB_BATCH = 8  # images per calibration batch, at most
# The vision stage's calibration batch holds every intermediate output of its images: at most
# this many bytes of them (ViT-B at 224: 8 images, 1.2 GB; ViT-g/14 at 224 from fp16: 1 image, 1.2 GB).
ACTIVATION_BUDGET = 2e9
CALIBRATION_OTHER = 2.7  # x another visual stage's files (the Q-Former's few queries: little activation)
WEIGHT_ONLY = 2.0  # x the LLM stage's files
# An LLM graph with external data, one weight at a time (nbits_streaming.py): 4.31 GB measured
# for the 13.2 GB fp16 decoder of instructblip-vicuna-7b.
STREAMED = 4.5e9
QUANTIZED = 1.5  # the quantized pipeline's sessions, x its (estimated) files
# Bytes per source byte of a quantized graph: INT8 QDQ visual stages, MatMulNBits LLM stages
# (4 or 8 bits + one fp32 scale per block of 128), per source precision.
_SHRINK = {"visual": 1.0 / 4, "int4": (0.5 + 4 / 128) / 4, "int8": (1 + 4 / 128) / 4, "none": 1.0}


def _vision_calibration(manifest: Manifest, size: float) -> tuple[int, float]:
    """(images per batch, bytes of intermediate outputs per image) of the vision stage's
    calibration, `size` its graph's weights."""
    model = manifest.model
    half = manifest.stages["vision"]["precision"] == "fp16"
    per_image = ACTIVATIONS * size * (2.0 if half else 1.0) * model["num_patches"] / model["vision_hidden"] / CALIB_BATCH
    return max(1, min(CALIB_BATCH, int(ACTIVATION_BUDGET // per_image))), per_image


def vision_calibration_batch(manifest: Manifest) -> int:
    """Images per batch in the vision stage's calibration: as many as keep its intermediate
    outputs within ACTIVATION_BUDGET, 1 to CALIB_BATCH. MinMax ranges do not depend on it; the
    histogram methods merge the batches' histograms."""
    return _vision_calibration(manifest, artifact_weights(manifest)["stages"]["vision"]["bytes"])[0]


def quantize_peak(manifest: Manifest, llm: str, visual: bool = True) -> dict:
    """The expected anonymous peak of `quantize` (bytes) with --llm `llm`, and of each phase;
    visual=False (--visual none): the visual stages are not calibrated, only linked."""
    family = family_for(manifest.data)
    weights = artifact_weights(manifest)
    stages = {name: s["bytes"] for name, s in weights["stages"].items()}
    streamed = {name for name, s in manifest.stages.items() if s.get("external_data")}
    precision = {s["precision"] for s in weights["stages"].values()}
    half = precision == {"fp16"}
    source = SOURCE["fp16" if half else "fp32"]
    scale = 2.0 if half else 1.0  # an fp16 graph holds half the bytes per weight of the fp32 it shrinks from
    quantized = weights["embeddings"]
    generation = family.task != "retrieval"
    # Generation artifacts: the source's side of the report first, then its vision stage alone
    # (calibration), then, the source freed, the quantized pipeline. Retrieval: the source whole
    # throughout, and both side by side for the report (its models are small).
    phases = {"reference": BASE + source * weights["total"]}
    held = BASE + source * ((stages["vision"] if visual else 0) if generation else weights["total"])
    for name, size in stages.items():
        if name in family.visual_stages and not visual:
            quantized += size
        elif name == "vision":
            batch, per_image = _vision_calibration(manifest, size)
            phases[f"calibrate {name}"] = held + CALIBRATION * size + batch * per_image
            quantized += size * _SHRINK["visual"] * scale
        elif name in family.visual_stages:
            phases[f"calibrate {name}"] = held + CALIBRATION_OTHER * size
            quantized += size * _SHRINK["visual"] * scale
        elif name in family.weight_only_stages and llm != "none":
            phases[f"quantize {name}"] = held + (STREAMED if name in streamed else WEIGHT_ONLY * size)
            quantized += size * _SHRINK[llm] * scale
        else:
            quantized += size
    phases["fidelity"] = (BASE if generation else held) + QUANTIZED * quantized
    phases = {k: int(v) for k, v in phases.items()}
    return {"peak": max(phases.values()), "phases": phases, "source": weights["total"]}
