"""Export validation: each stage's ONNX outputs against PyTorch, then greedy generation through
the exported graphs against transformers' own `generate`.

Stage checks go in optimum's order: output names, then shapes, then values within `atol` (scaled
by the output's largest magnitude where that exceeds 1: float32 keeps ~7 significant digits, so
T5's logits, in the tens, carry 1e-4 of rounding from reordered sums alone); each
output is reported with its max abs diff, and a failure names the stage, output and amount.
optimum's own `validate_model_outputs` is not used: it feeds random dummy inputs generated from
an OnnxConfig, while these checks feed real images, the real image features into the Q-Former,
and real prompts laid out as the family lays them out into the LLM stages (each family's
`validate_llm` in exporter/families/).

Every family and dtype runs its graphs, as exported, on ONNX Runtime's CPU provider; the
PyTorch reference runs in the export's dtype. ONNX Runtime runs a float16 graph on the CPU by
computing most ops in float32 between casts it inserts, so for fp16 exports the float16
arithmetic itself (rounding, overflow) is in the reference, which must be finite: an inf or NaN
on either side fails the stage by name. `validated_with` in validation.json records the path.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from exporter.comparison import (
    VALIDATION_PROMPTS,
    VALIDATION_PROVIDERS,
    ValidationError,
    compare,
    to_numpy,
    validation_images,
)
from exporter.deferred_runs import RecordingRunner, run_deferred
from exporter.families import export_family
from exporter.hf_model import float_dtype, generated_from
from exporter.torch_stages import VisionStage
from runtime.artifact.manifest import Manifest, load_manifest
from runtime.backends.onnxrt import OrtRunner
from runtime.backends.threads import ThreadSettings
from runtime.families import family_for
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline
from runtime.stages import IMAGE_EMBEDS, PIXEL_VALUES

__all__ = ["VALIDATION_PROMPTS", "ValidationError", "compare", "validate_artifacts", "validation_images"]

def _staged(artifacts):
    """A directory, or a Manifest held in memory (the exporter's, before it writes manifest.json)."""

    return artifacts if isinstance(artifacts, Manifest) else load_manifest(Path(artifacts), verify=False)


def reference_stage_checks(hf_model, processor, artifacts, atol: float) -> list:
    """The references pass: PyTorch's outputs of each stage on real inputs, each paired with the
    graph run it is to be compared with (recorded, not run: exporter/deferred_runs.py)."""
    import torch

    family = export_family(hf_model.config)
    manifest = _staged(artifacts)
    run = {s: RecordingRunner(s) for s in family.runtime.stage_names(manifest.model)}
    dtype = float_dtype(hf_model)
    reports = []
    with torch.no_grad():
        pixels = processor.image_processor(validation_images(), return_tensors="pt")["pixel_values"].to(dtype)
        image_embeds = VisionStage(hf_model)(pixels)
        reports.append(compare("vision", {IMAGE_EMBEDS: to_numpy(image_embeds)},
                               run["vision"].infer({PIXEL_VALUES: pixels.numpy()}), atol))
        # InstructBLIP's Q-Former reads the prompts too: two of different lengths, one per image.
        report, query = family.validate_qformer(hf_model, processor, run["qformer"], image_embeds,
                                                VALIDATION_PROMPTS, atol)
        reports.append(report)
        reports += family.validate_llm(hf_model, processor, run, query, manifest, atol)
    return reports


def validation_session(manifest: Manifest, stage: str) -> OrtRunner:
    """The session a recorded run executes on: ONNX Runtime's CPU provider. For a float16 graph it
    keeps one copy of the weights (ThreadSettings.low_memory: full optimisation folds the casts the
    CPU provider inserts into float32 copies of every weight, 3x the graph in all)."""
    low = manifest.stages[stage]["precision"] == "fp16"
    return OrtRunner(manifest.stage_file(stage), list(VALIDATION_PROVIDERS), low_memory=low)


def run_stage_checks(checks: list, artifacts) -> list[dict]:
    """The graphs pass: one stage's session at a time, on the recorded inputs."""
    manifest = _staged(artifacts)
    return run_deferred(checks, list(manifest.stages), lambda s: validation_session(manifest, s))


def validate_stages(hf_model, processor, artifacts, atol: float) -> list[dict]:
    """Each stage in ONNX Runtime and in PyTorch on the same real inputs (both passes at once)."""
    return run_stage_checks(reference_stage_checks(hf_model, processor, artifacts, atol), artifacts)


def reference_generation(hf_model, processor, artifacts, max_new_tokens: int = 12) -> list[dict]:
    """transformers' greedy `generate` on the validation images and prompts: the token ids the
    exported graphs must reproduce (check_generation), each row cut after its first eos."""
    import torch

    eos = tuple(_staged(artifacts).data["generation"]["eos_token_ids"])
    images = validation_images()
    cases = []
    for prompt in VALIDATION_PROMPTS:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(float_dtype(hf_model))
        with torch.no_grad():
            ref = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        new = ref[:, generated_from(hf_model, inputs):]
        cases.append({"prompt": prompt, "reference": [_until_eos(r.tolist(), eos) for r in new],
                      "max_new_tokens": max_new_tokens})
    return cases


def check_generation(references: list[dict], artifacts) -> dict:
    """Greedy token ids through the exported graphs (the runtime's pipeline) vs the reference's.
    The visual stages run first and are freed before the LLM's load: the two never hold their
    weights side by side (the LLM's half is the runtime's generate_from_queries)."""
    manifest = _staged(artifacts)
    low = any(s["precision"] == "fp16" for s in manifest.stages.values())
    family = family_for(manifest.data)
    every = family.stage_names(manifest.model)
    visual = tuple(s for s in every if s in family.visual_stages)

    def half(stages: tuple[str, ...]) -> Blip2Pipeline:
        return Blip2Pipeline(LoadedArtifact(manifest, "generation", threads=ThreadSettings(low_memory=low), stages=stages))

    images = validation_images()
    pipe = half(visual)
    queries = [pipe.encode(images, {}, [ref["prompt"]] * len(images)) for ref in references]
    pipe.close()
    del pipe
    pipe = half(tuple(s for s in every if s not in visual))
    cases = []
    for ref, query in zip(references, queries):
        got = pipe.generate_from_queries(query, [ref["prompt"]] * len(images), max_new_tokens=ref["max_new_tokens"],
                                         stop_strings=())
        got_rows = [r.tokens for r in got]
        cases.append({"prompt": ref["prompt"], "reference": ref["reference"], "exported": got_rows,
                      "match": ref["reference"] == got_rows})
    pipe.close()
    return {"stage": "generate", "ok": all(c["match"] for c in cases), "cases": cases}


def _until_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


FP16_ON_CPU = (
    "ONNX Runtime's CPU provider runs the float16 graphs as written where it has float16 kernels, and "
    "the other ops in float32 between casts it inserts, without rounding to float16 between them: "
    "float16 rounding and overflow show in the PyTorch float16 reference (every stage's outputs must be "
    "finite and within atol of it), not necessarily in the graph run; on a GPU every float16 op rounds")


def validated_with(manifest: Manifest) -> dict:
    """How validation ran, for validation.json: the engine and provider that ran the graphs as
    exported (every family, fp32 and fp16), and what the PyTorch reference was."""
    precisions = sorted({s["precision"] for s in manifest.stages.values()})
    path = {"runtime": f"onnxruntime {version('onnxruntime')}", "providers": list(VALIDATION_PROVIDERS),
            "graphs": "/".join(precisions),
            "reference": f"transformers {version('transformers')} on PyTorch {version('torch')}, CPU, "
                         f"in the export's dtype"}
    if "fp16" in precisions:
        path["fp16"] = FP16_ON_CPU
        path["sessions"] = ("float16 graphs on sessions that keep one copy of the weights: basic graph "
                            "optimisation, no memory arena, no prepacking (the runtime's CPU path also fuses)")
    return path


def collect_references(hf_model, processor, artifacts, atol: float, check_generation: bool = True) -> dict:
    """Everything validation needs from PyTorch, computed while the model is loaded; after this the
    export frees it and `check_references` runs the graphs alone. A retrieval artifact is validated
    here whole (its stages are small; its end-to-end check runs transformers' retrieval model)."""
    family = export_family(hf_model.config)
    path = validated_with(_staged(artifacts))
    if family.runtime.task == "retrieval":  # its own stages and end-to-end scores, no generation
        return {"report": {**family.validate(hf_model, processor, _staged(artifacts), atol), "validated_with": path}}
    refs = {"atol": atol, "validated_with": path,
            "stages": reference_stage_checks(hf_model, processor, artifacts, atol)}
    if check_generation:
        refs["generation"] = reference_generation(hf_model, processor, artifacts)
    return refs


def check_references(refs: dict, artifacts) -> dict:
    """The graphs against the references of `collect_references`, with no torch model loaded."""
    if "report" in refs:
        return refs["report"]
    stages = run_stage_checks(refs["stages"], artifacts)
    report = {"atol": refs["atol"], "validated_with": refs["validated_with"], "stages": stages}
    if "generation" in refs:
        report["generation"] = check_generation(refs["generation"], artifacts)
    report["ok"] = all(s["ok"] for s in stages) and report.get("generation", {"ok": True})["ok"]
    return report


def validate_artifacts(hf_model, processor, artifacts, atol: float, check_generation: bool = True) -> dict:
    """`artifacts`: a directory, or a Manifest held in memory. (export runs the two passes itself,
    freeing the model between them.)"""
    return check_references(collect_references(hf_model, processor, artifacts, atol, check_generation), artifacts)


def summary_lines(report: dict) -> list[str]:
    lines = []
    path = report.get("validated_with")
    if path:
        lines.append(f"  {path['graphs']} graphs on {path['runtime']} ({', '.join(path['providers'])})")
    for s in report["stages"]:
        verdict = "ok" if s["ok"] else "FAILED"
        nonfinite = [o["name"] for o in s["outputs"] if o.get("nonfinite")]
        diff = f"inf/NaN in {', '.join(nonfinite)}" if nonfinite else \
            f"max abs diff {s['max_abs_diff']:.2e} ({s['worst_output']})"
        lines.append(f"  {s['stage']:<8} {diff}  atol {s['atol']:.0e}  {verdict}")
    if "generation" in report:
        g = report["generation"]
        n = sum(c["match"] for c in g["cases"])
        lines.append(f"  generate greedy token ids identical to transformers: {n}/{len(g['cases'])} prompts  "
                     f"{'ok' if g['ok'] else 'FAILED'}")
    if "retrieval" in report:
        r = report["retrieval"]
        lines.append(f"  itc/itm/embeddings vs transformers' Blip2ForImageTextRetrieval: max abs diff "
                     f"{r['max_abs_diff']:.2e} ({r['worst_output']})  atol {r['atol']:.0e}  {'ok' if r['ok'] else 'FAILED'}")
    return lines


def failure_message(report: dict) -> str:
    for s in report["stages"]:
        if not s["ok"]:
            bad = [o for o in s["outputs"] if not o["ok"]]
            o = next((o for o in bad if o.get("nonfinite")), None)
            if o is not None:
                where = {"reference": "in PyTorch's reference", "exported": "in the exported graph's output"}.get(
                    o["nonfinite"], "in PyTorch's reference and the exported graph's output")
                cause = (": a float16 overflow; export --dtype fp32"
                         if "fp16" in report.get("validated_with", {}).get("graphs", "") else "")
                return f"validation failed: stage '{s['stage']}' output '{o['name']}' has inf/NaN {where}{cause}"
            o = max(bad, key=lambda o: o["max_abs_diff"])
            return (f"validation failed: stage '{s['stage']}' output '{o['name']}' differs from PyTorch by "
                    f"{o['max_abs_diff']:.3e} (allowed {o['tolerance']:.1e}: atol {s['atol']:.0e} x max(1, max |output|))")
    r = report.get("retrieval")
    if r and not r["ok"]:
        return (f"validation failed: the runtime's {r['worst_output']} differ from transformers' by "
                f"{r['max_abs_diff']:.3e} (allowed {r['atol']:.1e})")
    g = report.get("generation")
    if g and not g["ok"]:
        c = next(c for c in g["cases"] if not c["match"])
        return f"validation failed: greedy tokens differ from transformers' generate for prompt {c['prompt']!r}"
    return "validation failed"
