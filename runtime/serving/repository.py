"""Triton model repositories for blip2-edge artifact directories.

    OUT/
      blip2/                       one model per artifact directory
        config.pbtxt               Python backend, dynamic batching, instance group, parameters
        1/model.py                 delegates to runtime.serving.triton_model (runs inside Triton)
        artifacts/                 (triton-repo) the manifest and the files it lists, verified

`serve` writes one into a private temporary directory with `artifacts` pointing at the given
directories (nothing copied); `triton-repo` writes a self-contained one, atomically, for
`tritonserver --model-repository OUT` on other machines.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from runtime.artifact.manifest import MANIFEST, Manifest, load_manifest
from runtime.errors import ArtifactError, OptionError
from runtime.serving.model_config import BatchingSettings, python_model_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a safe directory name and URL path segment
ARTIFACTS = "artifacts"


def model_names(dirs: Sequence[os.PathLike], names: Sequence[str] | None = None) -> list[str]:
    """`blip2` for one directory, else each directory's name; `names` (--name) overrides."""
    if names:
        if len(names) != len(dirs):
            raise OptionError(f"--name given {len(names)} times for {len(dirs)} artifact directories")
        chosen = list(names)
    elif len(dirs) == 1:
        chosen = ["blip2"]
    else:
        chosen = [Path(os.path.abspath(d)).name for d in dirs]
    for n in chosen:
        if not NAME.match(n):
            raise OptionError(f"model name {n!r}: use letters, digits, '_', '-' and '.', up to 64 characters "
                              "(pass --name)")
    if len(set(chosen)) != len(chosen):
        raise OptionError(f"two models would be named alike ({', '.join(chosen)}); pass --name for each directory")
    return chosen


def load_checked(dirs: Sequence[os.PathLike]) -> list[Manifest]:
    """Each directory's manifest, validated and every file hashed, before any server starts."""
    from runtime.families import family_for

    manifests = []
    for d in dirs:
        m = load_manifest(Path(d), verify=True)
        if family_for(m.data).task != "generation":
            raise ArtifactError(f"{d}: a {m.data['architecture']} artifact; serving runs captioning and question "
                                "answering models only (retrieval has no Triton model yet)")
        m.ensure_verified()
        manifests.append(m)
    return manifests


def model_file_source() -> str:
    """The model.py written into each model's version directory: it only finds the runtime
    (the `code_root` parameter, set by `serve`, puts the serving process's copy first on the
    path; a fleet repository uses the blip2-edge installed in Triton's Python) and delegates."""
    return '''"""blip2-edge on Triton's Python backend; the work is in runtime.serving.triton_model."""
import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters") or {}
        root = (params.get("code_root") or {}).get("string_value")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from runtime.serving.triton_model import model_for

        self.model = model_for(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
'''


def code_root() -> str:
    """The directory holding this `runtime` package (for `serve`'s code_root parameter)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows it (artifacts are large), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dst)


def copy_artifacts(manifest: Manifest, dst: Path) -> None:
    """The manifest and exactly the files it lists (confined paths; nothing else of the
    directory, links included, is followed). The runtime verifies them again when it loads."""
    dst.mkdir(parents=True)
    link_or_copy(manifest.where, dst / MANIFEST)
    for relative in manifest.data["files"]:
        link_or_copy(manifest.path(relative, f"files[{relative!r}]"), dst / relative)


def write_model(out: Path, name: str, batching: BatchingSettings, params: dict[str, str], stream: bool = False) -> Path:
    """One Python-backend model; `stream`: its decoupled streaming twin (runtime.serving.streaming)."""
    model = out / name
    (model / "1").mkdir(parents=True)
    if stream:
        params = {**params, "role": "stream"}
    (model / "config.pbtxt").write_text(python_model_config(name, batching, params, stream=stream))
    (model / "1" / "model.py").write_text(model_file_source())
    return model


def serving_params(artifacts: str, device: str, max_image_pixels: int | None, intra_op_threads: int,
                   root: str | None, backend: str | None = None, precision: str = "f32") -> dict[str, str]:
    """The config's parameters that pipeline_model.load_pipeline reads; `root`: a directory put
    first on the model's Python path (a blip2-edge checkout), None for the installed package;
    `backend` and `precision`: the pipeline's, as caption takes them (None: ONNX Runtime, what a
    repository written before they were recorded runs)."""
    params = {"artifacts": artifacts, "device": device, "intra_op_threads": str(intra_op_threads)}
    if backend is not None:
        params.update(backend=backend, precision=precision)
    if max_image_pixels:
        params["max_image_pixels"] = str(max_image_pixels)
    if root:
        params["code_root"] = str(root)
    return params


def write_serving_repo(out: Path, manifests: Sequence[Manifest], names: Sequence[str], batching: BatchingSettings,
                       device: str = "cpu", max_image_pixels: int | None = None, intra_op_threads: int = 0,
                       stream: bool = False, backend: str | None = None, precision: str = "f32") -> None:
    """serve's private repository: models point at the artifact directories in place, and at
    this process's copy of the runtime (the stub then runs the same code as the command).
    `stream`: a `<name>_stream` decoupled model beside each."""
    for m, name in zip(manifests, names):
        params = serving_params(str(Path(m.root).resolve()), device, max_image_pixels, intra_op_threads, code_root(),
                                backend, precision)
        write_model(out, name, batching, params)
        if stream:
            write_model(out, f"{name}_stream", batching, params, stream=True)


def write_fleet_repo(tmp: Path, manifests: Sequence[Manifest], names: Sequence[str], batching: BatchingSettings,
                     device: str = "cpu", max_image_pixels: int | None = None, intra_op_threads: int = 0,
                     root: str | None = None, stream: bool = False, backend: str | None = None,
                     precision: str = "f32") -> None:
    """triton-repo's self-contained repository (written into the atomic temporary `tmp`): the
    artifacts beside each model; Triton's Python must have blip2-edge installed (or `root`).
    `stream`: a `<name>_stream` decoupled model beside each, reading the same artifacts."""
    for m, name in zip(manifests, names):
        params = serving_params(ARTIFACTS, device, max_image_pixels, intra_op_threads, root, backend, precision)
        model = write_model(tmp, name, batching, params)
        copy_artifacts(m, model / ARTIFACTS)
        if stream:
            write_model(tmp, f"{name}_stream", batching, {**params, "artifacts": f"../{name}/{ARTIFACTS}"}, stream=True)
