"""OpenVINO's compiled blobs cached per stage in the user's cache directory: written on the
first load, read (after verification against their index) on the next, compiled again when a
blob was changed or is unlisted, and never in the way: an unusable directory or the switch
off compiles from the ONNX file. Real OpenVINO on the toy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.backends import openvino_cache
from runtime.loaded_artifact import LoadedArtifact
from tests.runtime.test_openvino import needs_openvino

pytestmark = needs_openvino


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(openvino_cache.ENV, raising=False)
    return tmp_path / "cache" / "blip2-edge" / "openvino"


def load(path, precision="f32"):
    return LoadedArtifact.open(path, task="generation", backend="openvino", precision=precision)


def states(artifact) -> dict:
    return {s: p.get("compiled_cache") for s, p in artifact.placement.items() if p["engine"] == "openvino"}


def vision_out(artifact) -> np.ndarray:
    size = artifact.model["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return artifact.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]


def test_written_then_read_with_the_same_outputs(toy_concat_artifacts, cache_home):
    first = load(toy_concat_artifacts)
    assert set(states(first).values()) == {"written"}
    dirs = sorted(cache_home.iterdir())
    assert len(dirs) == len(states(first))  # one directory per stage
    for d in dirs:
        index = json.loads((d / openvino_cache.INDEX).read_text())
        assert index and set(index) == {p.name for p in d.glob("*.blob")}
    second = load(toy_concat_artifacts)
    assert set(states(second).values()) == {"read"}
    np.testing.assert_array_equal(vision_out(second), vision_out(first))
    assert "compiled_cache" not in LoadedArtifact.open(toy_concat_artifacts, task="generation").placement["vision"]


@pytest.mark.parametrize("damage", ["flip", "unlisted", "no index", "bad index"])
def test_a_changed_or_unlisted_blob_is_compiled_again(toy_concat_artifacts, cache_home, damage):
    want = vision_out(load(toy_concat_artifacts))
    for d in cache_home.iterdir():  # every stage's directory damaged alike
        (blob,) = d.glob("*.blob")
        if damage == "flip":
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF  # same size: only the digest tells
            blob.write_bytes(bytes(data))
        elif damage == "unlisted":
            (d / "0000.blob").write_bytes(b"not OpenVINO's")
        elif damage == "no index":
            (d / openvino_cache.INDEX).unlink()
        else:
            (d / openvino_cache.INDEX).write_text("[1, 2")
    for d in cache_home.iterdir():  # the check itself, before OpenVINO is asked: nothing of it is left
        assert openvino_cache.prepare(d) == "empty" and not list(d.glob("*.blob"))
        assert not (d / openvino_cache.INDEX).exists()
    again = load(toy_concat_artifacts)
    assert set(states(again).values()) == {"written"}
    np.testing.assert_array_equal(vision_out(again), want)
    assert set(states(load(toy_concat_artifacts)).values()) == {"read"}
    for d in cache_home.iterdir():
        assert not (d / "0000.blob").exists()


def test_precisions_and_artifacts_never_share_blobs(toy_concat_artifacts, tiny_concat_artifacts, cache_home):
    from runtime.backends.openvino import cpu_flags, native_precisions

    load(toy_concat_artifacts)
    count = len(list(cache_home.iterdir()))
    load(tiny_concat_artifacts)
    assert len(list(cache_home.iterdir())) == 2 * count
    if "bf16" in native_precisions(cpu_flags() or frozenset()):
        assert set(states(load(toy_concat_artifacts, "bf16")).values()) == {"written"}


def test_an_unusable_cache_directory_or_the_switch_off_compiles_from_onnx(toy_concat_artifacts, tmp_path,
                                                                          monkeypatch):
    (tmp_path / "not-a-dir").write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    assert set(states(load(toy_concat_artifacts)).values()) == {None}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(openvino_cache.ENV, "off")
    assert set(states(load(toy_concat_artifacts)).values()) == {None}
    assert not (tmp_path / "cache" / "blip2-edge" / "openvino").exists()


def test_auto_measurement_leaves_no_blobs_of_the_candidates_it_did_not_choose(toy_artifacts, cache_home):
    first = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert not cache_home.exists() or not list(cache_home.iterdir())  # measuring compiles without the cache
    second = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    on_openvino = [s for s, p in second.placement.items() if p["engine"] == "openvino"]
    assert {s: first.placement[s]["engine"] for s in second.placement} == \
        {s: p["engine"] for s, p in second.placement.items()}
    written = list(cache_home.iterdir()) if cache_home.exists() else []
    assert len(written) == len(on_openvino)
