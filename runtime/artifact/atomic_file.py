"""Writing one small file whole or not at all: the data goes to a fresh temporary file beside
it (mkstemp: never through a link or into a FIFO standing at a fixed name), which then takes the
name. A reader never sees half a file. Used by the hash cache, the TensorRT engine files, the
calibration-range cache and the fidelity report kept beside a refused output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_temp(directory: str | os.PathLike, prefix: str, data: bytes, mode: int = 0o644) -> Path:
    """A new temporary file in `directory` holding `data`, with `mode` (mkstemp's own 0600 would
    hide the file from the rest of a team); the caller gives it its name."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def replace_file(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Writes `path` whole or not at all; only the name is replaced, a link's target never written."""
    path = Path(path)
    tmp = write_temp(path.parent, f".{path.name}.", data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
