"""The runtime refuses artifacts it cannot trust, naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.errors import ArtifactError
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline


@pytest.fixture()
def copy(tmp_path, tiny_artifacts):
    return shutil.copytree(tiny_artifacts, tmp_path / "art")


def test_checksum_mismatch_names_the_file(copy):
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"decoder\.onnx: sha256 mismatch"):
        Blip2Pipeline.from_artifacts(copy)


def test_missing_file_names_it(copy):
    (copy / "embed_tokens.npy").unlink()
    with pytest.raises(ArtifactError, match=r"embed_tokens\.npy: missing"):
        Blip2Pipeline.from_artifacts(copy)


def test_unknown_schema_version(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_manifest(copy)


def test_not_an_artifact_directory(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_hash_cache_sees_a_rewrite(copy):
    load_manifest(copy)  # warms the (path, size, mtime) -> sha256 cache
    data = (copy / "qformer.onnx").read_bytes()
    (copy / "qformer.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, new content
    with pytest.raises(ArtifactError, match="qformer.onnx: sha256 mismatch"):
        load_manifest(copy)
