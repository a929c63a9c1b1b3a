"""OpenVINO's compiled models, cached per stage in the user's cache directory
($XDG_CACHE_HOME/blip2-edge/openvino/), never in the artifact directory.

Compiling a stage from its ONNX file (read, convert, compile) is most of an OpenVINO load: 0.6-0.7 s
per visual stage of the bench model, against 0.1-0.2 s to import a compiled blob. OpenVINO writes
and reads the blobs itself (its CACHE_DIR); this module gives it one directory per key and checks
the directory's contents before OpenVINO reads them:

- The key: the artifact (the sha256 of its manifest, which holds every file's sha256), the stage,
  the device, the precision, OpenVINO's version and the compile settings. Another artifact,
  precision or OpenVINO never reads this directory's blobs.
- Verified like the artifact's own files: after a compile that wrote blobs, their sha256 go into
  an index beside them (written whole, 0600). Before a compile, every blob must be in the index
  with its digest (runtime.artifact.verified_files, the same hash cache); anything else (a
  changed, truncated or unlisted blob, a missing or malformed index, a FIFO) empties the
  directory of its blobs and the stage is compiled from the ONNX file again.
- A directory that cannot be created or written (a read-only home) costs a compile per load,
  nothing else. A blob holds the stage's weights as the graph stores them (an FP32 stage's blob
  is about its ONNX file's size, whatever the precision hint: OpenVINO converts at load), so the
  cache costs that much disk: BLIP2_EDGE_OPENVINO_CACHE=off turns it off, and deleting the
  directory reclaims it. (OpenVINO's CACHE_MODE=OPTIMIZE_SIZE keeps no weights, but from an ONNX
  file it loads no faster than no cache: measured 0.6 s either way on the bench vision stage.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from runtime.artifact.atomic_file import replace_file
from runtime.artifact.verified_files import HASHES, cache_dir, open_regular, read_bounded
from runtime.errors import ArtifactError

SCHEMA = 1
ENV = "BLIP2_EDGE_OPENVINO_CACHE"  # "off" (or 0, false, no): compile from the ONNX file on every load
INDEX = "blobs.json"
BLOB_SUFFIX = ".blob"
MAX_INDEX_BYTES = 64 << 10
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def stage_cache_dir(artifact: str, stage: str, device: str, precision: str, openvino: str, config: dict) -> Path:
    """The directory of one compiled stage: `artifact` is the manifest's digest
    (auto_cache.artifact_digest), `config` OpenVINO's compile settings."""
    key = {"schema": SCHEMA, "artifact": artifact, "stage": stage, "device": device, "precision": precision,
           "openvino": openvino, "config": {k: str(v) for k, v in sorted(config.items())}}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "openvino" / name


def _blobs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(BLOB_SUFFIX))


def _digest(path: Path) -> str:
    fd = open_regular(path)
    try:
        return HASHES.digest_fd(fd)[0]
    finally:
        os.close(fd)


def _index(directory: Path) -> dict | None:
    try:
        raw = read_bounded(directory / INDEX, MAX_INDEX_BYTES)
        data = json.loads(raw) if len(raw) <= MAX_INDEX_BYTES else None
    except (ArtifactError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def _clear(directory: Path) -> None:
    """Removes the blobs and the index (nothing else: the directory may hold what is not ours)."""
    try:
        for path in [*_blobs(directory), directory / INDEX]:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot clear %s (%s)", directory, exc)


def prepare(directory: Path) -> str | None:
    """Readies `directory` to be OpenVINO's CACHE_DIR: "verified" when it holds blobs that match
    its index, "empty" when it holds none (a stale or tampered one is removed first); None when
    it cannot be used (not creatable or not writable): compile without the cache."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(directory, os.W_OK | os.X_OK) or directory.is_symlink():
            return None
        blobs = _blobs(directory)
        if not blobs:
            return "empty"
        index = _index(directory)
        try:
            ok = index is not None and set(index) == {p.name for p in blobs} and \
                all(_digest(p) == index[p.name] for p in blobs)
        except ArtifactError:  # a blob that is not a regular file
            ok = False
        if not ok:
            log.info("%s: compiled blobs do not match their index; compiling again", directory)
            _clear(directory)
            return "empty"
        return "verified"
    except OSError as exc:
        log.debug("OpenVINO cache %s unusable (%s): compiling without it", directory, exc)
        return None


def sealed(directory: Path) -> bool:
    """Whether the index lists exactly the blobs in `directory` (it needs sealing when not)."""
    index = _index(directory)
    try:
        return index is not None and set(index) == {p.name for p in _blobs(directory)}
    except OSError:
        return False


def seal(directory: Path) -> None:
    """Records the sha256 of the blobs OpenVINO wrote into `directory`."""
    try:
        index = {p.name: _digest(p) for p in _blobs(directory)}
        replace_file(directory / INDEX, (json.dumps(index, indent=1) + "\n").encode(), mode=0o600)
    except (OSError, ArtifactError) as exc:
        log.debug("cannot index %s (%s): its blobs will be compiled again next time", directory, exc)
        _clear(directory)
