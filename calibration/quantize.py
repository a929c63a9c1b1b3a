"""Artifact directory -> quantized artifact directory, with a fidelity report and gates.

The output is an ordinary artifact directory: the same runtime runs it with no code change.
It is written as a temporary sibling and renamed only when complete and through its gates.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

from calibration import gates as gates_mod
from calibration.fidelity import fidelity_against, fidelity_references, report_lines
from calibration.kept_report import keep_report
from calibration.llm import LLMOptions, quantize_decoder
from calibration.memory import CALIB_BATCH, quantize_peak, vision_calibration_batch
from calibration.retrieval_fidelity import retrieval_fidelity_report, retrieval_report_lines
from calibration.sources import ImageSource, folder_source, synthetic_source
from calibration.visual import RangeCache, VisualOptions, quantize_stage
from runtime import synthetic
from runtime.artifact.confinement import confined_path
from runtime.artifact.manifest import MANIFEST, Manifest, checksummed, load_manifest, sha256_file, write_manifest
from runtime.artifact.writer import atomic_directory, check_target
from runtime.backends.threads import ThreadSettings
from runtime.errors import Blip2EdgeError, OptionError
from runtime.families import family_for
from runtime.generation.shared_kv_cache import check_artifact_placement
from runtime.host_memory import check_fits
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline
from runtime.retriever import Blip2Retriever


@dataclass
class QuantizeOptions:
    images: Path | None = None  # a folder, or None for the synthetic generator
    num_calib: int = 512
    held_out: int = 100
    seed: int = 0
    # None (--visual none): the visual stages stay as exported (float): where another engine runs
    # float graphs faster than ONNX Runtime runs INT8 ones (OpenVINO bf16 on AMX, TensorRT FP16),
    # or to quantize the LLM alone. No calibration images are read then.
    visual: VisualOptions | None = field(default_factory=VisualOptions)
    llm: LLMOptions = field(default_factory=LLMOptions)
    calibration_cache: Path | None = None
    gate: bool = True
    gates: gates_mod.Gates = field(default_factory=gates_mod.Gates)
    overwrite: bool = False
    allow_requantize: bool = False
    # Bytes the run may use at its peak (--max-memory); the machine's available memory in any case.
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.num_calib < 1 and self.visual is not None:
            raise Blip2EdgeError(f"--num-calib must be >= 1, got {self.num_calib}")
        if self.held_out < 1:
            raise Blip2EdgeError(f"--held-out must be >= 1, got {self.held_out}")
        if self.visual is None and self.llm.precision == "none" and not self.llm.embed_fp16:
            raise OptionError("nothing to quantize: --visual none leaves the visual stages in float and --llm is "
                              "none (an artifact with an LLM: give --llm int8 or int4)")
        if self.visual is None and self.calibration_cache is not None:
            raise OptionError("--calibration-cache: applies to the visual stages' INT8 calibration, which "
                              "--visual none skips")

    @property
    def calibration_images(self) -> int:
        """Images read for calibration: none where the visual stages stay in float."""
        return self.num_calib if self.visual is not None else 0


def _link_or_copy(src: Path, dst: Path) -> None:
    """Unchanged files are hard-linked when possible (a 5 GB decoder need not be copied)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _source(opts: QuantizeOptions) -> ImageSource:
    if opts.images is None:
        return synthetic_source(opts.calibration_images, opts.seed, opts.held_out)
    return folder_source(opts.images, opts.calibration_images, opts.seed, opts.held_out)


def _stage_files(root: Path, name: str) -> list[str]:
    return [f for f in (name, name + ".data") if (root / f).exists()]


def instruction_feeds(source: LoadedArtifact):
    """For an instruction-aware Q-Former (InstructBLIP), image embeddings -> its feeds with the
    instructions it will read, in turn: the caption prompt and the synthetic scenes' questions
    in the VQA template. None for BLIP-2's, which reads the image alone."""
    if source.qformer_tokenizer is None:
        return None
    prompts = source.manifest.data["prompts"]
    instructions = [prompts["caption"], *(prompts["vqa"].format(q) for q in synthetic.QUESTIONS.values())]

    def feeds(image_embeds):
        batch = [instructions[i % len(instructions)] for i in range(len(image_embeds))]
        return source.family.qformer_feeds(image_embeds, batch, source.qformer_tokenizer, source.model)

    return feeds


