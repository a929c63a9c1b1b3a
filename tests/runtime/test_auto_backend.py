"""--backend auto (issue 24): the choice per stage from measurements (a pure function of them and
of the CPU's flags), its cache outside the artifact (untrusted: corrupt or tampered files are
measured again), the fidelity guard (bf16 only with native bf16 and within the gate; greedy
tokens of the trained toy identical), and what profile and doctor print of it. Real ONNX Runtime
and OpenVINO; no time is asserted, only what the measurement allows."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from runtime import synthetic
from runtime.backends import auto_cache
from runtime.backends.auto import (
    FLOAT_GATE,
    GATE_COSINE,
    ORT,
    StageGate,
    auto_runners,
    candidates,
    choose,
    measurable_stages,
    stage_gate,
)
from runtime.backends.onnxrt import ThreadSettings
from runtime.backends.openvino import cpu_flags
from runtime.cosines import chained_cosine, token_cosines, worst_1pct
from runtime.errors import OptionError
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.runtime.test_openvino import needs_openvino

NO_BF16 = frozenset({"avx2", "avx512f", "avx512_vnni"})
AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})


def m(ms: float, cosine: float = 1.0, worst: float | None = None) -> dict:
    return {"ms": ms, "cosine": cosine, "worst": cosine if worst is None else worst}


# ---- the choice: a pure function ---------------------------------------------------------------

def test_candidates_follow_the_flags():
    assert candidates(NO_BF16) == (ORT, "openvino f32")
    assert candidates(AMX) == (ORT, "openvino f32", "openvino bf16")
    assert candidates({"avx512_bf16"})[-1] == "openvino bf16"


def test_bf16_is_never_chosen_without_native_bf16_whatever_was_measured():
    # a cache written on another CPU (or tampered with) says bf16 is 3x faster and exact
    measured = {ORT: m(180.0), "openvino f32": m(165.0), "openvino bf16": m(54.0, 0.99999)}
    choice, reason = choose(measured, NO_BF16)
    assert choice == "openvino f32"
    assert "openvino bf16: this CPU has no native bf16" in reason
    assert choose(measured, AMX)[0] == "openvino bf16"


def test_a_candidate_below_the_fidelity_gate_is_not_eligible():
    measured = {ORT: m(72.8), "openvino f32": m(55.7, 0.99935), "openvino bf16": m(49.0, 0.99922)}
    choice, reason = choose(measured, AMX)
    assert choice == ORT
    assert reason.startswith(f"auto: fastest here at cosine >= {GATE_COSINE} to ONNX Runtime")
    assert "openvino f32: cosine 0.99935 (worst 1% 0.99935) to ONNX Runtime" in reason
    assert "openvino bf16: cosine 0.99922" in reason


# The bench model's uint8 Q-Former as quantize recorded it (cosine to FP32, and its gates).
QDQ_GATE = StageGate(bar_mean=0.99, bar_worst=0.97, reference_mean=0.99848, reference_worst=0.99806, recorded=True)


def test_on_a_quantized_graph_engines_are_judged_against_the_stages_gates():
    """OpenVINO runs a QDQ graph with its own requantization: its outputs differ from ONNX
    Runtime's about as much as ONNX Runtime's differ from FP32. Eligible where the chained bound
    on its distance from FP32 passes the gates quantize judged the stage by."""
    measured = {ORT: m(15.7), "openvino f32": m(14.3, 0.99779, 0.9960), "openvino bf16": m(14.0, 0.99568, 0.9930)}
    choice, reason = choose(measured, AMX, QDQ_GATE)
    assert choice == "openvino f32"
    assert "within the stage's quantize gates vs FP32 (cosine mean >= 0.99, worst 1% >= 0.97" in reason
    # bf16: acos(0.99848) + acos(0.99568) is an angle whose cosine is 0.98905 < 0.99
    assert "openvino bf16: cosine 0.99568 (worst 1% 0.99300) to ONNX Runtime, so about 0.98905 / 0.98372 to FP32" in \
        reason.split("not eligible: ")[1]
    # The same numbers on a float graph are far below its gate.
    assert choose(measured, AMX)[0] == ORT
    # The worst 1% is judged too: a candidate with a good mean but bad tokens is refused.
    worse = {ORT: m(15.7), "openvino f32": m(10.0, 0.9999, 0.90)}
    assert choose(worse, NO_BF16, QDQ_GATE)[0] == ORT
    # A stage already at its bar leaves no room: only an engine that reproduces ONNX Runtime could pass.
    at_bar = StageGate(bar_mean=0.99, bar_worst=0.97, reference_mean=0.99, reference_worst=0.99, recorded=True)
    assert choose(measured, AMX, at_bar)[0] == ORT


def test_chained_cosine_adds_the_angles():
    assert chained_cosine(1.0, 0.99935) == pytest.approx(0.99935, abs=1e-12)  # a float graph: the gate unchanged
    assert chained_cosine(np.cos(np.pi / 6), np.cos(np.pi / 3)) == pytest.approx(0.0, abs=1e-12)
    assert chained_cosine(0.99, 0.999) < min(0.99, 0.999)
    assert chained_cosine(-1.0, 0.5) == pytest.approx(-1.0)  # capped at opposite directions


def test_the_stage_gate_comes_from_the_manifest(toy_artifacts, tmp_path):
    from calibration.quantize import QuantizeOptions, quantize
    from runtime.artifact.manifest import load_manifest

    assert stage_gate(load_manifest(toy_artifacts), "vision") == FLOAT_GATE
    out = tmp_path / "q"
    report = quantize(toy_artifacts, out, QuantizeOptions(num_calib=8, held_out=8, gate=False), log=lambda s: None)
    q = load_manifest(out)
    for stage in ("vision", "qformer"):
        gate = stage_gate(q, stage)
        assert (gate.reference_mean, gate.reference_worst) == (report["stages"][stage]["cosine_mean"],
                                                               report["stages"][stage]["cosine_worst_1pct"])
        assert (gate.bar_mean, gate.bar_worst) == (0.99, 0.97)
    assert stage_gate(q, "decoder") == FLOAT_GATE
    # A QDQ stage from a quantize that recorded no fidelity: ONNX Runtime must be reproduced.
    data = json.loads((out / "manifest.json").read_text())
    del data["stages"]["vision"]["quantization"]["fidelity"]
    (out / "manifest.json").write_text(json.dumps(data))
    old = stage_gate(load_manifest(out), "vision")
    assert (old.bar_mean, old.reference_mean) == (GATE_COSINE, 1.0) and "no recorded fidelity" in old.describe()


def test_a_failed_candidate_is_not_eligible_and_its_reason_is_kept():
    measured = {ORT: m(10.0), "openvino f32": {"error": "OpenVINO cannot run this graph (op X)"}}
    choice, reason = choose(measured, NO_BF16)
    assert choice == ORT and "op X" in reason


def test_a_simpler_engine_within_the_margin_is_kept():
    assert choose({ORT: m(100.0), "openvino f32": m(97.0)}, NO_BF16)[0] == ORT  # 3%: not worth a change
    assert choose({ORT: m(100.0), "openvino f32": m(90.0)}, NO_BF16)[0] == "openvino f32"
    # bf16 only 2% faster than f32, both well ahead of ONNX Runtime: f32 (no change of numbers)
    assert choose({ORT: m(100.0), "openvino f32": m(50.0), "openvino bf16": m(49.0)}, AMX)[0] == "openvino f32"


def test_cosines_are_per_token():
    a = np.ones((1, 4, 8), np.float32)
    b = a.copy()
    b[0, 0] = -1  # one token of four reversed
    assert token_cosines(a, a).mean() == pytest.approx(1.0)
    assert token_cosines(b, a).tolist() == pytest.approx([-1.0, 1.0, 1.0, 1.0])
    assert worst_1pct(token_cosines(b, a)) < -0.8
    assert token_cosines(np.zeros((2, 3)), np.zeros((2, 3))).tolist() == [1.0, 1.0]  # zero vectors agree


# ---- the cache: outside the artifact, untrusted -------------------------------------------------

KEY = {"schema": 1, "artifact": "0" * 64}


@pytest.mark.parametrize("data", [
    None, [], {"key": {"other": 1}, "stages": {}},
    {"key": KEY, "stages": {"vision": {ORT: m(1.0)}}},                                     # a candidate missing
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": m(float("nan"))}}},   # not finite
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": m(-2.0)}}},            # negative time
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": {"ms": True, "cosine": 1.0}}}},
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": m(1.0, 7.0)}}},        # cosine > 1
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": m(1.0)}, "decoder": {}}},  # extra stage
    {"key": KEY, "stages": {"vision": {ORT: {"ms": 1.0, "cosine": 1.0},                    # before "worst"
                                       "openvino f32": {"ms": 1.0, "cosine": 1.0}}}},
    {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": m(1.0, 1.0, -3.0)}}},  # worst < -1
])
def test_malformed_cache_contents_are_refused(data):
    assert auto_cache.valid_measurements(data, KEY, ("vision",), (ORT, "openvino f32")) is None


def test_wellformed_cache_contents_are_used():
    data = {"key": KEY, "stages": {"vision": {ORT: m(1.0), "openvino f32": {"error": "x"}}}}
    assert auto_cache.valid_measurements(data, KEY, ("vision",), (ORT, "openvino f32")) == data["stages"]


def sources(placement: dict) -> set[str]:
    return {p["reason"].rsplit("; ", 1)[-1] for p in placement.values() if "measured" in p}


def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "blip2-edge" / "placement"


@needs_openvino
def test_measured_once_then_cached_outside_the_artifact(toy_artifacts, tmp_path, monkeypatch):
    cache = fresh_cache(monkeypatch, tmp_path)
    first = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert sources(first.placement) == {"measured now"}
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and not list(toy_artifacts.glob("**/placement*"))
    second = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert sources(second.placement) == {"cached measurement"}
    assert {s: p["engine"] for s, p in second.placement.items()} == {s: p["engine"] for s, p in first.placement.items()}


@needs_openvino
@pytest.mark.parametrize("damage", ["garbage", "truncated", "fifo"])
def test_a_corrupt_cache_file_is_measured_again(toy_artifacts, tmp_path, monkeypatch, damage):
    import os

    cache = fresh_cache(monkeypatch, tmp_path)
    LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    (path,) = cache.glob("*.json")
    good = path.read_bytes()
    if damage == "fifo":
        path.unlink()
        os.mkfifo(path)  # never read from (it would block): not a regular file
    else:
        path.write_bytes(b"\x00{not json" if damage == "garbage" else good[:len(good) // 2])
    again = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert sources(again.placement) == {"measured now"}
    if damage != "fifo":
        assert json.loads(path.read_bytes())["key"] == json.loads(good)["key"]  # rewritten whole


@needs_openvino
def test_a_tampered_cache_cannot_put_a_stage_on_bf16_without_native_bf16(toy_artifacts, tmp_path, monkeypatch):
    cache = fresh_cache(monkeypatch, tmp_path)
    manifest = LoadedArtifact.open(toy_artifacts, task="generation").manifest
    stages = ("vision", "qformer", "decoder")
    pixels = lambda n: np.zeros((n, 3, manifest.model["image_size"], manifest.model["image_size"]), np.float32)  # noqa: E731
    runners, placement = auto_runners(manifest, "cpu", stages, ThreadSettings(), pixels, flags=NO_BF16)
    (path,) = cache.glob("*.json")
    data = json.loads(path.read_text())
    for entry in data["stages"].values():  # claims bf16 was measured here, fastest and exact
        entry["openvino bf16"] = m(0.001)
    path.write_text(json.dumps(data))
    runners, placement = auto_runners(manifest, "cpu", stages, ThreadSettings(), pixels, flags=NO_BF16)
    assert all(p.get("precision") != "bf16" for p in placement.values())
    assert sources(placement) == {"measured now"}  # the file did not fit this CPU's candidates


# ---- what auto runs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_uint8_int4_artifacts(tmp_path_factory, toy_artifacts):
    """The trained toy as `quantize --llm int4` makes it (uint8 visual stages, their fidelity recorded)."""
    from calibration.llm import LLMOptions
    from calibration.quantize import QuantizeOptions, quantize

    out = tmp_path_factory.mktemp("auto-q") / "q"
    quantize(toy_artifacts, out, QuantizeOptions(num_calib=16, held_out=16, llm=LLMOptions(precision="int4")),
             log=lambda s: None)
    return out


@needs_openvino
@pytest.mark.parametrize("fixture", ["toy_artifacts", "toy_concat_artifacts", "toy_uint8_int4_artifacts"])
def test_auto_greedy_captions_of_the_toy_are_onnx_runtimes(fixture, request):
    path = request.getfixturevalue(fixture)
    images = [im for _, im in synthetic.make_scenes(6, seed=3)]
    want = Blip2Pipeline.from_artifacts(path).caption(images)
    auto = Blip2Pipeline.from_artifacts(path, backend="auto")
    assert [r.tokens for r in auto.caption(images)] == [r.tokens for r in want]
    placement = auto.artifact.placement
    # the decoder stays on ONNX Runtime (either KV cache form), and says why
    assert placement["decoder"]["engine"] == "onnxruntime" and "auto keeps the decoder" in placement["decoder"]["reason"]
    for stage in ("vision", "qformer"):
        p = placement[stage]
        assert p["reason"].startswith("auto: ")
        if p["engine"] == "openvino":  # chosen within the stage's gate, and bf16 only where this CPU has it
            got = p["measured"][f"openvino {p['precision']}"]
            assert stage_gate(auto.artifact.manifest, stage).eligible(got["cosine"], got["worst"])
            assert p["precision"] in {c.split()[1] for c in candidates(cpu_flags() or frozenset()) if c != ORT}


@needs_openvino
def test_quantized_stages_placed_on_openvino_keep_the_toys_captions(toy_uint8_int4_artifacts, tmp_path, monkeypatch):
    """The trained toy is too small for OpenVINO to win on time, so the cache says it did (its
    cosines as measured): the choice, made again from the cache with the stages' gates, puts
    both uint8 stages on OpenVINO f32, and the greedy captions stay ONNX Runtime's."""
    cache = fresh_cache(monkeypatch, tmp_path)
    LoadedArtifact.open(toy_uint8_int4_artifacts, task="generation", backend="auto")
    (path,) = cache.glob("*.json")
    data = json.loads(path.read_text())
    for entry in data["stages"].values():
        entry["openvino f32"]["ms"] = entry[ORT]["ms"] / 10
    path.write_text(json.dumps(data))
    auto = Blip2Pipeline.from_artifacts(toy_uint8_int4_artifacts, backend="auto")
    placement = auto.artifact.placement
    assert {s: (placement[s]["engine"], placement[s].get("precision")) for s in ("vision", "qformer")} == \
        dict.fromkeys(("vision", "qformer"), ("openvino", "f32"))
    assert "quantize gates" in placement["vision"]["reason"] and "cached measurement" in placement["vision"]["reason"]
    images = [im for _, im in synthetic.make_scenes(6, seed=3)]
    want = Blip2Pipeline.from_artifacts(toy_uint8_int4_artifacts).caption(images)
    assert [r.tokens for r in auto.caption(images)] == [r.tokens for r in want]


