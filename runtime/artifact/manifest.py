"""manifest.json: what an artifact directory holds and how to run it.

An artifact directory is untrusted input (people download and copy them around):
- manifest.json is a bounded regular file, validated (runtime.artifact.schema) before anything
  it names is read or allocated;
- every path it names resolves inside the directory (runtime.artifact.confinement), through Manifest.path;
- every file the runtime loads (stage graphs and the external data they name, the embedding
  table, the tokenizer, ...) must be listed in files{}, and every listed file must have its
  sha256 (runtime.artifact.verified_files: regular files only, a cache a restored mtime cannot fool).
A missing file, a checksum mismatch, a bad field or an unknown schema version is an
ArtifactError that names the file or the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from runtime.artifact.confinement import confined_path
from runtime.artifact.external_data import external_data_locations
from runtime.artifact.schema import check_manifest
from runtime.artifact.verified_files import HASHES, FileIdentity, file_kind, open_regular, read_bounded, sha256_file
from runtime.errors import ArtifactError

__all__ = ["FORMAT", "HASHES", "MANIFEST", "SCHEMA_VERSION", "Manifest", "checksummed", "graph_digest",
           "load_manifest", "sha256_file", "write_manifest"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "blip2-edge-artifacts"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; this bounds what a hostile one costs
_LISTED_HINT = f" (listed in {MANIFEST}); re-export the artifacts"  # the hint for a listed file that is unusable


def graph_digest(graph: Path) -> str:
    """Identity of a graph: its sha256, combined with its external data's when it has some (a
    graph proto alone does not change when only the weights in <graph>.onnx.data do). Goes
    through the hash cache, so files verified at load are not read again."""
    data = graph.with_name(graph.name + ".data")
    if not data.exists():
        return HASHES.digest(graph)
    with HASHES.saves_deferred():
        return hashlib.sha256(f"{HASHES.digest(graph)}:{HASHES.digest(data)}".encode()).hexdigest()


def artifact_digest(manifest_data: dict) -> str:
    """An artifact's identity for caches kept outside it: its manifest (every file's sha256 is in
    it), canonically."""
    return hashlib.sha256(json.dumps(manifest_data, sort_keys=True).encode()).hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict
    # real path -> identity of each file whose sha256 was checked in this process
    _checked: dict = field(default_factory=dict, repr=False, compare=False)
    _verified: bool = field(default=False, repr=False, compare=False)

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def where(self) -> Path:
        return Path(self.root) / MANIFEST

    def path(self, relative: str, field: str = "path") -> Path:
        """The real path of a file the manifest names in `field`; an ArtifactError naming the
        field and the path when it is absolute, has '..' or resolves outside the directory."""
        return confined_path(self.root, relative, field, self.where)

    def input_dtype(self, stage: str) -> np.dtype:
        """The dtype of a stage's first input (pixel values, input embeddings): the float the
        runtime feeds that stage."""
        return np.dtype(self.stages[stage]["inputs"][0]["dtype"])

    def stage_file(self, stage: str) -> Path:
        try:
            relative = self.stages[stage]["file"]
        except KeyError:
            raise ArtifactError(f"{self.where}: no stage '{stage}' (has: {', '.join(self.stages)})") from None
        return self.path(relative, f"stages.{stage}.file")

    def _listed(self) -> dict[Path, str]:
        """Real path -> recorded sha256 of every file in files{}."""
        return {self.path(rel, f"files[{rel!r}]"): digest for rel, digest in self.data["files"].items()}

    def _check(self, real: Path, expected: str, fd: int | None = None) -> None:
        """Hashes `real` (or the descriptor already open on it) and records its identity."""
        own = fd is None
        if own:
            fd = open_regular(real, _LISTED_HINT)
        try:
            digest, identity = HASHES.digest_fd(fd)
        finally:
            if own:
                os.close(fd)
        if digest != expected:
            raise ArtifactError(f"{real}: sha256 mismatch with {MANIFEST}; the file is corrupted or was modified")
        self._checked[real] = identity

    def _not_listed(self, field: str, value: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {field} = {value!r} is loaded but not listed in files, "
                             "so it cannot be verified; re-export the artifacts")

    def verify(self, hashes: bool = True) -> None:
        """Validates the manifest, checks that every file the runtime loads is listed in files{}
        (the graphs' own external data included) and, with `hashes`, that every listed file
        exists and has its recorded sha256. Without `hashes` the files are still checked to be
        regular files inside the directory; their digests are checked when they are loaded."""
        loaded = check_manifest(self.data, self.where)
        listed = self._listed()
        for name, relative in loaded:
            if self.path(relative, name) not in listed:
                raise self._not_listed(name, relative)
        with HASHES.saves_deferred():  # new digests written to the hash cache once, at the end
            for real, expected in listed.items():
                if hashes:
                    self._check(real, expected)
                else:
                    os.close(open_regular(real, _LISTED_HINT))
        for stage in self.stages:
            self._check_external_data(stage, listed)
        self._verified = self._verified or hashes

    def _check_external_data(self, stage: str, listed: dict[Path, str]) -> None:
        """The external-data files a graph names inside its protobuf are loaded by ONNX Runtime
        relative to the graph: each must stay inside the directory and be listed."""
        graph = self.stage_file(stage)
        fd = open_regular(graph)
        try:
            locations = external_data_locations(fd, graph)
        finally:
            os.close(fd)
        name = f"stages.{stage}.file ({graph.name}: external data)"
        for location in locations:
            real = confined_path(graph.parent, location, name, self.where)
            if real not in listed:
                raise self._not_listed(name, location)

    def ensure_verified(self) -> None:
        """verify(), or when this manifest was verified already (load_manifest does it),
        recheck() the files that changed since."""
        if self._verified:
            self.recheck()
        else:
            self.verify()

    def open_verified(self, relative: str, field: str) -> BinaryIO:
        """Opens a listed file for reading and returns the handle whose content was verified:
        the file is hashed again from this handle unless it is still the very file (same
        identity) verified before. Load from the handle, not from the path."""
        real = self.path(relative, field)
        expected = self._listed().get(real)
        if expected is None:
            raise self._not_listed(field, relative)
        fd = open_regular(real, _LISTED_HINT)
        try:
            if self._checked.get(real) != FileIdentity.of(os.fstat(fd)):
                self._check(real, expected, fd)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def recheck(self) -> None:
        """After loading by path (ONNX Runtime opens graphs itself): any checked file whose
        identity changed since it was hashed is hashed again and must still match, so a file
        swapped or rewritten while it was being loaded is refused."""
        listed = self._listed()
        with HASHES.saves_deferred():
            for real, identity in list(self._checked.items()):
                try:
                    now = FileIdentity.of(os.stat(real))
                except OSError:
                    now = None
                if now != identity:
                    self._check(real, listed[real])


def _read_manifest(mpath: Path) -> dict:
    raw = read_bounded(mpath, MAX_MANIFEST_BYTES,
                       f"; is {mpath.parent} an artifact directory written by 'blip2-edge export'?")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath}: larger than {MAX_MANIFEST_BYTES >> 20} MB; not a blip2-edge manifest")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ArtifactError(f"{mpath}: not valid JSON (nested too deeply)") from None


def load_manifest(root: str | os.PathLike, verify: bool = True) -> Manifest:
    """Reads and validates manifest.json; with `verify`, checks every listed file's sha256
    (without, the pipeline still checks each file it loads)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        what = file_kind(os.stat(root).st_mode) if os.path.exists(root) else "does not exist"
        raise ArtifactError(f"{root}: not an artifact directory ({what})")
    data = _read_manifest(mpath)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a blip2-edge manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ArtifactError(
            f"{mpath}: schema version {version!r} is not supported by this runtime (supports {SCHEMA_VERSION}); "
            "re-export the artifacts or upgrade blip2-edge"
        )
    manifest = Manifest(root, data)
    manifest.verify(hashes=verify)
    return manifest


def checksummed(root: Path, data: dict) -> dict:
    """`data` with its `files` list replaced by {path: sha256} of those files under `root`."""
    data = dict(data)
    # Through the hash cache: the load that follows (validation, the fidelity report) reads
    # these digests instead of hashing every file again.
    with HASHES.saves_deferred():
        data["files"] = {rel: HASHES.digest(confined_path(root, rel, f"files[{rel!r}]", root / MANIFEST))
                         for rel in sorted(data["files"])}
    return data


def write_manifest(root: Path, data: dict) -> None:
    """Writes manifest.json (the exporter's side of the contract), filling in the checksums when
    `files` is still a list. Writers call it last: a directory without it is not loadable."""
    if not isinstance(data["files"], dict):
        data = checksummed(root, data)
    (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
