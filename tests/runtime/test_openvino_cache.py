"""OpenVINO's compiled blobs cached per stage in the user's cache directory
(runtime/backends/openvino_cache.py): written on the first load, read after verification on the
next, compiled again when a blob was changed or is unlisted, bounded in size, and never in the
way (an unusable directory, or the switch off, compiles from the ONNX file). The checks on
their own on plain files, then real OpenVINO on the toy."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from runtime.backends import openvino_cache
from runtime.backends.auto import ORT
from runtime.errors import OptionError
from runtime.loaded_artifact import LoadedArtifact
from tests.runtime.test_openvino import needs_openvino


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(openvino_cache.ENV, raising=False)
    return tmp_path / "cache" / "blip2-edge" / "openvino"


# ---- the checks, on plain files ----------------------------------------------------------------

def blob_dir(parent, name="stage", blobs=None, indexed=True):
    d = parent / name
    d.mkdir(parents=True)
    blobs = {"1.blob": b"compiled " * 100} if blobs is None else blobs
    for n, data in blobs.items():
        (d / n).write_bytes(data)
    if indexed:
        index = {n: hashlib.sha256(data).hexdigest() for n, data in blobs.items()}
        (d / openvino_cache.INDEX).write_text(json.dumps(index))
    return d


def test_verified_blobs_are_kept_and_reported(tmp_path):
    d = blob_dir(tmp_path)
    assert set(openvino_cache.prepare(d)) == {"1.blob"}
    assert openvino_cache.prepare(tmp_path / "new") == {}  # created, nothing to verify


@pytest.mark.parametrize("damage", ["flip", "truncate", "unlisted", "no index", "bad index"])
def test_a_changed_or_unlisted_blob_empties_the_directory(tmp_path, damage):
    d = blob_dir(tmp_path)
    blob = d / "1.blob"
    if damage == "flip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the digest tells
        blob.write_bytes(bytes(data))
    elif damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:10])
    elif damage == "unlisted":
        (d / "2.blob").write_bytes(b"not OpenVINO's")
    elif damage == "no index":
        (d / openvino_cache.INDEX).unlink()
    else:
        (d / openvino_cache.INDEX).write_text("[1, 2")
    assert openvino_cache.prepare(d) == {}
    assert not list(d.glob("*.blob")) and not (d / openvino_cache.INDEX).exists()


def test_an_entry_that_is_not_a_regular_file_leaves_the_directory_unused(tmp_path):
    d = blob_dir(tmp_path)
    (d / "odd.blob").mkdir()
    assert openvino_cache.prepare(d) is None
    assert (d / "1.blob").exists()  # nothing removed either
    target = blob_dir(tmp_path, "elsewhere")
    (tmp_path / "link").symlink_to(target)
    assert openvino_cache.prepare(tmp_path / "link") is None


def test_settle_reports_what_the_compile_did(tmp_path, cache_home):
    d = blob_dir(cache_home, indexed=True)
    before = openvino_cache.prepare(d)
    assert openvino_cache.settle(d, before) == "read"  # nothing changed: the blob was used
    (d / "2.blob").write_bytes(b"a new compile")  # a miss: the old blob was not used
    assert openvino_cache.settle(d, before) == "written"
    assert {p.name for p in d.glob("*.blob")} == {"2.blob"}
    assert json.loads((d / openvino_cache.INDEX).read_text()) == {"2.blob": hashlib.sha256(b"a new compile").hexdigest()}
    empty = blob_dir(cache_home, "none", blobs={}, indexed=False)
    assert openvino_cache.settle(empty, openvino_cache.prepare(empty)) is None  # a plugin that keeps nothing


def test_the_least_recently_used_directories_go_first_over_the_limit(cache_home):
    dirs = [blob_dir(cache_home, f"d{i}", {"1.blob": bytes(1000)}) for i in range(3)]
    for i, d in enumerate(dirs):  # d0 used longest ago, d2 last
        os.utime(d / openvino_cache.INDEX, ns=(10**18 + i * 10**9,) * 2)
    openvino_cache.evict(2500, keep=dirs[0])
    assert [bool(list(d.glob("*.blob"))) for d in dirs] == [True, False, True]
    openvino_cache.evict(500, keep=dirs[0])
    assert [bool(list(d.glob("*.blob"))) for d in dirs] == [False, False, False]


@pytest.mark.parametrize("value, want", [(None, 8 * 10**9), ("off", None), ("0", None), ("1.5GB", 1.5e9)])
def test_the_limit_and_the_switch(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(openvino_cache.ENV, raising=False)
    else:
        monkeypatch.setenv(openvino_cache.ENV, value)
    assert openvino_cache.limit() == want


def test_a_bad_limit_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(openvino_cache.ENV, "lots")
    with pytest.raises(OptionError, match=f"{openvino_cache.ENV} 'lots': not a size.*\\(or off\\)"):
        openvino_cache.limit()


# ---- real OpenVINO on the toy ------------------------------------------------------------------

def load(path, precision="f32"):
    return LoadedArtifact.open(path, task="generation", backend="openvino", precision=precision)


def states(artifact) -> dict:
    return {s: p.get("compiled_cache") for s, p in artifact.placement.items() if p["engine"] == "openvino"}


def vision_out(artifact) -> np.ndarray:
    size = artifact.model["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return artifact.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]


@needs_openvino
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


@needs_openvino
def test_a_damaged_blob_is_compiled_again_at_load(toy_concat_artifacts, cache_home):
    want = vision_out(load(toy_concat_artifacts))
    for d in cache_home.iterdir():
        (blob,) = d.glob("*.blob")
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        (d / "stale.blob").write_bytes(b"left by someone")
    again = load(toy_concat_artifacts)
    assert set(states(again).values()) == {"written"}
    np.testing.assert_array_equal(vision_out(again), want)
    assert not list(cache_home.glob("*/stale.blob"))
    assert set(states(load(toy_concat_artifacts)).values()) == {"read"}


@needs_openvino
def test_precisions_and_artifacts_never_share_blobs(toy_concat_artifacts, tiny_concat_artifacts, cache_home):
    load(toy_concat_artifacts)
    count = len(list(cache_home.iterdir()))
    load(tiny_concat_artifacts)
    assert len(list(cache_home.iterdir())) == 2 * count


@needs_openvino
def test_an_unusable_cache_or_the_switch_off_compiles_from_onnx(toy_concat_artifacts, tmp_path, monkeypatch):
    (tmp_path / "not-a-dir").write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    assert set(states(load(toy_concat_artifacts)).values()) == {None}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(openvino_cache.ENV, "off")
    assert set(states(load(toy_concat_artifacts)).values()) == {None}
    assert not (tmp_path / "cache" / "blip2-edge" / "openvino").exists()


@needs_openvino
def test_auto_keeps_blobs_only_of_what_it_chose(toy_artifacts, cache_home):
    """Measuring compiles the candidates without the cache; the toy is too small for OpenVINO to
    win on time, so the measurement file says it did: the next load compiles the vision stage on
    OpenVINO f32, keeping its blob, and nothing else."""
    LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert not cache_home.exists() or not list(cache_home.iterdir())
    (path,) = (cache_home.parent / "placement").glob("*.json")
    data = json.loads(path.read_text())
    data["stages"]["vision"]["openvino f32"]["ms"] = data["stages"]["vision"][ORT]["ms"] / 10
    path.write_text(json.dumps(data))
    second = LoadedArtifact.open(toy_artifacts, task="generation", backend="auto")
    assert (second.placement["vision"]["engine"], second.placement["vision"]["compiled_cache"]) == ("openvino", "written")
    assert len(list(cache_home.iterdir())) == sum(p["engine"] == "openvino" for p in second.placement.values())
