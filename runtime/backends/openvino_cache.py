"""OpenVINO's compiled models, cached per stage in the user's cache directory
($XDG_CACHE_HOME/blip2-edge/openvino/), never in the artifact directory. CPU only: OpenVINO's GPU
plugin also keeps kernel caches in the same directory, which this module does not check.

Compiling a stage from its ONNX file (read, convert, compile) is most of an OpenVINO load: 0.6-0.7 s
per visual stage of the bench model, against 0.1-0.2 s to import a compiled blob
(bench/load_bench.py). OpenVINO writes and reads the blobs itself (its CACHE_DIR); this module
gives it one directory per key and checks the directory before OpenVINO reads it:

- The key: the artifact (the sha256 of its manifest, which holds every file's sha256), the stage,
  the device, the precision, OpenVINO's version and the compile settings. Another artifact,
  precision or OpenVINO never reads this directory's blobs.
- After a compile that wrote blobs, their sha256 go into an index beside them (written whole,
  0600), and blobs left from before that this compile did not use are removed. Before a
  compile, every blob must be a regular file listed in the index with its digest (through the
  artifact files' hash cache, runtime.artifact.verified_files); anything else (a changed,
  truncated or unlisted blob, a missing or malformed index) empties the directory of blobs and
  the stage is compiled from the ONNX file again. An entry that is not a regular file, or blobs
  that cannot be removed, leave the directory unused. This catches damage and stale files; it
  is no defence against someone who can write the cache directory (they can rewrite the index).
- Size: a blob holds the stage's weights as the graph stores them (an FP32 stage's blob is
  about its ONNX file's size whatever the precision hint: OpenVINO converts at load), so the
  cache is bounded: after a write, whole directories are removed, least recently used first,
  until the blobs total at most BLIP2_EDGE_OPENVINO_CACHE (a size, default 8GB; "off" turns the
  cache off). OpenVINO's CACHE_MODE=OPTIMIZE_SIZE keeps no weights, but from an ONNX file it
  loads no faster than no cache (0.6 s either way on the bench vision stage), so it is not used.
- A directory that cannot be created or written (a read-only home) costs a compile per load,
  nothing else. Loads of one stage running at once may each compile (one's check removes the
  other's blob before it is indexed): the cache is then written again, never read unchecked.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from runtime.artifact.atomic_file import replace_file
from runtime.artifact.verified_files import HASHES, cache_dir, keyed_name, open_regular, read_json_bounded
from runtime.errors import ArtifactError, OptionError
from runtime.host_memory import parse_size

SCHEMA = 1
ENV = "BLIP2_EDGE_OPENVINO_CACHE"  # "off" (or 0, false, no), or the most the blobs may take, e.g. 8GB
DEFAULT_LIMIT = "8GB"
OFF = ("off", "0", "false", "no")
INDEX = "blobs.json"
BLOB_SUFFIX = ".blob"
MAX_INDEX_BYTES = 64 << 10
log = logging.getLogger(__name__)


def limit() -> int | None:
    """The most bytes the cached blobs may take (BLIP2_EDGE_OPENVINO_CACHE), None when it is off."""
    value = os.environ.get(ENV, DEFAULT_LIMIT).strip()
    if value.lower() in OFF:
        return None
    try:
        return parse_size(value, ENV)
    except OptionError as exc:
        raise OptionError(f"{exc} (or off)") from None


def root() -> Path:
    return cache_dir() / "openvino"


def stage_cache_dir(artifact: str, stage: str, device: str, precision: str, openvino: str, config: dict) -> Path:
    """The directory of one compiled stage: `artifact` is the manifest's digest
    (runtime.artifact.manifest.artifact_digest), `config` OpenVINO's compile settings."""
    return root() / keyed_name({"schema": SCHEMA, "artifact": artifact, "stage": stage, "device": device,
                                "precision": precision, "openvino": openvino,
                                "config": {k: str(v) for k, v in sorted(config.items())}})