def test_without_openvino_auto_is_onnx_runtime_unchanged(toy_artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if not installed
    auto = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    plain = LoadedArtifact.open(toy_artifacts, task="generation")
    assert auto.placement == plain.placement
    assert all(p["engine"] == "onnxruntime" and "reason" not in p for p in auto.placement.values())


def test_auto_with_a_precision_is_one_line(toy_artifacts):
    with pytest.raises(OptionError) as exc:
        LoadedArtifact.open(toy_artifacts, task="generation", backend="auto", precision="bf16")
    assert "\n" not in str(exc.value) and "--backend openvino --precision bf16" in str(exc.value)


def test_only_image_fed_stages_are_measured(toy_artifacts, t5_tiny_artifacts):
    toy = LoadedArtifact.open(toy_artifacts, task="generation")
    assert measurable_stages(toy.manifest, toy.stage_names) == ("vision", "qformer")
    t5 = LoadedArtifact.open(t5_tiny_artifacts, task="generation")
    assert measurable_stages(t5.manifest, t5.stage_names) == ("vision", "qformer")  # not the text-fed encoder


@needs_openvino
def test_retrieval_under_auto_measures_the_image_stages_only(retrieval_tiny_artifacts):
    from runtime.retriever import Blip2Retriever

    images, texts = [im for _, im in synthetic.make_scenes(3, seed=3)], ["a red circle", "a blue square"]
    ort = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)
    auto = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts, backend="auto")
    placement = auto.artifact.placement
    measured = {s for s, p in placement.items() if "measured" in p}
    assert measured == set(measurable_stages(auto.artifact.manifest, auto.stage_names)) and "vision" in measured
    for stage in set(placement) - measured:  # fed by text
        assert placement[stage]["engine"] == "onnxruntime" and "fed by text" in placement[stage]["reason"]
    # two stages in a row, each within the gate: their angles add (1 - cos <= 4 x (1 - 0.9999))
    assert token_cosines(auto.embed_images(images), ort.embed_images(images)).mean() >= 1 - 4 * (1 - GATE_COSINE) - 1e-5
    np.testing.assert_allclose(auto.embed_texts(texts), ort.embed_texts(texts), rtol=1e-5, atol=1e-6)


