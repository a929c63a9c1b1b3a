"""Watching a video: sampled frames through a captioning pipeline (captions, answers) or a
retriever (ITC scores and text-defined alerts), as a generator of WatchEvents.

The generator drives everything: a file is decoded as it is iterated, a live source's decoder
thread runs until the generator is closed (or garbage-collected) and is stopped then. Nothing
queues: a live source hands over its newest frame when the model is ready for one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from runtime.errors import OptionError
from runtime.video.alerts import AlertChange, AlertRule, AlertTracker
from runtime.video.frames import Frame
from runtime.video.sampling import Sampler, SamplingOptions
from runtime.video.sources import SourceOptions, open_source


@dataclass
class WatchEvent:
    """One line of a watch: `kind` is "caption" or "answer" (text for one prompt about a frame),
    "score" (ITC scores of a frame, per query), "alert" (an alert started: `start`) or "clear" (it
    ended: `start`, `end`), or "end" (the source ended: `reason`, and the counts).

    timestamp: seconds into the video (a live source: since its first frame); frame: the frame's
    index in decoding order; latency: seconds the model took for this frame (every prompt);
    lag: a live frame's age when its event was made (capture -> answer); dropped: frames a live
    source decoded and replaced since the previous described frame (never queued)."""

    kind: str
    timestamp: float
    frame: int
    text: str | None = None
    question: str | None = None
    scores: dict | None = None
    query: str | None = None
    start: float | None = None
    end: float | None = None
    peak: float | None = None
    itm: float | None = None
    latency: float | None = None
    lag: float | None = None
    dropped: int | None = None
    counts: dict = field(default_factory=dict)
    reason: str | None = None

    def to_json(self) -> dict:
        out = {"event": self.kind}
        for name, value in self.__dict__.items():
            if name == "kind" or value is None or (name == "counts" and not value):
                continue
            if isinstance(value, float):
                value = round(value, 4)
            elif isinstance(value, dict):
                value = {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()}
            out[name] = value
        if self.counts:
            out.update(out.pop("counts"))
        return out


class _Tally:
    def __init__(self):
        self.decoded = self.described = self.dropped = 0
        self.last_timestamp = 0.0


def sampled_frames(source, sampler: Sampler, tally: _Tally,
                   on_frame: Callable[[float], None] | None = None) -> Iterator[tuple[Frame, int]]:
    """(frame, frames not described since the previous one kept) for every frame the sampler
    keeps (for a file always 0: there every frame is measured)."""
    if not source.live:
        for frame in source.frames():
            tally.decoded, tally.last_timestamp = frame.index + 1, frame.timestamp
            if on_frame is not None:
                on_frame(frame.timestamp)
            if sampler.wants(frame.timestamp, frame.gray):
                yield frame, 0
        return
    last = described = -1
    while True:
        frame = source.latest(last)
        if frame is None:
            return
        wait = sampler.due_at() - frame.timestamp - (time.monotonic() - frame.captured)
        if not sampler.options.scene and wait > 0:  # not due yet: sleep until it is, then take the newest frame
            source.wait(wait)
            continue
        last = frame.index
        tally.decoded, tally.last_timestamp = source.received, frame.timestamp
        if sampler.wants(frame.timestamp, frame.gray):
            yield frame, frame.index - described - 1  # decoded since the last one described, never queued
            described = frame.index


def _end_event(source, sampler: Sampler, tally: _Tally) -> WatchEvent:
    reason = getattr(source, "end_reason", "") or "end of file"
    counts = {"decoded": tally.decoded, "described": tally.described, "duplicates": sampler.duplicates}
    if source.live:
        counts["dropped"] = tally.dropped
        counts["reconnections"] = source.reconnections
    return WatchEvent("end", _end_time(source, tally), max(tally.decoded - 1, 0), counts=counts, reason=reason)


def _end_time(source, tally: _Tally) -> float:
    """Where the watched part ends: a whole file's duration, else the last frame's time."""
    duration = getattr(source, "duration", None)
    if not source.live and duration and tally.last_timestamp <= duration:
        return float(duration)
    return tally.last_timestamp


def watch_pipeline(pipe, source, prompts: Sequence[str], *, questions: Sequence[str] | None = None,
                   every: float | None = 1.0, scene: bool = False, skip_duplicates: bool = True,
                   scene_threshold: float | None = None, source_options: SourceOptions | None = None,
                   on_frame: Callable[[float], None] | None = None, **generation) -> Iterator[WatchEvent]:
    """Captions (`questions` None) or answers for each sampled frame of `source` (a path, URL,
    device, or an opened FileSource/LiveSource), one event per prompt; the N prompts of a frame
    share one vision run (Blip2Pipeline.generate_for_image). Ends with an "end" event."""
    sampling = _sampling(every, scene, skip_duplicates, scene_threshold)
    pipe.options(**generation)  # a bad option fails before the source opens
    pipe.check_prompts(prompts)
    return _watch_pipeline(pipe, source, list(prompts), questions, sampling, source_options, on_frame, generation)


def _watch_pipeline(pipe, source, prompts, questions, sampling, source_options, on_frame, generation):
    src = open_source(source, source_options)
    sampler, tally = Sampler(sampling), _Tally()
    try:
        for frame, dropped in sampled_frames(src, sampler, tally, on_frame):
            t0 = time.perf_counter()
            results = pipe.generate_for_image(frame.image, prompts, **generation)
            latency = time.perf_counter() - t0
            lag = time.monotonic() - frame.captured if src.live else None
            tally.described += 1
            tally.dropped += dropped
            for i, r in enumerate(results):
                yield WatchEvent("answer" if questions else "caption", frame.timestamp, frame.index, text=r.text,
                                 question=questions[i] if questions else None, latency=latency, lag=lag,
                                 dropped=dropped if src.live else None)
        yield _end_event(src, sampler, tally)
    finally:
        src.close()


def watch_retriever(retriever, source, rules: Sequence[AlertRule], *, every: float | None = 1.0,
                    scene: bool = False, skip_duplicates: bool = False, scene_threshold: float | None = None,
                    source_options: SourceOptions | None = None,
                    on_frame: Callable[[float], None] | None = None) -> Iterator[WatchEvent]:
    """ITC scores of each sampled frame against the rules' texts ("score" events) and the alerts
    they raise and clear ("alert", "clear"); no LLM runs. Near-duplicates are scored by default
    (skip_duplicates=False): an alert's duration is measured on every sampled frame."""
    if not rules:
        raise OptionError("give at least one alert text")
    sampling = _sampling(every, scene, skip_duplicates, scene_threshold)
    text_embeds = retriever.embed_texts([r.query for r in rules])  # a bad text fails before the source opens
    return _watch_retriever(retriever, source, rules, text_embeds, sampling, source_options, on_frame)