def _snapshot(directory: Path) -> dict[str, tuple] | None:
    """{blob name: (size, mtime, inode)}, or None when an entry named like a blob is not a
    regular file (a directory, a link, a FIFO): such a directory is not used."""
    blobs = {}
    for entry in directory.iterdir():
        if entry.name.endswith(BLOB_SUFFIX):
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode):
                return None
            blobs[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return blobs


def _digest(path: Path) -> str:
    fd = open_regular(path)
    try:
        return HASHES.digest_fd(fd)[0]
    finally:
        os.close(fd)


def _index(directory: Path) -> dict | None:
    data = read_json_bounded(directory / INDEX, MAX_INDEX_BYTES)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def _remove(directory: Path, names, index: bool = True) -> bool:
    """Removes the blobs `names` of `directory` (and its index) as far as it can; False when one
    could not be removed."""
    ok = True
    for path in [*(directory / n for n in names), *((directory / INDEX,) if index else ())]:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("cannot remove %s (%s)", path, exc)
            ok = False
    return ok


def prepare(directory: Path) -> dict[str, tuple] | None:
    """Readies `directory` to be OpenVINO's CACHE_DIR: the blobs it holds, all verified against
    the index ({} when none: a stale or damaged one is removed first); None when it cannot be
    used (not creatable or writable, an entry that is not a regular file, a blob that cannot be
    removed): compile without the cache."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if directory.is_symlink() or not os.access(directory, os.W_OK | os.X_OK):
            return None
        blobs = _snapshot(directory)
        if not blobs:
            return blobs  # None (unusable) or {} (nothing to verify)
        index = _index(directory)
        if index is not None and set(index) == set(blobs) and all(_digest(directory / n) == index[n] for n in blobs):
            return blobs
        log.info("%s: compiled blobs do not match their index; compiling again", directory)
        if not _remove(directory, blobs):
            return None
        return _snapshot(directory)  # {} unless something came back
    except (OSError, ArtifactError) as exc:
        log.debug("OpenVINO cache %s unusable (%s): compiling without it", directory, exc)
        return None


def settle(directory: Path, before: dict[str, tuple]) -> str | None:
    """After OpenVINO compiled with `directory` as its CACHE_DIR (holding the verified blobs
    `before`): "read" when it used them unchanged, "written" when it wrote blobs (indexed here;
    the ones from before that it did not use are removed, and the cache is brought under its
    size limit), None when it keeps none."""
    try:
        after = _snapshot(directory) or {}
        if after and after == before:
            os.utime(directory / INDEX)  # least recently used: the first removed when over the limit
            return "read"
        stale = {n for n, ident in before.items() if after.get(n) == ident}
        if not after or len(stale) == len(after):  # nothing new: the plugin keeps no blobs
            _remove(directory, ())
            return None
        _remove(directory, stale, index=False)
        index = {n: _digest(directory / n) for n in after if n not in stale}
        replace_file(directory / INDEX, (json.dumps(index, indent=1) + "\n").encode(), mode=0o600)
    except (OSError, ArtifactError) as exc:
        log.debug("cannot index %s (%s): its blobs will be compiled again next time", directory, exc)
        return None
    evict(limit() or 0, keep=directory)
    return "written"


def evict(budget: int, keep: Path | None = None) -> None:
    """Removes whole stage directories, least recently used first, until the blobs under root()
    total at most `budget` bytes (`keep`, the one just written, goes last)."""
    try:
        dirs = [d for d in root().iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return
    sized = []  # (is `keep`, last used, directory, its blobs, their bytes)
    for d in dirs:
        try:
            blobs = _snapshot(d) or {}
            used = (d / INDEX).stat().st_mtime_ns if (d / INDEX).exists() else 0
        except OSError:
            continue
        sized.append((d == keep, used, d, blobs, sum(size for size, _, _ in blobs.values())))
    total = sum(s[4] for s in sized)
    for _, _, d, blobs, size in sorted(sized, key=lambda s: s[:2]):
        if total <= budget:
            break
        if _remove(d, blobs):
            total -= size
            log.info("removed %s (%.0f MB) to keep the OpenVINO cache within %s", d, size / 1e6, budget)
