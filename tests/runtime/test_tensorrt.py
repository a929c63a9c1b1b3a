"""TensorRT logic that needs no GPU: engine manifest and stale detection, cache keys,
optimization profiles, CLI errors. The GPU tests build real engines where TensorRT exists."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from runtime.artifact.manifest import load_manifest, sha256_file
from runtime.backends.tensorrt.engines import (
    DeviceInfo,
    StaleEngineError,
    engine_dir,
    find_engine,
    ort_trt_cache_dir,
    source_graph_sha,
    write_engine_manifest,
)
from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile
from runtime.errors import install_command
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error

ORIN = DeviceInfo(gpu="Orin", compute_capability="8.7", trt_version="10.3.0")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def add_vision_engine(art):
    """A current (fake) vision engine for ORIN in the artifact directory `art`, listed in its
    engines.json as build-engines lists one; returns the artifact's manifest."""
    m = load_manifest(art)
    d = engine_dir(art, ORIN)
    d.mkdir(parents=True)
    (d / "vision.engine").write_bytes(b"serialized engine bytes")
    write_engine_manifest(d, ORIN, {"vision": {
        "engine": "vision.engine", "engine_sha256": sha256_file(d / "vision.engine"), "source_graph": "vision.onnx",
        "source_graph_sha256": source_graph_sha(m, "vision"), "flags": {}, "profile": {}}})
    return m


@pytest.fixture()
def with_engine(tmp_path, tiny_artifacts):
    return add_vision_engine(shutil.copytree(tiny_artifacts, tmp_path / "art"))


def test_current_engine_is_found_with_the_bytes_it_verified(with_engine):
    found = find_engine(with_engine, "vision", ORIN)
    assert found.path.name == "vision.engine" and found.data == b"serialized engine bytes"
    assert engine_dir(with_engine.root, ORIN).name == "trt10.3.0-sm87"
    # The runner deserialises found.data: a file swapped after the check is never what runs.
    found.path.write_bytes(b"swapped in after the hash was checked")
    assert found.data == b"serialized engine bytes"
    with pytest.raises(StaleEngineError, match="sha256 mismatch"):
        find_engine(with_engine, "vision", ORIN)


@pytest.mark.parametrize("device, why", [
    (DeviceInfo("Orin", "8.7", "10.7.0"), "no TensorRT 10.7.0 engines for sm87 (engines exist for trt10.3.0-sm87)"),
    (DeviceInfo("RTX 4090", "8.9", "10.3.0"), "no TensorRT 10.3.0 engines for sm89"),
])
def test_other_trt_or_gpu_is_stale(with_engine, device, why):
    with pytest.raises(StaleEngineError, match="build-engines") as err:
        find_engine(with_engine, "vision", device)
    assert why in str(err.value)


def test_same_cc_other_gpu_name_is_stale(with_engine):
    with pytest.raises(StaleEngineError, match="built for Orin .* this is Jetson AGX Orin"):
        find_engine(with_engine, "vision", DeviceInfo("Jetson AGX Orin", "8.7", "10.3.0"))


def test_changed_graph_is_stale(with_engine):
    with open(with_engine.stage_file("vision"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleEngineError, match="built from an older vision.onnx"):
        find_engine(with_engine, "vision", ORIN)


def test_tampered_engine_is_never_deserialised(with_engine):
    (engine_dir(with_engine.root, ORIN) / "vision.engine").write_bytes(b"something else entirely")
    with pytest.raises(StaleEngineError, match="refusing to deserialise"):
        find_engine(with_engine, "vision", ORIN)


def test_missing_stage(with_engine):
    with pytest.raises(StaleEngineError, match="no engine for stage 'qformer'.*--stages qformer"):
        find_engine(with_engine, "qformer", ORIN)


def test_ort_trt_cache_keys(tmp_path):
    keys = {ort_trt_cache_dir(tmp_path, ort, dev).name for ort in ("1.20.0", "1.21.0")
            for dev in (ORIN, DeviceInfo("Orin", "8.7", "10.7.0"), DeviceInfo("L4", "8.9", "10.3.0"))}
    assert len(keys) == 6
    assert ort_trt_cache_dir(tmp_path, "1.20.0", ORIN).name == "ort1.20.0-trt10.3.0-sm87"


def test_profiles_from_manifest_shapes(tiny_concat_artifacts):
    m = load_manifest(tiny_concat_artifacts)
    ranges = ProfileRanges(batch=Range(1, 2, 8), sequence=Range(1, 1, 40), past=Range(0, 30, 100))
    vision = stage_profile(m.stages["vision"], ranges)
    assert vision["pixel_values"] == ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))
    dec = stage_profile(m.stages["decoder"], ranges)
    heads, hd = m.model["num_heads"], m.model["head_dim"]
    assert dec["inputs_embeds"] == ((1, 1, 32), (2, 1, 32), (8, 40, 32))
    assert dec["attention_mask"] == ((1, 1), (2, 31), (8, 140))  # past + sequence
    assert dec["past_key_0"] == ((1, heads, 0, hd), (2, heads, 30, hd), (8, heads, 100, hd))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(4, 2, 8)


