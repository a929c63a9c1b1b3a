"""The runtime refuses artifacts it cannot trust, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.artifact.manifest import load_manifest, sha256_file
from runtime.errors import ArtifactError
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


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


# ---- integrity: a restored mtime, unlisted files, the embedding table's header ----------------


def _rewrite_manifest(art, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _flip_in_place_keep_mtime(path, position=-1) -> None:
    """Changes one byte in place and restores the mtime, as `cp -p`, `rsync -t` or `touch -r` do."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_restored_mtime_does_not_fool_the_hash_cache(copy):
    load_manifest(copy)  # warms the cache for these very files
    _flip_in_place_keep_mtime(copy / "decoder.onnx")
    with pytest.raises(ArtifactError, match=r"decoder\.onnx: sha256 mismatch"):
        Blip2Pipeline.from_artifacts(copy)


def test_restored_mtime_through_the_cli(copy, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert run_cli("caption", copy, img, "--max-new-tokens", "2").returncode == 0  # warm cache on disk
    _flip_in_place_keep_mtime(copy / "embed_tokens.npy")
    assert_one_line_error(run_cli("caption", copy, img), "embed_tokens.npy: sha256 mismatch")


def test_empty_files_list_does_not_skip_verification(copy):
    _flip_in_place_keep_mtime(copy / "vision.onnx", position=len((copy / "vision.onnx").read_bytes()) // 2)
    _rewrite_manifest(copy, lambda m: m.update(files={}))
    with pytest.raises(ArtifactError, match=r"stages\.vision\.file = 'vision\.onnx' is loaded but not listed"):
        Blip2Pipeline.from_artifacts(copy)
    with pytest.raises(ArtifactError, match="is loaded but not listed"):
        load_manifest(copy, verify=False)  # listing is checked even when hashing is deferred


def test_unlisted_embedding_table_is_refused(copy):
    _rewrite_manifest(copy, lambda m: m["files"].pop("embed_tokens.npy"))
    with pytest.raises(ArtifactError, match=r"embeddings\.file = 'embed_tokens\.npy' is loaded but not listed"):
        load_manifest(copy)


def _replace_table(art, table) -> None:
    np.save(art / "embed_tokens.npy", table)
    _rewrite_manifest(art, lambda m: m["files"].update({"embed_tokens.npy": sha256_file(art / "embed_tokens.npy")}))


@pytest.mark.parametrize("make, message", [
    (lambda t: t.astype(np.int8), r"embedding table of dtype \|i1; expected float32"),
    (lambda t: t.astype(np.float16), "embedding table of dtype <f2; expected float32"),
    (lambda t: t.astype(">f4"), "embedding table of dtype >f4"),
    (lambda t: t[:, :16].copy(), r"embedding table of shape \[512, 16\]; expected \[512, 32\]"),
    (lambda t: np.asfortranarray(t), r"\(Fortran order\)"),
])
def test_embedding_table_header_is_checked(copy, make, message):
    _replace_table(copy, make(np.load(copy / "embed_tokens.npy")))
    with pytest.raises(ArtifactError, match=message):
        Blip2Pipeline.from_artifacts(copy)


def test_npy_format_2_table_loads(copy):
    table = np.load(copy / "embed_tokens.npy")
    with open(copy / "embed_tokens.npy", "wb") as f:
        np.lib.format.write_array(f, table, version=(2, 0))
    _rewrite_manifest(copy, lambda m: m["files"].update({"embed_tokens.npy": sha256_file(copy / "embed_tokens.npy")}))
    np.testing.assert_array_equal(Blip2Pipeline.from_artifacts(copy).embed_table, table)


def test_truncated_embedding_table(copy):
    raw = (copy / "embed_tokens.npy").read_bytes()
    (copy / "embed_tokens.npy").write_bytes(raw[:-4])
    _rewrite_manifest(copy, lambda m: m["files"].update({"embed_tokens.npy": sha256_file(copy / "embed_tokens.npy")}))
    with pytest.raises(ArtifactError, match=rf"{len(raw) - 4} bytes, but its header describes {len(raw)}; "
                                            "the file is truncated or has trailing data"):
        Blip2Pipeline.from_artifacts(copy)


def test_graph_inputs_must_match_the_manifest(copy):
    """vision.onnx replaced by the Q-Former graph (and re-hashed): its own declared inputs differ."""
    shutil.copy(copy / "qformer.onnx", copy / "vision.onnx")
    _rewrite_manifest(copy, lambda m: m["files"].update({"vision.onnx": sha256_file(copy / "vision.onnx")}))
    with pytest.raises(ArtifactError, match=r"the graph's inputs are image_embeds; stages\.vision\.inputs declares "
                                            r"pixel_values"):
        Blip2Pipeline.from_artifacts(copy)


def test_file_changed_after_verification_is_hashed_again(copy):
    m = load_manifest(copy)
    _flip_in_place_keep_mtime(copy / "tokenizer.json", position=10)
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: sha256 mismatch"):
        Blip2Pipeline(m)  # the pipeline re-checks what changed since load_manifest


# ---- regular files only, never blocking --------------------------------------------------------


def _python(code: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=env)


def test_fifo_named_in_the_manifest_is_refused_without_blocking(copy):
    (copy / "tokenizer.json").unlink()
    os.mkfifo(copy / "tokenizer.json")
    proc = _python("import sys\nfrom runtime.artifact.manifest import load_manifest\nfrom runtime.errors import ArtifactError\n"
                   "try:\n    load_manifest(sys.argv[1])\nexcept ArtifactError as e:\n    print(e)", copy)
    assert proc.returncode == 0 and "tokenizer.json: not a regular file" in proc.stdout, proc.stderr


def test_fifo_as_the_hash_cache_file_is_ignored(copy, tmp_path):
    cache = tmp_path / "xdg" / "blip2-edge"
    cache.mkdir(parents=True)
    os.mkfifo(cache / "sha256.json")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = _python("import sys\nfrom runtime.artifact.manifest import load_manifest\nload_manifest(sys.argv[1])\nprint('ok')",
                   copy, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("garbage", ['{"a": "not a digest", "b": 3}', "[1, 2]", "{not json", "[" * 100000])
def test_hash_cache_file_with_garbage_is_ignored(copy, tmp_path, monkeypatch, garbage):
    from runtime.artifact.verified_files import HashCache

    (tmp_path / "blip2-edge").mkdir()
    (tmp_path / "blip2-edge" / "sha256.json").write_text(garbage)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = HashCache()
    assert cache.digest(copy / "vision.onnx") == sha256_file(copy / "vision.onnx")
    saved = json.loads((tmp_path / "blip2-edge" / "sha256.json").read_text())
    assert list(saved.values()) == [sha256_file(copy / "vision.onnx")]


def test_hash_cache_is_saved_under_a_new_directory(copy, tmp_path, monkeypatch):
    from runtime.artifact.verified_files import HashCache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "new" / "cache"))
    HashCache().digest(copy / "vision.onnx")
    HashCache().digest(copy / "qformer.onnx")  # a second process: reads the file, adds to it
    saved = json.loads((tmp_path / "new" / "cache" / "blip2-edge" / "sha256.json").read_text())
    assert sorted(saved.values()) == sorted([sha256_file(copy / "vision.onnx"), sha256_file(copy / "qformer.onnx")])


def test_a_cold_verification_writes_the_hash_cache_once(copy, tmp_path, monkeypatch):
    """N new digests, one atomic rewrite of the cache file (not one per file), holding them all."""
    from runtime.artifact.verified_files import HASHES, cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cold"))
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append(dst) or real_replace(src, dst))
    manifest = load_manifest(copy)
    assert len(manifest.data["files"]) > 3
    assert [str(dst) for dst in replaced] == [str(cache_file())]
    saved = json.loads(cache_file().read_text())
    assert sorted(saved.values()) == sorted(manifest.data["files"].values())
    HASHES.digest(copy / "manifest.json")  # outside a verification: saved at once
    assert len(replaced) == 2 and len(json.loads(cache_file().read_text())) == len(saved) + 1


