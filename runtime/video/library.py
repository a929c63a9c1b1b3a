"""PyAV, the one video library of the runtime, imported only here and only when a video is read.

Why PyAV (docs/video.md): its wheels bundle FFmpeg, so one `pip install` reads files (MP4, MKV,
AVI, MJPEG...), RTSP, HTTP, UDP/MPEG-TS and v4l2 webcams on x86 and aarch64 alike, and it hands
frames over as numpy arrays with their timestamps. OpenCV's VideoCapture hides timestamps and
errors behind a bool, and its pip wheels lack GStreamer; on a Jetson whose hardware decoder is
reached through GStreamer, a GStreamer-enabled OpenCV would serve better there (not done here).

The base runtime never needs it: `import_av()` raises a MissingExtraError naming the `video`
extra when PyAV is not installed.
"""

from __future__ import annotations

from runtime.errors import require

VIDEO_EXTRA = "video"


def import_av(what: str = "reading video"):
    """The `av` module, or a MissingExtraError that names the extra to install."""
    av = require("av", VIDEO_EXTRA, what)
    # FFmpeg's own log lines (e.g. "moov atom not found") would repeat our one-line errors.
    av.logging.set_level(None)
    return av
