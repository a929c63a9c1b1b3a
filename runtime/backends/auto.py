"""--backend auto: each stage on the engine and precision that is fastest on this machine at the
artifact's fidelity, chosen by a short measurement (cached: auto_cache).

- Only on the CPU, and only with the openvino extra installed: otherwise auto is ONNX Runtime,
  exactly as --backend onnxruntime (nothing changes for a base install or on CUDA).
- The candidates per stage: ONNX Runtime (the graph's own precision: the reference), OpenVINO
  f32, and OpenVINO bf16 where the CPU computes bf16 natively (AVX-512 BF16 or AMX).
- Measured: the stages fed by the image (vision, Q-Former, retrieval's image stages), on
  synthetic images preprocessed as the artifact says; each candidate's outputs are compared with
  ONNX Runtime's (per-token cosine: mean and worst 1%, the calibration report's measures).
  Timing: batch 1, REPS interleaved runs after a warm-up, medians.
- Eligible (StageGate): on a float graph, a candidate at mean cosine >= GATE_COSINE to ONNX
  Runtime, i.e. to FP32. On a quantized (QDQ) graph ONNX Runtime's outputs are themselves some
  way from FP32, as quantize measured and recorded in the stage's manifest entry with the gates
  it passed; a candidate is eligible where the estimate of its own distance from FP32 (that
  distance and its measured one to ONNX Runtime, chained: runtime/cosines.py, StageGate.bounds)
  still passes those gates. A quantized stage with no recorded fidelity (an older quantize)
  keeps the float rule.
- Not measured, on ONNX Runtime: the decoder (its MatMulNBits INT4/INT8 and GroupQueryAttention
  kernels are the fastest decoders measured, bench/RESULTS.md, and its greedy tokens stay the
  reference's), and stages fed by text (T5 encoder, retrieval text stages), whose inputs the
  measurement does not make.
- choose() is a pure function of the measurements, the stage's gate and the CPU's flags; it is
  applied to cached measurements too, so the flags and the gate are checked on every load.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.artifact.manifest import Manifest
from runtime.backends import auto_cache
from runtime.backends.onnxrt import import_onnxruntime
from runtime.backends.openvino import (
    OpenVinoCannotRunError,
    import_openvino,
    native_precisions,
    openvino_version,
)
from runtime.backends.stage_runners import (
    openvino_stage_runner,
    openvino_unfit,
    ort_cpu_runner,
    placement_of,
)
from runtime.backends.threads import STEP_STAGES, ThreadSettings
from runtime.cosines import chained_cosine, token_cosines, worst_1pct
from runtime.errors import Blip2EdgeError, MissingExtraError
from runtime.host_cpu import cpu_flags, cpu_model

ORT = "onnxruntime"
GATE_COSINE = 0.9999  # float visual stages vs FP32 (ONNX Runtime on the same graph)
MARGIN = 0.05  # a candidate later in PREFERENCE must be this much faster to be chosen
PREFERENCE = (ORT, "openvino f32", "openvino bf16")  # the fewer changes first
REPS = 3  # timed rounds at least; more for short stages, up to MAX_REPS or ROUND_BUDGET_S per round
MAX_REPS = 15
ROUND_BUDGET_S = 0.05
SAMPLE_IMAGES = 2
DECODER_REASON = ("auto keeps the decoder on ONNX Runtime: its MatMulNBits and GroupQueryAttention decoders "
                  "were the fastest measured (bench/RESULTS.md)")
TEXT_REASON = "auto measures the stages fed by the image only; this one is fed by text and stays on ONNX Runtime"


def candidates(flags: frozenset[str] | set[str]) -> tuple[str, ...]:
    """ONNX Runtime, OpenVINO f32, and OpenVINO bf16 where these CPU flags give native bf16."""
    return (ORT, "openvino f32", *(("openvino bf16",) if "bf16" in native_precisions(flags) else ()))


@dataclass(frozen=True)
class StageGate:
    """What a candidate's outputs must keep. recorded: the stage is INT8 and quantize recorded
    its fidelity; then reference_*: ONNX Runtime's cosine to FP32 on this graph as quantize
    measured it, bar_*: the gates it passed (the least cosine to FP32 the stage may have)."""
    bar_mean: float = GATE_COSINE
    bar_worst: float = -1.0  # a float graph is judged on its mean alone
    reference_mean: float = 1.0
    reference_worst: float = 1.0
    recorded: bool = False
    note: str = ""

    def bounds(self, cosine: float, worst: float) -> tuple[float, float]:
        """The estimate of a candidate's cosine to FP32, mean and worst 1%: its measured cosine
        to ONNX Runtime chained with ONNX Runtime's own to FP32 (the angles add). Per token this
        is a bound; for the means to second order; for the worst 1% an estimate (two tails of
        1% chain into one of up to 2%), on other images than quantize's held-out ones."""
        return chained_cosine(self.reference_mean, cosine), chained_cosine(self.reference_worst, worst)

    def eligible(self, cosine: float, worst: float) -> bool:
        mean, low = self.bounds(cosine, worst)
        return mean >= self.bar_mean and low >= self.bar_worst

    def describe(self) -> str:
        if not self.recorded:
            return f"at cosine >= {self.bar_mean} to ONNX Runtime{self.note}"
        return (f"within the stage's quantize gates vs FP32 (cosine mean >= {self.bar_mean}, worst 1% >= "
                f"{self.bar_worst}; ONNX Runtime's own {self.reference_mean:.5f} / {self.reference_worst:.5f}, "
                "chained with each engine's cosine to it)")

    def refusal(self, cosine: float, worst: float) -> str:
        said = f"cosine {cosine:.5f} (worst 1% {worst:.5f}) to ONNX Runtime"
        if not self.recorded:
            return said
        mean, low = self.bounds(cosine, worst)
        return f"{said}, so about {mean:.5f} / {low:.5f} to FP32"