def _quantize_visual(source: LoadedArtifact, stages: dict, tmp: Path, images: ImageSource, opts: QuantizeOptions,
                     log: Callable) -> set[str]:
    """INT8 QDQ graphs of the visual stages, calibrated on `images`; the source's own (float)
    vision stage feeds the Q-Former's calibration. Updates `stages` (the new manifest's);
    returns the files written (none with --visual none)."""
    produced: set[str] = set()
    if opts.visual is None:
        return produced
    src = source.manifest
    cache = RangeCache(opts.calibration_cache, images.calibration_identity())
    qformer_feeds = instruction_feeds(source)
    for stage in source.family.visual_stages:
        t0 = time.perf_counter()
        name = stages[stage]["file"]
        batch = vision_calibration_batch(src) if stage == "vision" else CALIB_BATCH
        settings = quantize_stage(stage, src.stage_file(stage), tmp / name, images, source.preprocessing,
                                  source.runners["vision"], src.input_dtype("vision"), opts.visual, cache,
                                  qformer_feeds, batch)
        files = _stage_files(tmp, name)
        stages[stage].update(precision="int8", external_data=files[1:],
                             quantization={"format": "QDQ", **opts.visual.describe(), **settings})
        produced.update(files)
        log(f"  quantized {stage:<8} -> {', '.join(files)}  ({time.perf_counter() - t0:.1f}s"
            f"{', ranges from cache' if stage in cache.reused else ''})")
    return produced


def _quantize_llm(source: LoadedArtifact, stages: dict, tmp: Path, opts: QuantizeOptions, log: Callable) -> set[str]:
    """Weight-only INT8/INT4 (MatMulNBits) graphs of the family's LLM stages; returns the files."""
    produced: set[str] = set()
    family = source.family
    for stage in family.weight_only_stages if opts.llm.precision != "none" else ():
        t0 = time.perf_counter()
        name = stages[stage]["file"]
        settings = quantize_decoder(source.manifest.stage_file(stage), tmp / name, opts.llm,
                                    has_lm_head=stage == family.logits_stage)
        files = _stage_files(tmp, name)
        stages[stage].update(precision=f"{opts.llm.precision}-weight-only", external_data=files[1:],
                             quantization=settings)
        produced.update(files)
        log(f"  quantized {stage:<8} -> {', '.join(files)}  ({time.perf_counter() - t0:.1f}s)")
    return produced


def _embeddings_fp16(src: Manifest, data: dict, tmp: Path, opts: QuantizeOptions) -> set[str]:
    """The LLM's embedding table in float16 (--embed-fp16); retrieval artifacts have none."""
    emb = data.get("embeddings")
    if emb is None or not opts.llm.embed_fp16 or emb["dtype"] == "float16":
        return set()
    np.save(tmp / emb["file"], np.load(src.path(emb["file"]), mmap_mode="r").astype(np.float16))
    emb["dtype"] = "float16"
    return {emb["file"]}


def _link_unchanged(src: Manifest, tmp: Path, produced: set[str]) -> None:
    for rel in src.data["files"]:
        # Both ends confined: only a listed file inside the source is read, and it is written
        # only inside the temporary output (load_manifest has refused anything else already).
        dst = confined_path(tmp, rel, f"files[{rel!r}]", src.where)
        if rel not in produced and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src.path(rel, f"files[{rel!r}]"), dst)


def record_stage_fidelity(stages: dict, quantized: tuple[str, ...], report: dict, gates: gates_mod.Gates) -> None:
    """Each visual stage this run quantized: its cosine to FP32 (as the report measured it on ONNX
    Runtime) and the gates it was judged by, in its manifest entry: --backend auto judges another
    engine's outputs of the same graph against them (runtime/backends/auto.py: stage_gate)."""
    for stage in quantized:
        q, measured = stages[stage].get("quantization") or {}, report["stages"].get(stage) or {}
        values = (measured.get("cosine_mean"), measured.get("cosine_worst_1pct"))
        # A NaN (a broken calibration kept with --no-gate) would make the manifest unloadable.
        if q.get("format") == "QDQ" and all(isinstance(v, float) and math.isfinite(v) for v in values):
            q["fidelity"] = {"cosine_mean": measured["cosine_mean"],
                             "cosine_worst_1pct": measured["cosine_worst_1pct"],
                             "gate_cosine_mean": gates.visual_cosine_mean,
                             "gate_cosine_worst_1pct": gates.visual_cosine_worst_1pct}


def write_quantized(source: LoadedArtifact, tmp: Path, images: ImageSource, opts: QuantizeOptions,
                    log: Callable) -> dict:
    """Writes the quantized graphs and the other files into `tmp`; returns the manifest (with its
    `files` list), which the caller writes last, once the directory has passed its gates."""
    src = source.manifest
    data = copy.deepcopy(src.data)
    produced = (_quantize_visual(source, data["stages"], tmp, images, opts, log)
                | _quantize_llm(source, data["stages"], tmp, opts, log)
                | _embeddings_fp16(src, data, tmp, opts))
    _link_unchanged(src, tmp, produced)
    data["quantization"] = {
        # where these artifacts run fastest: cpu, gpu or portable; None where the visual stages stay float
        "target": opts.visual.target if opts.visual else None,
        "visual": asdict(opts.visual) if opts.visual else None,
        "llm": asdict(opts.llm),
        "calibration_images": images.describe(),
        "source_manifest_sha256": sha256_file(src.path(MANIFEST)),
        "source_artifacts": str(src.root.resolve()),
    }
    data["tools"] = {**data["tools"], "onnxruntime": version("onnxruntime")}
    data["files"] = sorted(set(src.data["files"]) | produced)
    return data


