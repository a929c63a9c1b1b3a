"""The rules under watch, on numbers: alert hysteresis and minimum duration, sampling by time and
by change, subtitle clocks, durations on the command line. (Videos and models: test_video_*.py.)"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from runtime.cli.durations import seconds
from runtime.errors import OptionError
from runtime.video.alerts import AlertRule, AlertTracker
from runtime.video.frames import change
from runtime.video.sampling import Sampler, SamplingOptions
from runtime.video.subtitles import cues, srt, webvtt
from runtime.video.watch import WatchEvent


def _run(rule: AlertRule, scores: list[float], step: float = 0.5) -> list[tuple]:
    tracker, out = AlertTracker(rule), []
    for i, s in enumerate(scores):
        c = tracker.update(i * step, s)
        if c is not None:
            out.append((c.start, c.end))
    c = tracker.finish(len(scores) * step)
    if c is not None:
        out.append((c.start, c.end, "at end"))
    return out


def test_a_score_wavering_around_the_threshold_neither_fires_twice_nor_flickers():
    wavering = [0.1, 0.41, 0.39, 0.42, 0.395, 0.41, 0.2, 0.1]
    assert _run(AlertRule("x", 0.4, hysteresis=0.02), wavering) == [(0.5, None), (0.5, 3.0)]
    assert _run(AlertRule("x", 0.4, hysteresis=0.0), wavering) == [(0.5, None), (0.5, 1.0), (1.5, None), (1.5, 2.0),
                                                                   (2.5, None), (2.5, 3.0)]


def test_min_duration_ignores_blips_and_dates_the_alert_from_its_first_frame():
    rule = AlertRule("x", 0.4, min_duration=1.0)
    assert _run(rule, [0.1, 0.5, 0.1, 0.5, 0.5, 0.1, 0.1]) == []  # 0.5 s over, twice: a blip each time
    # fires once over for 1 s (at 1.5 s, dated 0.5 s); a 0.5 s dip does not end it, 1 s under does
    assert _run(rule, [0.1, 0.5, 0.5, 0.5, 0.1, 0.5, 0.1, 0.1, 0.1]) == [(0.5, None), (0.5, 3.0)]
    assert _run(rule, [0.1, 0.5, 0.5, 0.5, 0.5]) == [(0.5, None), (0.5, 2.5, "at end")]


def test_alert_rules_refuse_nonsense():
    for bad in ({"threshold": float("nan")}, {"threshold": 0.3, "hysteresis": -1}, {"threshold": 0.3, "confirm_itm": 2}):
        with pytest.raises(OptionError):
            AlertRule("x", **bad)


def _gray(value: int) -> np.ndarray:
    return np.full((36, 64), value, np.uint8)


def test_time_sampling_takes_the_first_frame_of_each_period_and_skips_still_ones():
    s = Sampler(SamplingOptions(every=1.0, skip_duplicates=False))
    kept = [t for t in np.arange(0, 3.5, 0.25) if s.wants(float(t), _gray(int(t * 60)))]
    assert kept == [0.0, 1.0, 2.0, 3.0]
    s = Sampler(SamplingOptions(every=1.0))
    kept = [t for t in np.arange(0, 4, 0.25) if s.wants(float(t), _gray(0 if t < 2.5 else 200))]
    assert kept == [0.0, 3.0] and s.duplicates == 2


def test_scene_sampling_keeps_changes_and_with_every_a_slow_drift():
    s = Sampler(SamplingOptions(every=None, scene=True))
    frames = [_gray(10)] * 5 + [_gray(100)] * 5 + [_gray(105)] * 5
    assert [i for i, g in enumerate(frames) if s.wants(i * 0.1, g)] == [0, 5]
    s = Sampler(SamplingOptions(every=1.0, scene=True, skip_duplicates=False))
    drift = [_gray(10 + i) for i in range(30)]  # one level per frame: never a cut
    assert [i for i, g in enumerate(drift) if s.wants(i * 0.1, g)] == [0, 10, 20]


def test_change_counts_the_pixels_that_moved_more_than_noise():
    a = _gray(100)
    b = a.copy()
    b[:, :8] = 200  # an eighth of the frame
    assert change(a, b) == pytest.approx(1 / 8)
    assert change(a, a + 20) == 0.0  # under the level: noise, exposure flicker
    assert change(a, np.zeros((10, 10), np.uint8)) == 1.0


def test_sampling_options_refuse_nonsense():
    with pytest.raises(OptionError, match="every"):
        SamplingOptions(every=0)
    with pytest.raises(OptionError, match="sample by time"):
        SamplingOptions(every=None, scene=False)


def test_subtitles_share_a_cue_per_frame_and_run_to_the_next():
    events = [WatchEvent("answer", 0.0, 0, text="red", question="colour?"),
              WatchEvent("answer", 0.0, 0, text="left", question="where?"),
              WatchEvent("answer", 3725.5, 90, text="blue", question="colour?"),
              WatchEvent("end", 3730.0, 99)]
    rows = cues(events, 3730.0)
    assert rows == [(0.0, 3725.5, "colour? red\nwhere? left"), (3725.5, 3730.0, "colour? blue")]
    assert srt(rows).splitlines()[:3] == ["1", "00:00:00,000 --> 01:02:05,500", "colour? red"]
    assert webvtt(rows).splitlines()[:3] == ["WEBVTT", "", "00:00:00.000 --> 01:02:05.500"]


@pytest.mark.parametrize("text, value", [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1.5", 1.5), (" 3 s ", 3.0)])
def test_durations(text, value):
    assert seconds(text) == value


def test_a_duration_that_is_not_one_is_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        seconds("soon")
