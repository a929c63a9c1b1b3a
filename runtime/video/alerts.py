"""Text-defined alerts: a per-frame score (ITC similarity of the frame to a text) turned into
"started" and "ended" events with a threshold, hysteresis and a minimum duration.

An alert starts when the score has been at or over `threshold` for `min_duration` seconds (its
start is the first frame over); it ends when the score has been under `threshold - hysteresis`
for `min_duration` seconds (its end is the first frame under), or when the video ends. A score
that wavers around the threshold neither fires twice nor flickers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.errors import OptionError


@dataclass(frozen=True)
class AlertRule:
    """`confirm_itm`: a frame that would count as a match counts only if the ITM head also gives
    the pair at least this probability (asked only about those frames, not about every one)."""

    query: str
    threshold: float
    hysteresis: float = 0.02
    min_duration: float = 0.0
    confirm_itm: float | None = None

    def __post_init__(self):
        if self.confirm_itm is not None and not (isinstance(self.confirm_itm, (int, float)) and 0 <= self.confirm_itm <= 1):
            raise OptionError(f"confirm_itm must be a probability in [0, 1], got {self.confirm_itm!r}")
        for name in ("threshold", "hysteresis", "min_duration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(f"{name} must be a number, got {value!r}")
        if self.hysteresis < 0 or self.min_duration < 0:
            raise OptionError("hysteresis and min_duration must be >= 0")


@dataclass
class AlertChange:
    """An alert that started (`end` None) or ended."""

    query: str
    start: float
    end: float | None
    peak: float
    at_end_of_video: bool = False
    itm: float | None = None  # the confirming ITM probability of the frame that started it


class AlertTracker:
    """The state of one rule over a sequence of (timestamp, score)."""

    def __init__(self, rule: AlertRule):
        self.rule = rule
        self.active = False
        self.over_since: float | None = None
        self.under_since: float | None = None
        self.start = 0.0
        self.peak = -math.inf

    def update(self, timestamp: float, score: float) -> AlertChange | None:
        r = self.rule
        if not self.active:
            if score < r.threshold:
                self.over_since, self.peak = None, -math.inf
                return None
            if self.over_since is None:
                self.over_since = timestamp
            self.peak = max(self.peak, score)
            if timestamp - self.over_since + 1e-9 >= r.min_duration:
                self.active, self.start, self.under_since = True, self.over_since, None
                return AlertChange(r.query, self.start, None, self.peak)
            return None
        if score >= r.threshold - r.hysteresis:
            self.under_since = None
            self.peak = max(self.peak, score)
            return None
        if self.under_since is None:
            self.under_since = timestamp
        if timestamp - self.under_since + 1e-9 >= r.min_duration:
            return self._end(self.under_since, False)
        return None

    def finish(self, timestamp: float) -> AlertChange | None:
        """At the end of the video: an active alert ends (at its first frame under, if any)."""
        if not self.active:
            return None
        return self._end(self.under_since if self.under_since is not None else timestamp, True)

    def _end(self, end: float, at_end: bool) -> AlertChange:
        change = AlertChange(self.rule.query, self.start, end, self.peak, at_end)
        self.active, self.over_since, self.under_since, self.peak = False, None, None, -math.inf
        return change
