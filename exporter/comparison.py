"""The comparison primitives of export validation, below both the validator and the families'
per-stage checks: one output dict against another (optimum's order: names, then shapes, then
values within atol scaled by the output's magnitude; an inf or NaN on either side fails, named
as such: a float16 overflow), the merged report of two runs, and the inputs every validation
feeds (synthetic images, two prompts of different lengths)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.deferred_runs import DeferredReport, PendingRun, deferred
from runtime import synthetic
from runtime.errors import Blip2EdgeError

VALIDATION_PROMPTS = ("", "Question: what colour is it? Answer:")
# Where validation runs the exported graphs: ONNX Runtime's CPU provider, every family and dtype
# (exporter.validate.validated_with records it in validation.json).
VALIDATION_PROVIDERS = ("CPUExecutionProvider",)


class ValidationError(Blip2EdgeError):
    """An exported graph disagrees with PyTorch."""


@dataclass
class OutputCheck:
    name: str
    shape: list
    max_abs_diff: float
    tolerance: float  # atol * max(1, max |expected|)
    ok: bool
    # "": every value finite on both sides; else where an inf/NaN is ("reference", "exported" or both)
    nonfinite: str = ""


def compare(stage: str, expected: dict, actual, atol: float):
    """`actual`: the graph's outputs, or a PendingRun of them (a DeferredReport is returned:
    exporter/deferred_runs.py)."""
    if isinstance(actual, PendingRun):
        return DeferredReport([actual], lambda got: compare(stage, expected, got, atol))
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise ValidationError(f"validation: stage {stage} lacks outputs {', '.join(missing)}")
    checks = []
    for name, ref in expected.items():
        got = actual[name]
        if tuple(got.shape) != tuple(ref.shape):
            checks.append(OutputCheck(name, list(got.shape), float("inf"), atol, False))
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        bad = [side for side, a in (("reference", ref64), ("exported", got64)) if not np.isfinite(a).all()]
        if bad:
            checks.append(OutputCheck(name, list(got.shape), float("inf"), atol, False, " and ".join(bad)))
            continue
        diff = float(np.max(np.abs(got64 - ref64))) if ref.size else 0.0
        tolerance = atol * max(1.0, float(np.max(np.abs(ref64))) if ref.size else 1.0)
        checks.append(OutputCheck(name, list(got.shape), diff, tolerance, bool(diff <= tolerance)))
    worst = max(checks, key=lambda c: c.max_abs_diff)
    return {"stage": stage, "ok": all(c.ok for c in checks), "atol": atol, "max_abs_diff": worst.max_abs_diff,
            "worst_output": worst.name, "outputs": [c.__dict__ for c in checks]}


def to_numpy(t):
    return t.detach().float().numpy() if t.dtype.is_floating_point else t.detach().numpy()


def merge_reports(report, other, prefix: str):
    """One stage's report over two runs (e.g. prefill and a cached step): `other`'s outputs are
    listed with `prefix`, the verdict and the worst output cover both. Either may be deferred."""
    if deferred(report) or deferred(other):
        parts = [r if isinstance(r, DeferredReport) else DeferredReport([], lambda r=r: r) for r in (report, other)]
        split = len(parts[0].runs)
        return DeferredReport(parts[0].runs + parts[1].runs,
                              lambda *outs: merge_reports(parts[0].finish(*outs[:split]),
                                                          parts[1].finish(*outs[split:]), prefix))
    report["outputs"] += [dict(o, name=f"{prefix}{o['name']}") for o in other["outputs"]]
    report["ok"] = report["ok"] and other["ok"]
    if other["max_abs_diff"] > report["max_abs_diff"]:
        report["max_abs_diff"], report["worst_output"] = other["max_abs_diff"], prefix + other["worst_output"]
    return report


def validation_images(n: int = 2):
    return [im for _, im in synthetic.make_scenes(n, seed=1234)]
