"""Opening a video file, stream URL or camera with PyAV, every failure as one VideoError line.

A file is checked before FFmpeg sees it (missing, a folder, a FIFO or device that would block,
zero bytes); FFmpeg's own failures are named by kind (not a video or damaged, timed out, no
video stream, a codec this FFmpeg cannot decode); a resolution over the pixel limit is refused
from the stream's header before a frame is decoded.
"""

from __future__ import annotations

import os
import re
import stat

from runtime.artifact.verified_files import file_kind
from runtime.errors import VideoError
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from runtime.video.library import import_av

# URL schemes read as live streams (latest frame wins); anything else is a file path.
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "tcp", "srt", "http", "https")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mjpeg", ".mjpg", ".ts", ".mts", ".m2ts",
                  ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")
DEFAULT_OPEN_TIMEOUT = 10.0


def is_live(spec: str) -> bool:
    """A stream URL (rtsp://, udp://, http://...) or a v4l2 camera (/dev/video0)."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    return bool(scheme and scheme.group(1).lower() in LIVE_SCHEMES) or bool(re.match(r"^/dev/video\d+$", spec))


def check_file(path: str) -> None:
    """A VideoError unless `path` is a non-empty regular file (FFmpeg would block on a FIFO)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except OSError as exc:
        raise VideoError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(f"{path}: not a video file but {file_kind(st.st_mode)}")
    if st.st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes), not a video")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: cannot be read (permission denied)")


def ffmpeg_reason(exc: Exception) -> str:
    """What an FFmpeg error means for a user, without FFmpeg's errno and the repeated file name;
    "timed out" for a timeout (the caller knows which)."""
    av = import_av()
    if isinstance(exc, (av.error.ExitError, TimeoutError)) or "timed out" in str(exc).lower():
        return "timed out"
    if isinstance(exc, av.error.InvalidDataError):
        return "not a video, or a damaged or truncated one (FFmpeg: invalid data)"
    if isinstance(exc, av.error.DecoderNotFoundError):
        return "its codec cannot be decoded by this FFmpeg"
    text = getattr(exc, "strerror", None) or str(exc)
    return f"FFmpeg: {' '.join(str(text).split())}"


def open_video(spec: str, *, live: bool, open_timeout: float = DEFAULT_OPEN_TIMEOUT, read_timeout: float | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """(container, video stream) of a file, URL or camera; a VideoError naming `spec` otherwise."""
    av = import_av()
    if not live:
        check_file(spec)
    kwargs = {"timeout": (open_timeout, read_timeout if read_timeout is not None else open_timeout)}
    if re.match(r"^/dev/video\d+$", spec):
        kwargs["format"] = "v4l2"
    try:
        container = av.open(spec, **kwargs)
    except (av.error.FFmpegError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, av.error.FFmpegError) and not live:
            raise VideoError(f"{spec}: cannot be read ({exc.strerror or exc})") from None
        reason = ffmpeg_reason(exc)
        if reason == "timed out":
            reason = f"no frame within {open_timeout:g} s" if live else "timed out while opening"
        raise VideoError(f"{spec}: {reason}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{spec}: no video stream (audio or data only)")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"{spec}: its codec cannot be decoded by this FFmpeg")
        check_resolution(spec, stream.codec_context.width, stream.codec_context.height, max_pixels)
    except BaseException:
        container.close()
        raise
    stream.thread_type = "AUTO"  # frame and slice threads: decoding keeps up with 1080p on small CPUs
    return container, stream


def check_resolution(spec: str, width: int, height: int, max_pixels: int) -> None:
    """A VideoError for a frame size over the pixel limit (0 means not known yet: checked per frame)."""
    if width and height and width * height > max_pixels:
        raise VideoError(f"{spec}: resolution {width}x{height} is over the limit of {max_pixels} pixels "
                         "(--max-image-pixels)")