def quantize(artifacts: str | os.PathLike, out_dir: str | os.PathLike, opts: QuantizeOptions | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Quantizes `artifacts` into `out_dir`; returns the fidelity report (with gate results)."""
    opts = opts or QuantizeOptions()
    src = load_manifest(artifacts)
    family = family_for(src.data)
    if family.task == "retrieval" and (opts.llm.precision != "none" or opts.llm.embed_fp16):
        raise Blip2EdgeError(f"{artifacts}: a retrieval artifact has no LLM; --llm and --embed-fp16 do not apply")
    if opts.visual is not None and opts.visual.target == "gpu":  # its LLM runs on ONNX Runtime CUDA
        try:
            check_artifact_placement(src, "cuda")
        except Blip2EdgeError as exc:
            raise Blip2EdgeError(f"--target gpu: {exc}") from None
    if src.data.get("quantization") and not opts.allow_requantize:
        raise Blip2EdgeError(f"{artifacts}: already quantized; quantize the FP32/FP16 export instead "
                             "(or pass --allow-requantize)")
    for stage in family.visual_stages if opts.visual is not None else ():
        if (src.stages[stage].get("quantization") or {}).get("format") == "QDQ":
            raise Blip2EdgeError(f"{artifacts}: stage '{stage}' is INT8 already; quantize the FP32/FP16 export, "
                                 "or keep its visual stages as they are with --visual none")
    out = Path(out_dir)
    check_target(out, opts.overwrite)  # before the memory check; again under the lock
    # The expected peak (calibration/memory.py) against the memory available and --max-memory,
    # before anything is loaded or written.
    log(check_fits("quantize", quantize_peak(src, opts.llm.precision, opts.visual is not None)["peak"], opts.max_memory))
    # OUT_DIR is checked and locked before calibration images are gathered, and checked again at
    # the rename.
    with atomic_directory(out, opts.overwrite) as tmp:
        source = _source(opts)
        if source.skipped:
            log(f"skipped {source.skipped} unreadable images")
        # The source on the CPU, loaded once: the FP32 (or FP16) side of the fidelity report comes
        # first, then only its vision stage stays (it feeds the Q-Former's calibration; nothing
        # stays with --visual none), and it is gone before the quantized artifacts are loaded:
        # source and quantized weights are never held side by side. FP16 graphs on sessions that
        # keep one copy of the weights (the CPU provider would otherwise hold float32 copies).
        half = {s["precision"] for s in src.stages.values()} == {"fp16"}
        reference = LoadedArtifact(src, family.task, threads=ThreadSettings(low_memory=half))
        llm_quantized = opts.llm.precision != "none"
        refs = None
        if family.task != "retrieval":
            refs = fidelity_references(Blip2Pipeline(reference), source, llm_quantized)
            reference.keep_runners(("vision",) if opts.visual is not None else ())
        # The fidelity report reads the new manifest from memory: on disk it is written last, so a
        # directory left by a killed run, or one below a gate, is never loadable.
        staged = Manifest(tmp, checksummed(tmp, write_quantized(reference, tmp, source, opts, log)))
        if family.task == "retrieval":  # gated on retrieval itself: recall vs FP32, embedding cosine
            report = retrieval_fidelity_report(Blip2Retriever(reference), Blip2Retriever(staged), source)
            report["gates"] = gates_mod.evaluate_retrieval(report, opts.gates)
            lines = retrieval_report_lines(report)
        else:
            reference.close()
            del reference
            report = fidelity_against(refs, Blip2Pipeline(staged))
            report["gates"] = gates_mod.evaluate(report, opts.gates, opts.llm.precision)
            lines = report_lines(report)
        for line in lines:
            log(line)
        (tmp / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
        failed = gates_mod.failures(report["gates"])
        if failed and opts.gate:
            _, note = keep_report(out, report)  # beside OUT_DIR, never over a file of the user's
            raise gates_mod.GateError(f"fidelity gate failed: {'; '.join(failed)} ({note}; "
                                      "--no-gate keeps the artifacts anyway)")
        if opts.visual is not None:  # the stages it quantized were float (INT8 ones are refused up front)
            record_stage_fidelity(staged.data["stages"], family.visual_stages, report, opts.gates)
        write_manifest(tmp, staged.data)
    log(f"wrote {out}")
    return report
