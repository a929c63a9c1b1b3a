"""A video file read front to back: every frame is decoded and measured (a small grayscale copy),
none is converted to RGB unless the sampler keeps it. Errors are VideoError lines naming the file
and where in it decoding stopped."""

from __future__ import annotations

import time
from typing import Iterator

from runtime.errors import VideoError
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from runtime.video.frames import Frame, thumbnail_size
from runtime.video.library import import_av
from runtime.video.opening import DEFAULT_OPEN_TIMEOUT, check_resolution, ffmpeg_reason, open_video

# A file whose frames end this long before the duration its header declares is truncated.
TRUNCATION_SLACK = 1.0


class FileSource:
    """Frames of one video file, in order, with timestamps in seconds from its first frame."""

    live = False

    def __init__(self, path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, open_timeout: float = DEFAULT_OPEN_TIMEOUT):
        self.spec = str(path)
        self.max_pixels = max_pixels
        self.container, self.stream = open_video(self.spec, live=False, open_timeout=open_timeout,
                                                 max_pixels=max_pixels)
        s = self.stream
        tb = float(s.time_base) if s.time_base else 0.0
        self.start = float(s.start_time * tb) if s.start_time is not None else 0.0
        self.duration = float(s.duration * tb) if s.duration and tb else None
        if self.duration is None and self.container.duration:
            self.duration = self.container.duration / 1e6
        self.rate = float(s.average_rate) if s.average_rate else None
        # What the header declares: a duration, or a frame count (an AVI cut short keeps its
        # header's count while its duration is estimated from what is left).
        counted = s.frames / self.rate if s.frames and self.rate else 0.0
        self.declared = max(self.duration or 0.0, counted) or None
        self.width, self.height = s.codec_context.width, s.codec_context.height
        self.last_timestamp = 0.0

    def frames(self) -> Iterator[Frame]:
        av = import_av()
        index = -1
        size = thumbnail_size(self.width or 64, self.height or 64)
        try:
            for index, decoded in enumerate(self.container.decode(self.stream)):
                if (decoded.width, decoded.height) != (self.width, self.height):
                    check_resolution(self.spec, decoded.width, decoded.height, self.max_pixels)
                    self.width, self.height = decoded.width, decoded.height
                    size = thumbnail_size(self.width, self.height)
                if decoded.time is not None:
                    timestamp = decoded.time - self.start
                else:
                    timestamp = index / self.rate if self.rate else float(index)
                gray = decoded.reformat(width=size[0], height=size[1], format="gray").to_ndarray()
                self.last_timestamp = timestamp
                yield Frame(decoded, gray, timestamp, index, time.monotonic())
        except av.error.FFmpegError as exc:
            where = f"at {self.last_timestamp:.1f} s" if index >= 0 else "before its first frame"
            raise VideoError(f"{self.spec}: damaged or truncated {where} ({ffmpeg_reason(exc)})") from None
        if index < 0:
            raise VideoError(f"{self.spec}: no frame could be decoded (a damaged, truncated or empty video)")
        frame_time = 2.0 / self.rate if self.rate else 0.0
        if self.declared and self.last_timestamp + frame_time + TRUNCATION_SLACK < self.declared:
            raise VideoError(f"{self.spec}: truncated: its frames end at {self.last_timestamp:.1f} s of the "
                             f"{self.declared:.1f} s its header declares")

    def frame_at(self, timestamp: float) -> Frame:
        """The frame shown at `timestamp` seconds (the last one starting at or before it): a seek
        to the key frame before it, then decoding forward."""
        tb = float(self.stream.time_base)
        self.container.seek(int((timestamp + self.start) / tb), stream=self.stream, backward=True)
        best = None
        for frame in self.frames():
            if frame.timestamp > timestamp + 1e-3 and best is not None:
                break
            best = frame
            if frame.timestamp > timestamp + 1e-3:
                break
        if best is None:
            raise VideoError(f"{self.spec}: no frame at {timestamp:.2f} s")
        return best

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
