"""A seal on the approximate graph stored in an index file.

The graph is C++ state that usearch restores from bytes it cannot validate: a crafted or damaged
blob can crash the process. The index file is untrusted input (it may come from anywhere), so a
stored graph is used only if it carries an HMAC made with a key that never leaves this user's
cache directory. A graph built here is used; any other (a db from elsewhere, an edited blob) is
ignored: search stays exact, and the next `blip2-edge index` rebuilds the graph and seals it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from runtime.artifact.atomic_file import write_temp
from runtime.artifact.verified_files import cache_file, read_bounded
from runtime.errors import ArtifactError

KEY_BYTES = 32


def _key_path() -> Path:
    return cache_file().parent / "index-graph.key"


def key() -> bytes:
    """This user's key, made on first use (mode 0600). Two processes making it at once: the
    first link wins and both read that one. A key file that is not a regular file of the right
    size is replaced. Raises OSError or ArtifactError when there is no usable cache directory
    (callers then keep search exact)."""
    path = _key_path()
    existing = _read_key(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, ".index-graph.key.", os.urandom(KEY_BYTES), mode=0o600)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process's key, or a bad one: replace only a bad one
            existing = _read_key(path)
            if existing:
                return existing
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read_bounded(path, KEY_BYTES)


def _read_key(path: Path) -> bytes | None:
    try:
        data = read_bounded(path, KEY_BYTES)
    except (ArtifactError, OSError):
        return None
    return data if len(data) == KEY_BYTES else None


def seal(data: bytes) -> str:
    return hmac.new(key(), data, hashlib.sha256).hexdigest()


def is_sealed(data: bytes, mac) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(seal(data), mac)
