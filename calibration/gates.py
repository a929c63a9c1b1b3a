"""Quality gates on the fidelity report: `quantize` exits non-zero when one fails (unless
--no-gate), and nothing is written to the output directory."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import Blip2EdgeError


class GateError(Blip2EdgeError):
    """A quantized artifact fell below a fidelity gate."""


@dataclass(frozen=True)
class Gates:
    visual_cosine_mean: float = 0.99
    visual_cosine_worst_1pct: float = 0.97
    accuracy_drop_int8: float = 0.01  # INT8 visual (+ INT8 LLM): within 1 point of FP32
    accuracy_drop_int4: float = 0.03  # with an INT4 LLM: within 3 points


def evaluate(report: dict, gates: Gates, llm_precision: str) -> list[dict]:
    results = []

    def gate(name, value, op, bar):
        passed = value >= bar if op == ">=" else value <= bar
        results.append({"name": name, "value": value, "op": op, "bar": bar, "passed": bool(passed)})

    for stage in ("vision", "qformer"):
        s = report["stages"][stage]
        gate(f"{stage} cosine mean", s["cosine_mean"], ">=", gates.visual_cosine_mean)
        gate(f"{stage} cosine worst 1%", s["cosine_worst_1pct"], ">=", gates.visual_cosine_worst_1pct)
    e = report["end_to_end"]
    if "fp32_accuracy" in e:  # only where the images have ground truth
        bar = gates.accuracy_drop_int4 if llm_precision == "int4" else gates.accuracy_drop_int8
        # Rounded: 1.0 - 0.99 is 0.010000000000000009 in floats, and "within 1 point" allows 1 point.
        drop = round(e["fp32_accuracy"] - e["quantized_accuracy"], 9)
        gate("accuracy drop vs FP32 (points/100)", drop, "<=", bar)
    return results


def failures(results: list[dict]) -> list[str]:
    return [f"{g['name']} {g['value']:.4f} (needs {g['op']} {g['bar']})" for g in results if not g["passed"]]
