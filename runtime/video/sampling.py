"""Which decoded frames reach the model: by time (`every` seconds), by scene change, and never a
near-duplicate of the last frame that did.

- by time: the first frame at or after each multiple of `every` seconds;
- by scene change (`scene=True`): a frame whose change (runtime.video.frames.change) from the last
  kept frame is over `scene_threshold`; with `every` too, also any frame `every` seconds after
  the last kept one (a slow drift is still looked at);
- near-duplicates: a frame due by time whose change from the last kept frame is at most
  `duplicate_threshold` is skipped (a still scene is described once, not every second).
Measuring is cheap (a 64-pixel grayscale copy): every decoded frame is measured, only the kept
ones are converted to RGB and described.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import OptionError
from runtime.video.frames import change

DEFAULT_SCENE_THRESHOLD = 0.03  # a cut or an object entering changes far more than 3% of the pixels
DEFAULT_DUPLICATE_THRESHOLD = 0.002


@dataclass
class SamplingOptions:
    every: float | None = 1.0  # seconds between frames sampled by time (None: only scene changes)
    scene: bool = False  # sample at scene changes
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD  # fraction of pixels changed that makes a scene change
    skip_duplicates: bool = True  # skip frames due by time that are near-duplicates of the last kept
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD

    def __post_init__(self):
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, (int, float))
                                       or not math.isfinite(self.every) or self.every <= 0):
            raise OptionError(f"every must be a positive number of seconds, got {self.every!r}")
        if self.every is None and not self.scene:
            raise OptionError("sample by time (every), by scene change (scene), or both")
        for name in ("scene_threshold", "duplicate_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise OptionError(f"{name} must be a fraction in [0, 1), got {value!r}")


class Sampler:
    """Decides, frame by frame, which frames are kept; counts the near-duplicates it skipped."""

    def __init__(self, options: SamplingOptions):
        self.options = options
        self.last_gray: np.ndarray | None = None
        self.last_time: float | None = None
        self.duplicates = 0

    def due_at(self) -> float:
        """The timestamp from which the next frame is due by time (-inf: the next one)."""
        every = self.options.every
        if self.last_time is None:
            return -math.inf
        if every is None:
            return math.inf
        if self.options.scene:
            return self.last_time + every
        return (math.floor(self.last_time / every + 1e-9) + 1) * every

    def wants(self, timestamp: float, gray: np.ndarray) -> bool:
        """Whether this frame is kept (and then remembered as the last kept one)."""
        o = self.options
        if self.last_gray is None:
            return self._keep(timestamp, gray)
        moved = change(gray, self.last_gray)
        if o.scene and moved > o.scene_threshold:
            return self._keep(timestamp, gray)
        if timestamp + 1e-9 < self.due_at():
            return False
        if o.skip_duplicates and moved <= o.duplicate_threshold:
            self.duplicates += 1
            self.last_time = timestamp  # the next one is due a period later, not at once
            return False
        return self._keep(timestamp, gray)

    def _keep(self, timestamp: float, gray: np.ndarray) -> bool:
        self.last_gray, self.last_time = gray, timestamp
        return True