def _watch_retriever(retriever, source, rules, text_embeds, sampling, source_options, on_frame):
    src = open_source(source, source_options)
    sampler, tally = Sampler(sampling), _Tally()
    trackers = [AlertTracker(r) for r in rules]
    try:
        for frame, dropped in sampled_frames(src, sampler, tally, on_frame):
            t0 = time.perf_counter()
            scores = np.asarray(retriever.itc_from_embeds(retriever.embed_images([frame.image]), text_embeds))[0]
            latency = time.perf_counter() - t0
            lag = time.monotonic() - frame.captured if src.live else None
            tally.described += 1
            tally.dropped += dropped
            yield WatchEvent("score", frame.timestamp, frame.index, scores={r.query: float(s) for r, s in zip(rules, scores)},
                             latency=latency, lag=lag, dropped=dropped if src.live else None)
            for tracker, score in zip(trackers, scores):
                score, itm = _confirmed(retriever, tracker, frame, float(score))
                change = tracker.update(frame.timestamp, score)
                if change is not None:
                    change.itm = itm if change.end is None else None
                    yield _alert_event(change, frame, latency, lag)
        for tracker in trackers:
            change = tracker.finish(_end_time(src, tally))
            if change is not None:
                yield _alert_event(change, None, None, None, _end_time(src, tally))
        yield _end_event(src, sampler, tally)
    finally:
        src.close()


def _confirmed(retriever, tracker: AlertTracker, frame: Frame, score: float) -> tuple[float, float | None]:
    """(score, ITM probability): with confirm_itm, a frame whose score would count as a match (over
    the threshold, or over the clearing level while the alert is on) counts only if the ITM head
    gives the pair at least that probability; unconfirmed, it counts as no match."""
    rule = tracker.rule
    level = rule.threshold - rule.hysteresis if tracker.active else rule.threshold
    if rule.confirm_itm is None or score < level:
        return score, None
    itm = float(np.asarray(retriever.itm([frame.image], [rule.query]))[0, 0])
    return (score if itm >= rule.confirm_itm else -math.inf), itm


def _alert_event(change: AlertChange, frame: Frame | None, latency, lag, timestamp: float = 0.0) -> WatchEvent:
    return WatchEvent("alert" if change.end is None else "clear", frame.timestamp if frame else timestamp,
                      frame.index if frame else -1, query=change.query, start=change.start, end=change.end,
                      peak=change.peak, itm=change.itm, latency=latency, lag=lag,
                      reason="end of video" if change.at_end_of_video else None)


def _sampling(every, scene, skip_duplicates, scene_threshold) -> SamplingOptions:
    kw = {} if scene_threshold is None else {"scene_threshold": scene_threshold}
    return SamplingOptions(every=every, scene=scene, skip_duplicates=skip_duplicates, **kw)
