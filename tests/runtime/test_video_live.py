"""Live sources: the test streams toy scenes as MPEG-TS over UDP on loopback at real-time pace
(10 frames/s) from a thread; the real toy model, slowed down on purpose, watches it."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("av")

from runtime.cli.main import main  # noqa: E402
from runtime.errors import VideoError  # noqa: E402
from runtime.pipeline import Blip2Pipeline  # noqa: E402
from runtime.video import LiveSource, SourceOptions  # noqa: E402
from runtime.video.synthetic_video import stream_video  # noqa: E402
from tests.runtime.video_support import FPS, SHOTS  # noqa: E402

MODEL_SECONDS = 0.4  # each frame's vision run is slowed down to this: 4 frames arrive meanwhile


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sender:
    """Streams the toy scenes to a UDP port until stopped (or once through, with loop=False)."""

    def __init__(self, loop: bool = True, port: int | None = None, shots=SHOTS):
        self.port = port or _free_udp_port()
        self.shots = shots
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, args=(loop,), daemon=True)

    def _run(self, loop):
        self.sent = stream_video(f"udp://127.0.0.1:{self.port}?pkt_size=1316", self.shots, fps=FPS, stop=self.stop,
                                 loop=loop)

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}?overrun_nonfatal=1&fifo_size=100000"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def slow_pipe(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    runner = pipe.runners["vision"]
    real = runner.infer

    def slow(feeds):
        time.sleep(MODEL_SECONDS)
        return real(feeds)

    runner.infer = slow
    return pipe


def _decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("decode udp://")]


def test_a_slow_model_drops_frames_and_the_lag_stays_bounded(slow_pipe):
    with Sender() as sender:
        source = LiveSource(sender.url, open_timeout=5, stall_timeout=2, reconnects=0)
        sender.thread.start()
        watch = slow_pipe.watch(source, every=1 / FPS, skip_duplicates=False, max_new_tokens=2)
        events = []
        for event in watch:
            events.append(event)
            if len(events) == 12:
                break
        watch.close()  # stops the decoder thread
    assert all(e.kind == "caption" for e in events)
    lags = [e.lag for e in events]
    # Queued, frame k would wait for the k - 1 before it: lag growing by ~0.3 s per frame to >3 s.
    # Latest-frame-wins: about one model run (+ a frame interval), however long it runs.
    assert max(lags[2:]) < 4 * MODEL_SECONDS, lags
    assert lags[-1] < lags[2] + 2 * MODEL_SECONDS, lags
    frames = [e.frame for e in events]
    steps = [b - a for a, b in zip(frames, frames[1:])]
    assert min(steps) >= 2 and sum(steps) / len(steps) >= 3, frames  # dropped, not queued
    assert [e.dropped for e in events[1:]] == [s - 1 for s in steps]
    deadline = time.monotonic() + 10
    while _decoder_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _decoder_threads()


def test_a_stream_that_stops_ends_watch_with_a_reason(slow_pipe):
    with Sender(loop=False, shots=SHOTS[:2]) as sender:
        # The stall timeout is well above the hiccups of a sender that encodes on the same two
        # cores as the model and the test run (1 s once ended a CI run's stream half-way).
        options = SourceOptions(open_timeout=3, stall_timeout=3, reconnects=1)
        watch = slow_pipe.watch(sender.url, every=0.5, skip_duplicates=False, source_options=options,
                                max_new_tokens=2)
        sender.thread.start()
        events = list(watch)  # the 4 s stream, then a stall, one reopening that gets nothing, the end
    captions = [e for e in events if e.kind == "caption"]
    end = events[-1]
    assert len(captions) >= 4 and end.kind == "end", events
    assert end.counts["reconnections"] == 1 and end.counts["decoded"] >= 30
    assert "stopped sending" in end.reason or "no frame within" in end.reason, end.reason
    assert not _decoder_threads()


def test_a_stream_that_drops_is_reopened_and_watch_goes_on(slow_pipe):
    first = Sender(loop=False)
    source = LiveSource(first.url, open_timeout=10, stall_timeout=1, reconnects=3)
    watch = slow_pipe.watch(source, every=0.5, skip_duplicates=False, max_new_tokens=2)
    first.thread.start()
    events = []
    for event in watch:
        events.append(event)
        if len([e for e in events if e.kind == "caption"]) == 4:
            break
    first.stop.set()  # the camera goes away for about 3 s, then comes back on the same address
    first.thread.join(timeout=10)
    time.sleep(3)
    with Sender(port=first.port) as second:
        second.thread.start()
        for event in watch:
            events.append(event)
            if len([e for e in events if e.kind == "caption"]) == 8:
                break
        source_received = events[-1].frame
        watch.close()
    captions = [e for e in events if e.kind == "caption"]
    assert len(captions) == 8 and source_received > captions[3].frame
    later = captions[4:]
    assert all(e.timestamp > captions[3].timestamp + 2 for e in later)  # after the gap
    assert max(e.lag for e in later) < 4 * MODEL_SECONDS  # nothing stale was kept across the gap
    assert source.reconnections >= 1
    assert not _decoder_threads()


def test_a_stream_that_never_sends_is_one_line_and_the_next_source_goes_on(toy_artifacts, tmp_path, capsys):
    from runtime.video.synthetic_video import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, SHOTS[:1], fps=FPS)
    silent = f"udp://127.0.0.1:{_free_udp_port()}"
    status = main(["watch", str(toy_artifacts), silent, str(clip), "--timeout", "1s", "--stall-timeout", "1s",
                   "--reconnects", "0", "--json"])
    out = capsys.readouterr()
    assert status == 2
    assert out.err == f"error: {silent}: no frame within 1 s\n"
    assert '"event": "caption"' in out.out and str(clip) in out.out


def test_a_live_source_that_never_sends_raises_video_error():
    source = LiveSource(f"udp://127.0.0.1:{_free_udp_port()}", open_timeout=1, stall_timeout=1, reconnects=0)
    try:
        with pytest.raises(VideoError, match="no frame within 1 s"):
            source.latest()
    finally:
        source.close()
