"""One entry for every kind of source: a file path, a stream URL or a camera device."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from runtime.video.file_source import FileSource
from runtime.video.live_source import DEFAULT_STALL_TIMEOUT, LiveSource
from runtime.video.opening import DEFAULT_OPEN_TIMEOUT, is_live


@dataclass
class SourceOptions:
    open_timeout: float = DEFAULT_OPEN_TIMEOUT  # seconds for a stream to open and send its first data
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds without data before a live stream is reopened
    reconnects: int | None = 5  # reopenings in a row before a live source gives up (None: never)
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def open_source(source, options: SourceOptions | None = None):
    """A FileSource or LiveSource for a path, URL or device; an opened source is returned as it is."""
    if hasattr(source, "live"):
        return source
    o = options or SourceOptions()
    spec = str(source)
    if is_live(spec):
        return LiveSource(spec, open_timeout=o.open_timeout, stall_timeout=o.stall_timeout, reconnects=o.reconnects,
                          max_pixels=o.max_pixels)
    return FileSource(spec, max_pixels=o.max_pixels, open_timeout=o.open_timeout)
