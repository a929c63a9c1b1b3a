"""Videos of the synthetic scenes (runtime/synthetic.py) with known scene-change times: written to
a file (H.264 in MP4, MJPEG in AVI...) or sent as a live MPEG-TS stream at real-time pace. The
tests, the benchmark and the docs' examples make their own videos with these."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime import synthetic
from runtime.video.library import import_av

CODECS = {"h264": ("libx264", "yuv420p"), "mjpeg": ("mjpeg", "yuvj420p"), "mpeg2": ("mpeg2video", "yuv420p")}


@dataclass(frozen=True)
class Shot:
    """`seconds` of one scene (a still image with light noise per frame). `seed` draws its
    background and jitter (default: the shot's place in the video): two shots with one seed
    differ only in their squares."""

    scene: synthetic.Scene
    seconds: float
    seed: int | None = None


def scene_image(scene: synthetic.Scene, seed: int, size: tuple[int, int]) -> np.ndarray:
    """The scene rendered at size (w, h) as an RGB array (square scenes stretched to fit)."""
    image = synthetic.render(scene, np.random.default_rng(seed), image_size=max(size))
    return np.asarray(image.resize(size)) if image.size != size else np.asarray(image)


NOISE_PATTERNS = 5  # sensor-like noise, drawn once and cycled (drawing it per 1080p frame is slow)


def shot_frames(shots: Sequence[Shot], fps: int, size: tuple[int, int], noise: float = 2.0, seed: int = 0):
    """(shot index, frame RGB) for every frame of the shots, in order."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3)
    patterns = [rng.normal(0, noise, shape).astype(np.int16) for _ in range(NOISE_PATTERNS)] if noise else [0]
    n = 0
    for i, shot in enumerate(shots):
        still = scene_image(shot.scene, seed + i if shot.seed is None else shot.seed, size).astype(np.int16)
        for _ in range(int(round(shot.seconds * fps))):
            yield i, np.clip(still + patterns[n % len(patterns)], 0, 255).astype(np.uint8)
            n += 1


def change_times(shots: Sequence[Shot]) -> list[float]:
    """The start time of every shot after the first."""
    return [float(t) for t in np.cumsum([s.seconds for s in shots])[:-1]]


def write_video(path, shots: Sequence[Shot], *, fps: int = 10, size: tuple[int, int] = (256, 256),
                codec: str = "h264", noise: float = 2.0, seed: int = 0, gop: int | None = None,
                faststart: bool = False, preset: str | None = None) -> list[float]:
    """Writes the shots as a video file; returns the scene-change times (seconds). `faststart`:
    an MP4's index at the front (a file cut short then still opens, and ends early)."""
    av = import_av("writing a video")
    name, pix_fmt = CODECS[codec]
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else None) as out:
        stream = out.add_stream(name, rate=fps, options={"preset": preset} if preset and codec == "h264" else None)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec == "mjpeg":
            stream.codec_context.qmin = stream.codec_context.qmax = 2  # near-lossless
        for _, rgb in shot_frames(shots, fps, size, noise, seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return change_times(shots)


def stream_video(url: str, shots: Sequence[Shot], *, fps: int = 10, size: tuple[int, int] = (256, 256),
                 noise: float = 2.0, seed: int = 0, stop=None, loop: bool = False, late=None) -> int:
    """Sends the shots to `url` (e.g. udp://127.0.0.1:5600?pkt_size=1316) as MPEG-TS at real-time
    pace, H.264 with a key frame every second (a receiver can join at any time); until `stop` (a
    threading.Event) is set, once or in a loop. `late` (a list) collects how far behind real time
    each frame was sent, when the sender cannot keep up. Returns the frames sent."""
    av = import_av("streaming a video")
    sent = 0
    with av.open(url, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=fps, options={"tune": "zerolatency", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = fps
        start = time.monotonic()
        while True:
            for _, rgb in shot_frames(shots, fps, size, noise, seed):
                if stop is not None and stop.is_set():
                    return sent
                delay = start + sent / fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif late is not None:
                    late.append(-delay)  # the sender itself fell behind real time
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    out.mux(packet)
                sent += 1
            if not loop:
                break
        for packet in stream.encode():
            out.mux(packet)
    return sent
