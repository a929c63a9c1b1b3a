"""Export validation: each stage's ONNX outputs against PyTorch, then greedy generation through
the exported graphs against transformers' own `generate`.

Stage checks go in optimum's order: output names, then shapes, then values within `atol`; each
output is reported with its max abs diff, and a failure names the stage, output and amount.
optimum's own `validate_model_outputs` is not used: it feeds random dummy inputs generated from
an OnnxConfig, while these checks feed real images, the real image features into the Q-Former,
and a left-padded prefill followed by a cached decode step into the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.loading import float_dtype
from runtime import synthetic
from runtime.errors import Blip2EdgeError
from runtime.stages import kv_names

VALIDATION_PROMPTS = ("", "Question: what colour is it? Answer:")


class ValidationError(Blip2EdgeError):
    """An exported graph disagrees with PyTorch."""


@dataclass
class OutputCheck:
    name: str
    shape: list
    max_abs_diff: float
    ok: bool


def _compare(stage: str, expected: dict, actual: dict, atol: float) -> dict:
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise ValidationError(f"validation: stage {stage} lacks outputs {', '.join(missing)}")
    checks = []
    for name, ref in expected.items():
        got = actual[name]
        if tuple(got.shape) != tuple(ref.shape):
            checks.append(OutputCheck(name, list(got.shape), float("inf"), False))
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        checks.append(OutputCheck(name, list(got.shape), diff, bool(diff <= atol)))
    worst = max(checks, key=lambda c: c.max_abs_diff)
    return {"stage": stage, "ok": all(c.ok for c in checks), "atol": atol, "max_abs_diff": worst.max_abs_diff,
            "worst_output": worst.name, "outputs": [c.__dict__ for c in checks]}


def _np(t):
    return t.detach().float().numpy() if t.dtype.is_floating_point else t.detach().numpy()


def validation_images(n: int = 2):
    return [im for _, im in synthetic.make_scenes(n, seed=1234)]


def _staged(artifacts):
    """A directory, or a Manifest held in memory (the exporter's, before it writes manifest.json)."""
    from runtime.manifest import Manifest, load_manifest

    return artifacts if isinstance(artifacts, Manifest) else load_manifest(Path(artifacts), verify=False)


def validate_stages(hf_model, processor, artifacts, atol: float) -> list[dict]:
    """Runs each stage in ONNX Runtime and in PyTorch on the same real inputs."""
    import torch

    from exporter.torch_stages import OPTDecoderStage, QFormerStage, VisionStage
    from runtime.backends.onnxrt import OrtRunner

    manifest = _staged(artifacts)
    run = {s: OrtRunner(manifest.stage_file(s), ["CPUExecutionProvider"]) for s in ("vision", "qformer", "decoder")}
    dtype = float_dtype(hf_model)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    reports = []
    with torch.no_grad():
        pixels = processor.image_processor(validation_images(), return_tensors="pt")["pixel_values"].to(dtype)
        image_embeds = VisionStage(hf_model)(pixels)
        reports.append(_compare("vision", {"image_embeds": _np(image_embeds)},
                                run["vision"].infer({"pixel_values": pixels.numpy()}), atol))
        query = QFormerStage(hf_model)(image_embeds)
        reports.append(_compare("qformer", {"query_embeds": _np(query)},
                                run["qformer"].infer({"image_embeds": image_embeds.numpy()}), atol))

        # Decoder: a left-padded prefill of [query][pad][prompt] and one cached decode step.
        dec = OPTDecoderStage(hf_model)
        layers = manifest.model["num_layers"]
        tok = processor.tokenizer(list(VALIDATION_PROMPTS), padding=True, return_tensors="pt")
        text = hf_model.get_input_embeddings()(tok["input_ids"])
        embeds = torch.cat([query, text], dim=1)
        mask = torch.cat([torch.ones(query.shape[:2], dtype=torch.long), tok["attention_mask"]], dim=1)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        b, heads, hd = embeds.shape[0], manifest.model["num_heads"], manifest.model["head_dim"]
        empty = [torch.zeros(b, heads, 0, hd, dtype=dtype) for _ in range(2 * layers)]
        prefill = dec(embeds, mask, pos, *empty)
        names = ["logits", *kv_names(layers, "present")]
        feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        feeds.update({n: e.numpy() for n, e in zip(kv_names(layers, "past"), empty)})
        got = run["decoder"].infer(feeds)
        report = _compare("decoder", {n: _np(t) for n, t in zip(names, prefill)}, got, atol)

        next_ids = prefill[0].argmax(-1)
        step_embeds = hf_model.get_input_embeddings()(next_ids)[:, None, :]
        step_mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        step_pos = step_mask.sum(-1, keepdim=True) - 1
        step = dec(step_embeds, step_mask, step_pos, *prefill[1:])
        feeds = {"inputs_embeds": step_embeds.numpy(), "attention_mask": step_mask.numpy(),
                 "position_ids": step_pos.numpy()}
        feeds.update({n: t.numpy().astype(np_dtype) for n, t in zip(kv_names(layers, "past"), prefill[1:])})
        step_report = _compare("decoder", {n: _np(t) for n, t in zip(names, step)}, run["decoder"].infer(feeds), atol)
        report["outputs"] += [dict(o, name=f"step.{o['name']}") for o in step_report["outputs"]]
        report["ok"] = report["ok"] and step_report["ok"]
        if step_report["max_abs_diff"] > report["max_abs_diff"]:
            report["max_abs_diff"], report["worst_output"] = step_report["max_abs_diff"], "step." + step_report["worst_output"]
        reports.append(report)
    return reports


def validate_generation(hf_model, processor, artifacts, max_new_tokens: int = 12) -> dict:
    """Greedy token ids through the exported graphs vs transformers' generate."""
    import torch

    from runtime.pipeline import Blip2Pipeline

    pipe = Blip2Pipeline(_staged(artifacts))
    images = validation_images()
    cases = []
    for prompt in VALIDATION_PROMPTS:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(float_dtype(hf_model))
        with torch.no_grad():
            ref = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        ref_rows = [_until_eos(r.tolist(), pipe.defaults.eos_token_ids) for r in ref[:, inputs["input_ids"].shape[1]:]]
        got = pipe.generate(images, [prompt] * len(images), max_new_tokens=max_new_tokens, stop_strings=())
        got_rows = [r.tokens for r in got]
        cases.append({"prompt": prompt, "reference": ref_rows, "exported": got_rows, "match": ref_rows == got_rows})
    return {"stage": "generate", "ok": all(c["match"] for c in cases), "cases": cases}


def _until_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def validate_artifacts(hf_model, processor, artifacts, atol: float, check_generation: bool = True) -> dict:
    """`artifacts`: a directory, or a Manifest held in memory."""
    stages = validate_stages(hf_model, processor, artifacts, atol)
    report = {"atol": atol, "stages": stages}
    if check_generation:
        report["generation"] = validate_generation(hf_model, processor, artifacts)
    report["ok"] = all(s["ok"] for s in stages) and report.get("generation", {"ok": True})["ok"]
    return report


def summary_lines(report: dict) -> list[str]:
    lines = []
    for s in report["stages"]:
        verdict = "ok" if s["ok"] else "FAILED"
        lines.append(f"  {s['stage']:<8} max abs diff {s['max_abs_diff']:.2e} ({s['worst_output']})  atol {s['atol']:.0e}  {verdict}")
    if "generation" in report:
        g = report["generation"]
        n = sum(c["match"] for c in g["cases"])
        lines.append(f"  generate greedy token ids identical to transformers: {n}/{len(g['cases'])} prompts  "
                     f"{'ok' if g['ok'] else 'FAILED'}")
    return lines


def failure_message(report: dict) -> str:
    for s in report["stages"]:
        if not s["ok"]:
            bad = [o for o in s["outputs"] if not o["ok"]]
            o = max(bad, key=lambda o: o["max_abs_diff"])
            return (f"validation failed: stage '{s['stage']}' output '{o['name']}' differs from PyTorch by "
                    f"{o['max_abs_diff']:.3e} (atol {s['atol']:.0e})")
    g = report.get("generation")
    if g and not g["ok"]:
        c = next(c for c in g["cases"] if not c["match"])
        return f"validation failed: greedy tokens differ from transformers' generate for prompt {c['prompt']!r}"
    return "validation failed"
