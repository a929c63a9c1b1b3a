"""Output files named on the command line, checked before any work: a report, cache or trace a
command could not write at its end would otherwise lose everything the run computed."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import Blip2EdgeError


def check_output_file(flag: str, path: Path) -> None:
    """A file `flag` will write: its directory exists and is writable, and it is a regular file
    or not there yet (a directory or a FIFO, which would block, is refused)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise Blip2EdgeError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Blip2EdgeError(f"{flag} {path}: directory {parent} is not writable")
    if os.path.lexists(path) and not path.is_file():  # a directory, or a FIFO that would block
        raise Blip2EdgeError(f"{flag} {path}: exists and is not a regular file")
