"""manifest.json: what an artifact directory holds and how to run it.

The runtime reads only the manifest and the files it names. A missing file, a checksum mismatch
or an unknown schema version is an ArtifactError that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "blip2-edge-artifacts"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashCache:
    """sha256 per (path, size, mtime): a warm start does not re-read gigabytes of weights.

    Kept in memory and in a small JSON file in the user's cache directory; a changed file has a
    new size or mtime and is hashed again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self._file = Path(base) / "blip2-edge" / "sha256.json"
        self._entries: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                self._entries = json.loads(self._file.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            entries = self._load()
            if key in entries:
                return entries[key]
        value = sha256_file(path)
        with self._lock:
            entries[key] = value
            try:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(entries))
                tmp.replace(self._file)
            except OSError:
                pass  # a read-only home only costs a re-hash next time
        return value


HASHES = _HashCache()


def graph_digest(graph: Path) -> str:
    """Identity of a graph: its sha256, combined with its external data's when it has some (a
    graph proto alone does not change when only the weights in <graph>.onnx.data do). Goes
    through the hash cache, so files verified at load are not read again."""
    data = graph.with_name(graph.name + ".data")
    if not data.exists():
        return HASHES.digest(graph)
    return hashlib.sha256(f"{HASHES.digest(graph)}:{HASHES.digest(data)}".encode()).hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    @property
    def model(self) -> dict:
        return self.data["model"]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def stage_file(self, stage: str) -> Path:
        try:
            return self.path(self.stages[stage]["file"])
        except KeyError:
            raise ArtifactError(f"{self.root / MANIFEST}: no stage '{stage}' (has: {', '.join(self.stages)})") from None

    def verify(self) -> None:
        """Checks that every listed file exists and has its recorded sha256."""
        for rel, expected in self.data["files"].items():
            p = self.path(rel)
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in {MANIFEST}); re-export the artifacts")
            if HASHES.digest(p) != expected:
                raise ArtifactError(f"{p}: sha256 mismatch with {MANIFEST}; the file is corrupted or was modified")


def load_manifest(root: str | os.PathLike, verify: bool = True) -> Manifest:
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (does not exist)")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing; is {root} an artifact directory written by 'blip2-edge export'?")
    try:
        data = json.loads(mpath.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a blip2-edge manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{mpath}: schema version {version!r} is not supported by this runtime (supports {SCHEMA_VERSION}); "
            "re-export the artifacts or upgrade blip2-edge"
        )
    manifest = Manifest(root, data)
    if verify:
        manifest.verify()
    return manifest


def write_manifest(root: Path, data: dict) -> None:
    """Fills in the file checksums and writes manifest.json (the exporter's side of the contract)."""
    data = dict(data)
    data["files"] = {rel: sha256_file(root / rel) for rel in sorted(data["files"])}
    (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