FLOAT_GATE = StageGate()


def stage_gate(manifest: Manifest, stage: str) -> StageGate:
    """The gate of `stage`: the float one, or that of its recorded quantize fidelity (an INT8
    QDQ stage's)."""
    spec = manifest.stages[stage]
    q = spec.get("quantization") or {}
    if q.get("format") != "QDQ" or spec.get("precision") != "int8":
        return FLOAT_GATE
    f = q.get("fidelity")
    if f is None:  # written before quantize recorded it: engines must reproduce ONNX Runtime
        return StageGate(note=" (a quantized stage with no recorded fidelity: quantize it again to judge engines "
                              "against its gates)")
    return StageGate(bar_mean=f["gate_cosine_mean"], bar_worst=f["gate_cosine_worst_1pct"],
                     reference_mean=f["cosine_mean"], reference_worst=f["cosine_worst_1pct"], recorded=True)


def _ms(m: dict) -> str:
    return f"{m['ms']:.1f} ms" if "ms" in m else f"failed: {m['error'][:120]}"


def choose(measured: dict[str, dict], flags: frozenset[str] | set[str],
           gate: StageGate = FLOAT_GATE) -> tuple[str, str]:
    """(candidate, reason) for one stage from its measurements {candidate: {"ms", "cosine",
    "worst"} or {"error"}}: the fastest of the eligible ones (ONNX Runtime always; OpenVINO where
    it ran, its outputs pass `gate` and, for bf16, the CPU has native bf16), unless one earlier
    in PREFERENCE is within MARGIN of it."""
    allowed = candidates(flags)
    eligible, refused = [], []
    for c in PREFERENCE:
        m = measured.get(c)
        if c not in allowed:
            if m is not None:
                refused.append(f"{c}: this CPU has no native bf16")
            continue
        if m is None:
            continue
        if c == ORT:
            eligible.append(c)
        elif "error" in m:
            refused.append(f"{c}: {_ms(m)}")
        elif not gate.eligible(m["cosine"], m["worst"]):
            refused.append(f"{c}: {gate.refusal(m['cosine'], m['worst'])}")
        else:
            eligible.append(c)
    best = eligible[0]  # ONNX Runtime is always measured and always eligible
    if "ms" in measured[best]:
        for c in eligible[1:]:
            if measured[c]["ms"] < measured[best]["ms"] * (1 - MARGIN):
                best = c
    timings = ", ".join(f"{c} {_ms(measured[c])}" + (f" (cosine {measured[c]['cosine']:.5f})"
                                                        if c != ORT and "cosine" in measured[c] else "")
                        for c in eligible)
    reason = f"auto: fastest here {gate.describe()} ({timings})"
    if refused:
        reason += f"; not eligible: {'; '.join(refused)}"
    return best, reason


