"""A decoded video frame with its times, and the cheap change measure that sampling uses.

The change between two frames is measured on small grayscale copies (THUMB_WIDTH pixels wide,
made by FFmpeg's scaler while the frame is still in the decoder's format): the fraction of
pixels whose brightness moved by more than CHANGE_LEVEL out of 255. Sensor noise and compression
artefacts average out at that size and stay under the level; a cut, or an object that enters
or moves, changes a share of the pixels at once. It costs microseconds per frame, so every
decoded frame can be measured while only the kept ones reach the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THUMB_WIDTH = 64
CHANGE_LEVEL = 24  # brightness levels (of 255) a pixel must move by to count as changed


@dataclass
class Frame:
    """One frame: `gray` the small grayscale copy sampling compares, `timestamp` seconds from the
    stream's first frame (a live source: on the monotonic clock from the first frame received),
    `index` the frame's number in decoding order (gaps are frames dropped or skipped), `captured`
    the time.monotonic() at which the decoder produced it (where a live frame's lag starts).
    `image` (H, W, 3) uint8 RGB is converted from the decoder's frame only when asked for: most
    frames are measured and dropped, never converted."""

    decoded: object  # an av.VideoFrame, or already an (H, W, 3) uint8 array
    gray: np.ndarray
    timestamp: float
    index: int
    captured: float

    @property
    def image(self) -> np.ndarray:
        if not isinstance(self.decoded, np.ndarray):
            self.decoded = self.decoded.to_ndarray(format="rgb24")
        return self.decoded


def change(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of pixels that differ by more than CHANGE_LEVEL between two grayscale thumbnails."""
    if a.shape != b.shape:
        return 1.0
    return float(np.count_nonzero(np.abs(a.astype(np.int16) - b.astype(np.int16)) > CHANGE_LEVEL)) / a.size


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) of the grayscale copy: THUMB_WIDTH wide, the frame's aspect, even and at least 2."""
    w = min(THUMB_WIDTH, width)
    h = max(2, int(round(height * w / max(width, 1))) // 2 * 2)
    return max(2, w // 2 * 2), h
