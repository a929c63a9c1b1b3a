"""A one-line progress bar on stderr (no dependency): calibration and the photo index use it."""

from __future__ import annotations

import sys


class Progress:
    """Redrawn in place on a terminal; into a log or a pipe, where carriage returns pile up on one
    line, only the finished line is written. `live=True` redraws whatever the stream is (a user who
    asked for the bar with a flag)."""

    def __init__(self, label: str, total: int, stream=None, live: bool | None = None):
        stream = sys.stderr if stream is None else stream
        self.label, self.total, self.done, self.stream = label, total, 0, stream
        self.live = bool(getattr(stream, "isatty", lambda: False)()) if live is None else live

    def advance(self, n: int) -> None:
        self.done += n
        if not self.live and self.done < self.total:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        self.stream.write(f"\r  {self.label:<22} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
