"""Paths named by an untrusted artifact directory stay inside it.

A manifest (or an engine manifest, or an ONNX graph's external-data entry) names files by
relative path. Every such path must be relative, free of `..`, and resolve, following
symlinks, inside the directory; anything else is an ArtifactError naming the field and the path.
The same check guards writers (quantize) that recreate those paths under their output.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from runtime.errors import ArtifactError

MAX_PATH_CHARS = 1024


def path_problem(relative) -> str | None:
    """What is wrong with `relative` as an artifact-relative path, judged on its text alone
    (None when nothing is): the part of the check that needs no file system."""
    if not isinstance(relative, str):
        return f"expected a relative path (a string), got {type(relative).__name__}"
    if not relative or len(relative) > MAX_PATH_CHARS:
        return f"expected a relative path of 1 to {MAX_PATH_CHARS} characters"
    if "\0" in relative:
        return "a path may not contain a NUL character"
    if os.path.isabs(relative) or PurePosixPath(relative).is_absolute():
        return "absolute paths are not allowed; paths must be relative to the artifact directory"
    if ".." in PurePosixPath(relative).parts:
        return "'..' is not allowed; paths must stay inside the artifact directory"
    return None


def confined_path(root: str | os.PathLike, relative, field: str, where: str | os.PathLike) -> Path:
    """The real path (symlinks resolved) of `relative` under `root`, or an ArtifactError that
    names `where` (the manifest), the `field` and the path when it would leave `root`."""
    problem = path_problem(relative)
    if problem:
        raise ArtifactError(f"{where}: {field} = {relative!r}: {problem}")
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(base / relative))
    if base not in real.parents:
        raise ArtifactError(f"{where}: {field} = {relative!r} resolves to {real}, outside {base}; "
                            "paths (and the symlinks they go through) must stay inside the artifact directory")
    return real
