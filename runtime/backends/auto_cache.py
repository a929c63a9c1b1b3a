"""--backend auto's measurement cache: what the engines measured for one artifact on one
machine, kept in the user's cache directory ($XDG_CACHE_HOME/blip2-edge/placement/), never in
the artifact directory (which may be read-only, and is shared between machines).

One small JSON file per key: the artifact (sha256 of its manifest, which holds every file's
sha256), the CPU (model name and /proc/cpuinfo flags), the engines' versions and the thread
settings. The file is untrusted input: only a regular file of bounded size, whose key is the
one expected and whose measurements have the expected shape for every stage and candidate, is
used; anything else is measured again and the file rewritten. A cached measurement decides
nothing by itself: the choice is made again from it (auto.choose), with this CPU's flags and
the fidelity gate, so a tampered file cannot put a stage on a precision this CPU lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from runtime.artifact.atomic_file import replace_file
from runtime.artifact.manifest import artifact_digest
from runtime.artifact.verified_files import cache_dir, keyed_name, read_json_bounded

SCHEMA = 1
MAX_FILE_BYTES = 256 << 10
log = logging.getLogger(__name__)


def cache_key(manifest_data: dict, cpu: str, flags: frozenset[str], versions: dict[str, str],
              threads: dict) -> dict:
    return {"schema": SCHEMA, "artifact": artifact_digest(manifest_data), "cpu": cpu,
            "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest(),
            "versions": dict(sorted(versions.items())), "threads": threads}


def cache_path(key: dict) -> Path:
    return cache_dir() / "placement" / f"{keyed_name(key)}.json"


def _measurement_ok(m) -> bool:
    if not isinstance(m, dict):
        return False
    if set(m) == {"error"}:
        return isinstance(m["error"], str)
    if set(m) != {"ms", "cosine", "worst"}:  # a file from before "worst" was measured: measured again
        return False
    ms, cos, worst = m["ms"], m["cosine"], m["worst"]
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (ms, cos, worst))
            and ms > 0 and all(-1.0 <= v <= 1.0 + 1e-6 for v in (cos, worst)))


def valid_measurements(data, key: dict, stages: tuple[str, ...], candidates: tuple[str, ...]) -> dict | None:
    """data["stages"] when `data` (a parsed cache file) is for `key` and holds a well-formed
    measurement of every candidate for every stage (and nothing else), else None."""
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    measured = data.get("stages")
    if not isinstance(measured, dict) or set(measured) != set(stages):
        return None
    for stage in stages:
        entry = measured[stage]
        if not isinstance(entry, dict) or set(entry) != set(candidates):
            return None
        if not all(_measurement_ok(entry[c]) for c in candidates):
            return None
    return measured


def read(key: dict, stages: tuple[str, ...], candidates: tuple[str, ...]) -> dict | None:
    """The cached measurements for `key`, or None (no file, or one not to be trusted)."""
    path = cache_path(key)
    measured = valid_measurements(read_json_bounded(path, MAX_FILE_BYTES), key, stages, candidates)
    if measured is None:
        log.debug("%s: not a usable --backend auto measurement; measuring again", path)
    return measured


def write(key: dict, measured: dict) -> Path | None:
    """Stores the measurements; None when the cache directory is not writable (the next load
    measures again)."""
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, (json.dumps({"key": key, "stages": measured}, indent=1) + "\n").encode(), mode=0o600)
    except OSError as exc:
        log.debug("cannot write %s (%s): --backend auto will measure again next time", path, exc)
        return None
    return path