def test_one_threads_deferral_does_not_hold_back_another_threads_save(copy, tmp_path, monkeypatch):
    """saves_deferred() belongs to the thread that opened it: a digest another thread computes
    meanwhile (one Blip2Pipeline serves many threads) is written at once, not when (or if) the
    first thread's verification ends."""
    import threading

    from runtime.artifact.verified_files import HASHES, cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "threads"))
    entered, release = threading.Event(), threading.Event()

    def verifying():
        with HASHES.saves_deferred():
            entered.set()
            release.wait(30)

    other = threading.Thread(target=verifying)
    other.start()
    try:
        assert entered.wait(30)
        digest = HASHES.digest(copy / "vision.onnx")
        assert cache_file().exists() and digest in json.loads(cache_file().read_text()).values()
    finally:
        release.set()
        other.join(30)


def test_tests_do_not_use_the_real_cache():
    from runtime.artifact.verified_files import cache_file

    assert not str(cache_file()).startswith(os.path.expanduser("~/.cache"))


def test_open_verified_hashes_a_changed_file_from_its_handle(copy):
    m = load_manifest(copy)
    with m.open_verified("embed_tokens.npy", "embeddings.file") as f:
        assert f.read(6) == b"\x93NUMPY"
    _flip_in_place_keep_mtime(copy / "embed_tokens.npy")
    with pytest.raises(ArtifactError, match=r"embed_tokens\.npy: sha256 mismatch"):
        m.open_verified("embed_tokens.npy", "embeddings.file")
    with pytest.raises(ArtifactError, match=r"embeddings\.file = 'validation\.json' is loaded but not listed"):
        m.open_verified("validation.json", "embeddings.file")