# ---- profile and doctor print it ---------------------------------------------------------------

@needs_openvino
def test_profile_puts_backends_side_by_side(toy_artifacts):
    proc = run_cli("profile", toy_artifacts, "--synthetic", "2", "--runs", "2", "--warmup", "1", "--new-tokens", "3",
                   "--backends", "onnxruntime,openvino,auto")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "read bandwidth" in lines[0] and "GB/s" in lines[0]
    header = lines[1]
    assert header.startswith("stage (median ms)")
    for label in ("toy [onnxruntime]", "toy [openvino]", "toy [auto]"):
        assert label in header
        assert any(line.startswith(f"{label} placement: vision: ") for line in lines)
    auto_line = next(line for line in lines if line.startswith("toy [auto] placement"))
    assert "(auto: fastest here" in auto_line and "decoder: onnxruntime" in auto_line


@pytest.mark.parametrize("value, message", [("onnxruntime,bogus", "unknown backend 'bogus'"),
                                            ("openvino:f64", "unknown precision 'f64'"),
                                            ("auto,auto", "named twice")])
def test_profile_backends_bad_values_are_one_line(toy_artifacts, value, message):
    proc = run_cli("profile", toy_artifacts, "--backends", value)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@needs_openvino
def test_doctor_prints_the_auto_placement(toy_artifacts):
    from runtime.doctor.cli import format_text, report

    data = report(toy_artifacts, ("auto",), False)
    (auto,) = [c for c in data["checks"] if c["name"] == "auto"]
    assert auto["status"] == "pass", auto["detail"]
    assert "placement: vision: " in auto["detail"] and "decoder: onnxruntime" in auto["detail"]
    assert "tokens equal to the CPU's" in auto["detail"]
    assert "PASS  auto: placement: vision: " in format_text(data)


# ---- one thread policy across engines -----------------------------------------------------------

@needs_openvino
def test_openvino_pinning_is_its_default_unless_set(toy_artifacts):
    from runtime.backends.openvino import core

    default = bool(core().get_property("CPU", "ENABLE_CPU_PINNING"))
    art = LoadedArtifact.open(toy_artifacts, task="generation", backend="openvino")
    assert art.placement["vision"]["pinning"] is default and art.placement["qformer"]["pinning"] is default
    for value in (True, False):
        art = LoadedArtifact.open(toy_artifacts, task="generation", backend="openvino",
                                  threads=ThreadSettings(openvino_pinning=value))
        assert art.placement["vision"]["pinning"] is value
        assert "onnxruntime" == art.placement["decoder"]["engine"]  # one policy, both engines in one pipeline