def measure(runners: dict[str, object], feeds: dict[str, np.ndarray], reps: int | None = None) -> tuple[dict, dict]:
    """({candidate: {"ms", "cosine", "worst"}}, ONNX Runtime's outputs): every runner on `feeds` (a
    batch: the fidelity), then interleaved rounds on its first item (the timing): `reps`, by
    default REPS, or more where a round is short (up to MAX_REPS, ROUND_BUDGET_S a round)."""
    reference = runners[ORT].infer(feeds)
    cosines, failed = {ORT: {"cosine": 1.0, "worst": 1.0}}, {}
    for c, r in runners.items():
        if c != ORT:
            try:
                got = r.infer(feeds)
            except Blip2EdgeError as exc:  # compiled, but refused the stage's inputs: not a candidate
                failed[c] = {"error": str(exc)}
                continue
            per_output = [token_cosines(got[n], reference[n]) for n in reference]
            cosines[c] = {"cosine": min(float(t.mean()) for t in per_output),
                          "worst": min(worst_1pct(t) for t in per_output)}
    one = {n: v[:1] for n, v in feeds.items()}
    order = [c for c in runners if c not in failed]
    times: dict[str, list[float]] = {c: [] for c in order}
    rep, rounds = 0, reps
    while rounds is None or rep <= rounds:  # round 0 warms batch 1 up
        t_round = time.perf_counter()
        for c in order[rep % len(order):] + order[:rep % len(order)]:
            t0 = time.perf_counter()
            runners[c].infer(one)
            if rep:
                times[c].append(time.perf_counter() - t0)
        if rounds is None and rep == 1:
            rounds = max(REPS, min(MAX_REPS, int(ROUND_BUDGET_S / (time.perf_counter() - t_round))))
        rep += 1
    return {**{c: {"ms": statistics.median(times[c]) * 1e3, **cosines[c]} for c in order}, **failed}, reference


def _close(runner) -> None:
    close = getattr(runner, "close", None)
    if close is not None:
        close()


def _build(manifest: Manifest, stage: str, candidate: str, threads: ThreadSettings, cache: bool = True):
    """cache=False while measuring: the candidates not chosen leave no compiled blobs behind."""
    if candidate == ORT:
        return ort_cpu_runner(manifest, stage, threads)
    return openvino_stage_runner(manifest, stage, "CPU", candidate.split()[1], threads, cache)


def measurable_stages(manifest: Manifest, stage_names: tuple[str, ...]) -> tuple[str, ...]:
    """The stages auto measures, in run order: not a step stage, runnable by OpenVINO, and fed
    only by the image's pixels or by outputs of stages measured before them."""
    known, measured = {"pixel_values"}, []
    for s in stage_names:
        inputs = {t["name"] for t in manifest.stages[s]["inputs"]}
        if s not in STEP_STAGES and openvino_unfit(manifest, s) is None and inputs <= known:
            measured.append(s)
            known |= {t["name"] for t in manifest.stages[s]["outputs"]}
    return tuple(measured)


def openvino_installed() -> bool:
    try:
        import_openvino()
    except MissingExtraError:
        return False
    return True


def auto_runners(manifest: Manifest, device: str, stage_names: tuple[str, ...], threads: ThreadSettings,
                 pixels: Callable[[int], np.ndarray], flags: frozenset[str] | None = None) -> tuple[dict, dict] | None:
    """(runners, placement) chosen by measurement, or None where auto is plain ONNX Runtime
    (not the CPU, or no openvino extra). `pixels(n)`: n preprocessed synthetic images."""
    if device != "cpu" or not openvino_installed():
        return None
    flags = cpu_flags() if flags is None else flags
    flags = frozenset() if flags is None else flags
    cands = candidates(flags)
    measured_stages = measurable_stages(manifest, stage_names)
    key = auto_cache.cache_key(manifest.data, cpu_model(), flags,
                               {"onnxruntime": import_onnxruntime().__version__, "openvino": openvino_version()},
                               threads.describe(stage_names))
    cached = auto_cache.read(key, measured_stages, cands)
    runners, placement, measured = {}, {}, cached or {}
    feeds = {"pixel_values": pixels(SAMPLE_IMAGES)} if cached is None and measured_stages else {}
    try:
        for s in stage_names:
            if s not in measured_stages:
                runners[s] = ort_cpu_runner(manifest, s, threads)
                reason = DECODER_REASON if s in STEP_STAGES else openvino_unfit(manifest, s) or TEXT_REASON
                placement[s] = placement_of(runners[s], reason)
                continue
            if cached is None:
                built = {}
                for c in cands:
                    try:
                        built[c] = _build(manifest, s, c, threads, cache=False)
                    except OpenVinoCannotRunError as exc:
                        measured.setdefault(s, {})[c] = {"error": str(exc)}
                stage_feeds = {t["name"]: feeds[t["name"]] for t in manifest.stages[s]["inputs"]}
                times, outputs = measure(built, stage_feeds)
                measured.setdefault(s, {}).update(times)
                feeds.update(outputs)
                choice, reason = choose(measured[s], flags, stage_gate(manifest, s))
                for c, r in built.items():
                    if c != choice:
                        _close(r)
                runners[s] = built[choice]
            else:
                choice, reason = choose(measured[s], flags, stage_gate(manifest, s))
                runners[s] = _build(manifest, s, choice, threads)
            source = "measured now" if cached is None else "cached measurement"
            placement[s] = {**placement_of(runners[s], f"{reason}; {source}"), "measured": measured[s]}
    except BaseException:
        for r in runners.values():
            _close(r)
        raise
    if cached is None and measured_stages:
        auto_cache.write(key, {s: measured[s] for s in measured_stages})
    return runners, placement
