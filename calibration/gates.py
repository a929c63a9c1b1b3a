"""Quality gates on the fidelity report: `quantize` exits non-zero when one fails (unless
--no-gate), and nothing is written to the output directory."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import Blip2EdgeError


class GateError(Blip2EdgeError):
    """A quantized artifact fell below a fidelity gate."""


# Below this, the FP32 model itself gets most ground-truth answers wrong (random weights, or
# images unlike its training): a drop in accuracy then measures nothing, and its gate is
# reported as not judged rather than passed.
MIN_JUDGEABLE_ACCURACY = 0.5


class _Results(list):
    """Gate results: each passed (True), failed (False) or not judged (None, with the reason)."""

    def gate(self, name: str, value: float | None, op: str, bar: float, not_judged: str | None = None) -> None:
        passed = None if not_judged else bool(value >= bar if op == ">=" else value <= bar)
        entry = {"name": name, "value": value, "op": op, "bar": bar, "passed": passed,
                 "verdict": "not judged" if not_judged else "pass" if passed else "FAIL"}
        if not_judged:
            entry["reason"] = not_judged
        self.append(entry)


def _accuracy_not_judged(fp32_accuracy: float, what: str) -> str | None:
    if fp32_accuracy < MIN_JUDGEABLE_ACCURACY:
        return (f"FP32 itself has {what} {fp32_accuracy:.2f} on these images (random weights?): a drop from it "
                "measures nothing")
    return None


@dataclass(frozen=True)
class Gates:
    visual_cosine_mean: float = 0.99
    visual_cosine_worst_1pct: float = 0.97
    accuracy_drop_int8: float = 0.01  # INT8 visual (+ INT8 LLM): within 1 point of FP32
    accuracy_drop_int4: float = 0.03  # with an INT4 LLM: within 3 points
    # Retrieval artifacts: gates on retrieval itself (calibration/retrieval_fidelity.py).
    embedding_cosine_mean: float = 0.99  # ITC image embeddings, end to end
    recall_at_1_vs_fp32: float = 0.90  # FP32's top-1 is the quantized model's top 1 ...
    recall_at_5_vs_fp32: float = 0.98  # ... or within its top 5, both directions
    recall_drop: float = 0.02  # recall@1 against ground truth (synthetic scenes), both directions


def evaluate(report: dict, gates: Gates, llm_precision: str) -> list[dict]:
    results = _Results()
    gate = results.gate
    for stage in ("vision", "qformer"):
        s = report["stages"][stage]
        gate(f"{stage} cosine mean", s["cosine_mean"], ">=", gates.visual_cosine_mean)
        gate(f"{stage} cosine worst 1%", s["cosine_worst_1pct"], ">=", gates.visual_cosine_worst_1pct)
    e = report["end_to_end"]
    bar = gates.accuracy_drop_int4 if llm_precision == "int4" else gates.accuracy_drop_int8
    name = "accuracy drop vs FP32 (points/100)"
    if "fp32_accuracy" in e:  # only where the images have ground truth
        # Rounded: 1.0 - 0.99 is 0.010000000000000009 in floats, and "within 1 point" allows 1 point.
        drop = round(e["fp32_accuracy"] - e["quantized_accuracy"], 9)
        gate(name, drop, "<=", bar, _accuracy_not_judged(e["fp32_accuracy"], "caption accuracy"))
    else:
        gate(name, None, "<=", bar, "the calibration images have no ground-truth captions (a folder of "
                                            "images): only the stages' cosines are judged")
    return list(results)


def evaluate_retrieval(report: dict, gates: Gates) -> list[dict]:
    results = _Results()
    gate = results.gate
    for stage, s in report["stages"].items():
        gate(f"{stage} cosine mean", s["cosine_mean"], ">=", gates.visual_cosine_mean)
        gate(f"{stage} cosine worst 1%", s["cosine_worst_1pct"], ">=", gates.visual_cosine_worst_1pct)
    gate("image embeddings cosine mean", report["embeddings"]["cosine_mean"], ">=", gates.embedding_cosine_mean)
    for direction, r in report["recall_vs_fp32"].items():
        name = direction.replace("_", " ")
        gate(f"{name} recall@1 vs FP32", r["recall_at_1"], ">=", gates.recall_at_1_vs_fp32)
        gate(f"{name} recall@5 vs FP32", r["recall_at_5"], ">=", gates.recall_at_5_vs_fp32)
    if "ground_truth" in report:
        g = report["ground_truth"]
        for key in ("text_to_image_recall_at_1", "image_to_text_recall_at_1"):
            drop = round(g["fp32"][key] - g["quantized"][key], 9)  # rounded as in evaluate()
            gate(f"{key.replace('_', ' ')} drop vs FP32", drop, "<=", gates.recall_drop,
                 _accuracy_not_judged(g["fp32"][key], key.replace("_", " ")))
    return list(results)


def failures(results: list[dict]) -> list[str]:
    return [f"{g['name']} {g['value']:.4f} (needs {g['op']} {g['bar']})" for g in results if g["passed"] is False]


def gate_line(g: dict, width: int) -> str:
    """One gate in the report: its value against the bar and the verdict, or why it was not judged."""
    if g["passed"] is None:
        return f"  gate {g['name']:<{width}} not judged: {g['reason']}"
    return f"  gate {g['name']:<{width}} {g['value']:.4f} {g['op']} {g['bar']:.4f}  {g['verdict']}"