def test_deferred_hashing_still_checks_what_is_loaded(copy):
    _flip_in_place_keep_mtime(copy / "qformer.onnx")
    m = load_manifest(copy, verify=False)  # listed, confined, regular: yes; hashed: not yet
    with pytest.raises(ArtifactError, match=r"qformer\.onnx: sha256 mismatch"):
        Blip2Pipeline(m)


def test_deferred_hashing_still_refuses_a_fifo(copy):
    (copy / "special_tokens_map.json").unlink()
    os.mkfifo(copy / "special_tokens_map.json")
    with pytest.raises(ArtifactError, match=r"special_tokens_map\.json: not a regular file"):
        load_manifest(copy, verify=False)


def test_unknown_stage_is_named(copy):
    with pytest.raises(ArtifactError, match="no stage 'encoder' .has: vision, qformer, decoder."):
        load_manifest(copy).stage_file("encoder")


def test_write_manifest_fills_in_checksums(copy):
    from runtime.artifact.manifest import MANIFEST, write_manifest

    data = json.loads((copy / MANIFEST).read_text())
    listed = data["files"]
    write_manifest(copy, {**data, "files": sorted(listed)})  # a writer's list of files -> {file: sha256}
    assert json.loads((copy / MANIFEST).read_text())["files"] == listed
    assert Blip2Pipeline.from_artifacts(copy).embed_table.shape == (512, 32)


@pytest.mark.parametrize("fixture", ["tiny_artifacts", "t5_tiny_artifacts", "retrieval_tiny_artifacts"])
@pytest.mark.parametrize("content", ['{"version": "1.0"}', "[]", '{"model": 3}'])
def test_a_tokenizer_json_that_is_not_a_tokenizer_names_the_file(request, tmp_path, fixture, content):
    """Valid JSON, hash updated in the manifest, but not a tokenizer: one line naming the file."""
    from runtime.artifact.manifest import MANIFEST, write_manifest

    art = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "art")
    (art / "tokenizer.json").write_text(content)
    data = json.loads((art / MANIFEST).read_text())
    write_manifest(art, {**data, "files": sorted(data["files"])})
    command = ("match", art, tmp_path / "x.png", "a red square") if fixture.startswith("retrieval") \
        else ("caption", art, tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert_one_line_error(run_cli(*command), "tokenizer.json: not a tokenizer file")


def test_undecodable_text_through_the_api_names_the_argument(tiny_artifacts, retrieval_tiny_artifacts):
    from runtime import Blip2Retriever
    from runtime.errors import OptionError

    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    image = Image.new("RGB", (8, 8))
    cases = [(lambda: pipe.ask([image], "what \ud800 is it?"), "question"),
             (lambda: pipe.caption([image], prompt="a \udcff photo"), "prompt"),
             (lambda: list(pipe.stream(image, question="\ud800")), "question"),
             (lambda: pipe.generate([image, image], ["fine", b"bytes"]), "prompt 1"),
             (lambda: pipe.ask([image], None), "question"),
             (lambda: Blip2Retriever.from_artifacts(retrieval_tiny_artifacts).itc([image], ["ok", "\ud800"]), "text 1")]
    for call, name in cases:
        with pytest.raises(OptionError, match=f"^{name}: "):
            call()
