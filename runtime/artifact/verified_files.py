"""Reading an untrusted artifact directory's files: regular files only, their sha256 through a
cache that a restored mtime cannot fool.

- A FIFO or a device named in a manifest (or standing where the hash cache lives) must never
  block or stream forever: files are stat'ed first and opened with O_NONBLOCK, and anything that
  is not a regular file is refused.
- The cache keys a digest on the file's identity: device, inode, size, mtime and ctime. `cp -p`,
  `rsync -t`, `touch -r` and os.utime can set mtime back, but any write or utime call moves
  ctime forward, and no unprivileged call sets it back; a replaced file has a new inode.
- Digests are computed from an open descriptor, so the caller can load from the very handle
  that was hashed (or check, by its identity, that the path still names that file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runtime.artifact.atomic_file import replace_file
from runtime.errors import ArtifactError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileIdentity:
    """What changes whenever a file's content may have changed (see the module docstring)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def key(self) -> str:
        return f"{self.device}:{self.inode}:{self.size}:{self.mtime_ns}:{self.ctime_ns}"


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))


def file_kind(mode: int) -> str:
    """What an st_mode is, for messages: 'a FIFO', 'a character device', 'a directory'..."""
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def open_regular(path: str | os.PathLike, hint: str = "") -> int:
    """A read-only descriptor on `path` if it is a regular file; else an ArtifactError naming it.
    Never blocks: a FIFO is refused by stat before it is opened, and O_NONBLOCK covers a FIFO
    swapped in between (the fstat after opening refuses it too)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{path}: not a regular file but {file_kind(mode)}, which is never read{hint}")
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing{hint}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc.strerror}){hint}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ArtifactError(f"{path}: not a regular file but {file_kind(mode)}, which is never read{hint}")
    return fd


def read_bounded(path: str | os.PathLike, limit: int, hint: str = "") -> bytes:
    """At most `limit` + 1 bytes of the regular file `path` (more than `limit` means the file is
    over it), or an ArtifactError from open_regular: small JSON files (manifests, the hash cache)
    are read this way, never a FIFO and never an unbounded amount."""
    fd = open_regular(path, hint)
    try:
        return os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)


def sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file, read with pread (the descriptor's offset is left alone)."""
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, chunk, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    fd = open_regular(path)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """The runtime's per-user cache directory ($XDG_CACHE_HOME/blip2-edge, else
    ~/.cache/blip2-edge). Read on each use, so that XDG_CACHE_HOME set after import (the tests
    do) is honoured."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2-edge"


def keyed_name(key: dict) -> str:
    """A file or directory name for a cache entry: the sha256 of its key (canonical JSON), cut to 32."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def read_json_bounded(path: str | os.PathLike, limit: int):
    """The parsed JSON of the regular file `path` if it is at most `limit` bytes, else None (a
    cache file: missing, not a regular file, too large or not JSON counts as no entry)."""
    try:
        raw = read_bounded(path, limit)
        return json.loads(raw) if len(raw) <= limit else None
    except (ArtifactError, ValueError, RecursionError):
        return None


def cache_file() -> Path:
    return cache_dir() / "sha256.json"


class HashCache:
    """sha256 per file identity: a warm start does not re-read gigabytes of weights.

    Kept in memory and in a small JSON file in the user's cache directory. The file is itself
    untrusted input: only a regular file of bounded size holding {identity: hex digest} is used;
    anything else counts as an empty cache.
    """

    MAX_ENTRIES = 4096
    MAX_FILE_BYTES = 4 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[Path, dict[str, str]] = {}
        # Per thread: one Blip2Pipeline serves many threads, and a verification running in one
        # must not hold back (or, if it never ends, lose) the saves of another.
        self._deferral = threading.local()  # .depth: open saves_deferred() blocks; .unsaved: cache files

    def _entries(self, file: Path) -> dict[str, str]:
        if file not in self._loaded:
            self._loaded[file] = self._read(file)
        return self._loaded[file]

    def _read(self, file: Path) -> dict[str, str]:
        try:
            raw = read_bounded(file, self.MAX_FILE_BYTES)
        except ArtifactError:
            return {}
        try:
            data = json.loads(raw) if len(raw) <= self.MAX_FILE_BYTES else None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)}

    def _save(self, file: Path, entries: dict[str, str]) -> None:
        while len(entries) > self.MAX_ENTRIES:
            del entries[next(iter(entries))]  # oldest first
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            replace_file(file, json.dumps(entries).encode(), mode=0o600)  # a per-user cache, as before
        except OSError:
            pass  # a read-only home only costs a re-hash next time

    @contextmanager
    def saves_deferred(self) -> Iterator[None]:
        """Digests this thread computes inside the block are written to the cache file once, when
        its outermost block ends (even by an exception), instead of once each: a cold
        verification of N files rewrites the file once, not N times. Other threads save as usual."""
        local = self._deferral
        if not getattr(local, "depth", 0):
            local.depth, local.unsaved = 0, set()
        local.depth += 1
        try:
            yield
        finally:
            local.depth -= 1
            if not local.depth:
                with self._lock:
                    for file in local.unsaved:
                        self._save(file, self._entries(file))
                local.unsaved = set()

    def digest_fd(self, fd: int) -> tuple[str, FileIdentity]:
        """(sha256, identity) of the open file `fd`. A file that changed while it was being
        hashed is not cached (its identity at the end differs from the one returned)."""
        before = FileIdentity.of(os.fstat(fd))
        file = cache_file()
        with self._lock:
            hit = self._entries(file).get(before.key)
        if hit is not None:
            return hit, before
        value = sha256_fd(fd)
        if FileIdentity.of(os.fstat(fd)) == before:
            with self._lock:
                entries = self._entries(file)
                entries[before.key] = value
                if getattr(self._deferral, "depth", 0):
                    self._deferral.unsaved.add(file)
                else:
                    self._save(file, entries)
        return value, before

    def digest(self, path: str | os.PathLike) -> str:
        fd = open_regular(path)
        try:
            return self.digest_fd(fd)[0]
        finally:
            os.close(fd)


HASHES = HashCache()
