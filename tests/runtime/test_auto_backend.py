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
    GATE_COSINE,
    ORT,
    auto_runners,
    candidates,
    choose,
    cosine_mean,
    measurable_stages,
)
from runtime.backends.onnxrt import ThreadSettings
from runtime.backends.openvino import cpu_flags
from runtime.errors import OptionError
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.runtime.test_openvino import needs_openvino

NO_BF16 = frozenset({"avx2", "avx512f", "avx512_vnni"})
AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})


def m(ms: float, cosine: float = 1.0) -> dict:
    return {"ms": ms, "cosine": cosine}


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
    assert f"openvino f32: cosine 0.99935 to ONNX Runtime < {GATE_COSINE}" in reason
    assert "openvino bf16: cosine 0.99922" in reason


def test_a_failed_candidate_is_not_eligible_and_its_reason_is_kept():
    measured = {ORT: m(10.0), "openvino f32": {"error": "OpenVINO cannot run this graph (op X)"}}
    choice, reason = choose(measured, NO_BF16)
    assert choice == ORT and "op X" in reason


def test_a_simpler_engine_within_the_margin_is_kept():
    assert choose({ORT: m(100.0), "openvino f32": m(97.0)}, NO_BF16)[0] == ORT  # 3%: not worth a change
    assert choose({ORT: m(100.0), "openvino f32": m(90.0)}, NO_BF16)[0] == "openvino f32"
    # bf16 only 2% faster than f32, both well ahead of ONNX Runtime: f32 (no change of numbers)
    assert choose({ORT: m(100.0), "openvino f32": m(50.0), "openvino bf16": m(49.0)}, AMX)[0] == "openvino f32"


def test_cosine_mean_is_per_token():
    a = np.ones((1, 4, 8), np.float32)
    b = a.copy()
    b[0, 0] = -1  # one token of four reversed
    assert cosine_mean(a, a) == pytest.approx(1.0)
    assert cosine_mean(b, a) == pytest.approx(0.5)


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

@needs_openvino
@pytest.mark.parametrize("fixture", ["toy_artifacts", "toy_concat_artifacts"])
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
        if p["engine"] == "openvino":  # chosen within the gate, and bf16 only where this CPU has it
            assert p["measured"][f"openvino {p['precision']}"]["cosine"] >= GATE_COSINE
            assert p["precision"] in {c.split()[1] for c in candidates(cpu_flags() or frozenset()) if c != ORT}


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
    assert cosine_mean(auto.embed_images(images), ort.embed_images(images)) >= 1 - 4 * (1 - GATE_COSINE) - 1e-5
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