def test_build_keeps_current_entries_and_replaces_what_is_not_an_engine_manifest(with_engine):
    import os
    import signal

    from runtime.backends.tensorrt.cli import current_entries

    d = engine_dir(with_engine.root, ORIN)
    assert list(current_entries(d)) == ["vision"]
    (d / "engines.json").unlink()
    assert current_entries(d) == {}
    (d / "engines.json").write_text("{not json")
    assert current_entries(d) == {}
    (d / "engines.json").unlink()
    os.mkfifo(d / "engines.json")
    def blocked(*_):
        raise TimeoutError("blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)  # a FIFO read or write would block forever: fail instead
    try:
        assert current_entries(d) == {}
        write_engine_manifest(d, ORIN, {})  # replaces the FIFO rather than writing into it
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (d / "engines.json").is_file() and [p.name for p in d.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(HAS_TRT, reason="checks the message when TensorRT is missing")
def test_build_engines_without_tensorrt_names_the_extra(tiny_artifacts):
    assert_one_line_error(run_cli("build-engines", tiny_artifacts), install_command("tensorrt"))


def test_build_engines_argument_errors(tiny_artifacts, tmp_path):
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--int8"), "--int8 needs QDQ graphs",
                          "blip2-edge quantize SRC OUT --target gpu")
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--min-batch", "4", "--max-batch", "2"),
                          "--min/opt/max-batch: need 0 <= min <= opt <= max, got 4/1/2")
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--builder-optimization-level", "9"), "0-5")
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--contexts", "0"), "--contexts must be 1-8")
    assert_one_line_error(run_cli("build-engines", tmp_path / "nope"), "not an artifact directory")
    # Strongly typed engines: precision is the graph's. An FP32 export asked for FP16 names the export to run.
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--fp16"), "stage 'vision'", "float32 graph",
                          "--dtype fp16")


@pytest.mark.parametrize("stages", [("decoder",), ("vision", "decoder"), ("encoder",)])
def test_llm_stage_engines_are_refused(tiny_artifacts, stages):
    """The tensorrt backend loads engines for vision and qformer only: an LLM stage's engine
    would never run (and a MatMulNBits decoder would not parse)."""
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--stages", *stages),
                          "runs only vision and qformer", "MatMulNBits", "--backend onnxruntime-trt")


@pytest.mark.parametrize("option", [("--version-compatible",), ("--hardware-compatibility", "same-cc"),
                                    ("--max-past", "512")])
def test_options_that_could_not_work_are_gone(tiny_artifacts, option):
    proc = run_cli("build-engines", tiny_artifacts, *option)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_cpu_quantized_graphs_are_refused_for_tensorrt(toy_artifacts, tmp_path):
    """quantize's default target is the CPU (uint8 activations): build-engines, with or without
    --int8, and both TensorRT backends refuse it, naming the command that makes a GPU-ready one."""
    from calibration.quantize import QuantizeOptions, quantize
    from runtime.errors import Blip2EdgeError
    from runtime.pipeline import Blip2Pipeline

    out = tmp_path / "q"
    quantize(toy_artifacts, out, QuantizeOptions(num_calib=8, held_out=10, gate=False), log=lambda s: None)
    command = "blip2-edge quantize SRC OUT --target gpu"
    for flags in ((), ("--int8",), ("--fp16",)):
        assert_one_line_error(run_cli("build-engines", out, *flags), "uint8 activations", command)
    assert_one_line_error(run_cli("build-engines", out, "--stages", "qformer"), "'qformer'", command)
    for backend in ("tensorrt", "onnxruntime-trt"):
        with pytest.raises(Blip2EdgeError, match="--target gpu"):
            Blip2Pipeline.from_artifacts(out, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_engines_match_onnxruntime_and_stale_is_refused(toy_artifacts, tmp_path):
    from runtime import synthetic
    from runtime.pipeline import Blip2Pipeline

    art = shutil.copytree(toy_artifacts, tmp_path / "art")
    proc = run_cli("build-engines", art)  # the toy export is FP32: an FP32 strongly typed engine
    assert proc.returncode == 0, proc.stderr
    cpu = Blip2Pipeline.from_artifacts(art)
    trt = Blip2Pipeline.from_artifacts(art, backend="tensorrt")
    images = [im for _, im in synthetic.make_scenes(4, seed=2)]
    pixels = cpu.preprocessing.batch(images)
    image_embeds = cpu.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
    # Both stages the TensorRT backend runs, each fed the same (ONNX Runtime) inputs.
    for stage, feed, output in (("vision", {"pixel_values": pixels}, "image_embeds"),
                                ("qformer", {"image_embeds": image_embeds}, "query_embeds")):
        assert type(trt.runners[stage]).__name__ == "TrtRunner"
        a = cpu.runners[stage].infer(feed)[output].astype(np.float64)
        b = trt.runners[stage].infer(feed)[output].astype(np.float64)
        assert a.shape == b.shape
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.mean() >= 0.999 and cos.min() >= 0.99, stage
    with open(art / "vision.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleEngineError):
        Blip2Pipeline.from_artifacts(art, backend="tensorrt", verify=False)


def test_changed_external_weights_are_stale(tmp_path, tiny_checkpoint):
    """The graph proto does not change when only <graph>.onnx.data does: the digest covers both."""
    from exporter.export import ExportOptions, export
    from runtime.artifact.manifest import graph_digest

    art = tmp_path / "ext"
    export(str(tiny_checkpoint), art, ExportOptions(external_data_threshold=1, validate=False), log=lambda s: None)
    m = add_vision_engine(art)
    before = graph_digest(art / "vision.onnx")
    find_engine(m, "vision", ORIN)
    data = art / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert graph_digest(art / "vision.onnx") != before
    with pytest.raises(StaleEngineError, match="built from an older vision.onnx"):
        find_engine(m, "vision", ORIN)
