"""Writing an artifact directory atomically: into a temporary sibling, renamed into place only
when complete. Shared by the exporter and calibration (the writers of the contract)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runtime.errors import Blip2EdgeError

# Graphs whose weights exceed this keep them in one <graph>.onnx.data: protobuf cannot hold a
# message over 2 GiB, so stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


def check_target(out: Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise Blip2EdgeError(f"{out}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out` to write into. If the block succeeds it
    becomes `out` (an existing `out` is swapped out, then removed); if it fails, it is removed
    and `out` is left as it was."""
    out = Path(out)
    check_target(out, overwrite)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
