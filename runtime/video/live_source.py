"""A live source (camera, RTSP/UDP/HTTP stream): a decoder thread that keeps only the latest frame.

The thread decodes as fast as the stream sends and replaces the one frame it holds; the consumer
(watch) takes whatever is newest when it is ready for more. A slow model therefore never builds
a queue: frames it had no time for are dropped (the gaps in Frame.index count them) and the lag
from capture to answer stays about one model run.

A stream that sends nothing for `stall_timeout` seconds is reopened, after a back-off that doubles
from `backoff` up to `max_backoff` seconds, at most `reconnects` times in a row (None: for ever);
then the source ends. If no frame ever came, the end is a VideoError ("no frame within N s").
`close()` stops the thread (within about one read timeout) and releases the stream.
"""

from __future__ import annotations

import threading
import time

from runtime.errors import VideoError
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from runtime.video.frames import Frame, thumbnail_size
from runtime.video.library import import_av
from runtime.video.opening import DEFAULT_OPEN_TIMEOUT, check_resolution, ffmpeg_reason, open_video

DEFAULT_STALL_TIMEOUT = 5.0


class LiveSource:
    """The newest frame of a stream, decoded in a thread of its own."""

    live = True

    def __init__(self, spec: str, *, open_timeout: float = DEFAULT_OPEN_TIMEOUT,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, reconnects: int | None = 5, backoff: float = 0.5,
                 max_backoff: float = 8.0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        import_av()  # a missing extra is reported here, in the caller's thread
        self.spec = str(spec)
        self.open_timeout, self.stall_timeout = open_timeout, stall_timeout
        self.reconnects, self.backoff, self.max_backoff = reconnects, backoff, max_backoff
        self.max_pixels = max_pixels
        self.duration = None
        self.received = 0  # frames decoded
        self.reconnections = 0
        self._latest: Frame | None = None
        self._first: float | None = None
        self._ended = False
        self._error: VideoError | None = None
        self._end_reason = ""
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"decode {self.spec}", daemon=True)
        self._thread.start()

    # ---- consumer side ------------------------------------------------------------------------------

    def latest(self, after: int = -1) -> Frame | None:
        """The newest frame with an index over `after`, waiting for one; None once the stream has
        ended (or the source is closed). A stream that never sent a frame raises its VideoError."""
        with self._cond:
            while not (self._latest is not None and self._latest.index > after) and not self._ended:
                self._cond.wait(0.5)
            frame = self._latest
            if frame is not None and frame.index > after:
                return frame
            if self._error is not None and self.received == 0:
                raise self._error
            return None

    def wait(self, seconds: float) -> None:
        """Sleeps up to `seconds`, waking early when the source ends."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended, timeout=max(0.0, seconds))

    @property
    def end_reason(self) -> str:
        return self._end_reason

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=max(self.open_timeout, self.stall_timeout) + 2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the decoder thread -------------------------------------------------------------------------

    def _run(self) -> None:
        tries, delay = 0, self.backoff  # reopenings since the last frame, the next back-off
        try:
            while not self._stop.is_set():
                if self._read_once():
                    tries, delay = 0, self.backoff
                if self._stop.is_set() or (self.reconnects is not None and tries >= self.reconnects):
                    break
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.max_backoff)
                tries += 1
                self.reconnections += 1
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _read_once(self) -> bool:
        """Opens the stream and decodes until it stalls, ends or the source is closed; whether any
        frame came. The failure is kept as the source's error and end reason."""
        av = import_av()
        got = False
        try:
            container, stream = open_video(self.spec, live=True, open_timeout=self.open_timeout,
                                           read_timeout=self.stall_timeout, max_pixels=self.max_pixels)
        except VideoError as exc:
            self._fail(exc)
            return False
        try:
            size = None
            for decoded in container.decode(stream):
                if self._stop.is_set():
                    return got
                now = time.monotonic()
                if size is None:
                    check_resolution(self.spec, decoded.width, decoded.height, self.max_pixels)
                    size = thumbnail_size(decoded.width, decoded.height)
                gray = decoded.reformat(width=size[0], height=size[1], format="gray").to_ndarray()
                if self._first is None:
                    self._first = now
                frame = Frame(decoded, gray, now - self._first, self.received, now)
                with self._cond:
                    self._latest = frame
                    self.received += 1
                    self._cond.notify_all()
                got = True
            self._fail(VideoError(f"{self.spec}: the stream ended"))
        except VideoError as exc:
            self._fail(exc)
        except av.error.FFmpegError as exc:
            reason = ffmpeg_reason(exc)
            if reason == "timed out":
                reason = ("the stream stopped sending" if got else
                          f"no frame within {self.open_timeout + self.stall_timeout:g} s")
            self._fail(VideoError(f"{self.spec}: {reason}"))
        finally:
            container.close()
        return got

    def _fail(self, exc: VideoError) -> None:
        """The connection failed or ended: the frame held from it is stale now (a consumer must
        not describe a picture from before the outage as the present), so it is dropped."""
        with self._cond:
            self._error = exc
            self._end_reason = str(exc)
            self._latest = None
