"""Video: what `watch` and `index` cost on this machine, for a 1080p H.264 source.

    flock /tmp/heavy.lock python bench/video_bench.py --out bench/VIDEO_RESULTS.md
    python bench/video_bench.py --live-seconds 600        # the 10-minute memory run

Toy scenes (runtime/synthetic.py) rendered at 1920x1080 with sensor-like noise, H.264:
- decode: a 1080p file decoded front to back through FileSource (every frame decoded and measured
  on its 64-pixel grayscale copy), and the RGB conversion that only sampled frames pay;
- model: one frame through the toy captioning model (vision once, caption) and the toy retrieval
  model (ITC embedding), from the 1080p RGB frame (preprocessing included);
- watch on the file: --every 1s, duplicates kept (every second described), video seconds per wall
  second;
- watch live: the same scenes streamed as MPEG-TS over UDP on loopback at 30 frames/s by a thread
  of this process (its encoding shares the CPU), watched with every frame due: frames described
  per second, lag (capture -> caption), frames dropped, and the process's RSS sampled every few
  seconds over the run;
- index: the 1080p file indexed (scene changes + every 10 s) with the toy retrieval model:
  minutes of video per minute.
The captioning model is the toy; `--bench-model` adds the bench-sized model (ViT-B/16 +
OPT-125m, random weights) in FP32 and quantized (uint8 visual + INT4 LLM), built once under
bench/out/ as bench/peers.py builds them: per-frame caption cost, watch on the file, and a live
run of `--bench-live-seconds` each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, read_bandwidth  # noqa: E402
from runtime.index import IndexDb, update_index  # noqa: E402
from runtime.pipeline import Blip2Pipeline  # noqa: E402
from runtime.retriever import Blip2Retriever  # noqa: E402
from runtime.synthetic import make_scenes  # noqa: E402
from runtime.video import FileSource, LiveSource  # noqa: E402
from runtime.video.synthetic_video import Shot, stream_video, write_video  # noqa: E402

SIZE = (1920, 1080)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def toy_artifacts(work: Path) -> tuple[Path, Path]:
    from exporter.export import ExportOptions, export
    from exporter.toy import CHECKPOINT_DIR, CHECKPOINT_RETRIEVAL_DIR

    out = (work / "toy", work / "retrieval-toy")
    for source, target in zip((CHECKPOINT_DIR, CHECKPOINT_RETRIEVAL_DIR), out):
        export(str(source), target, ExportOptions(), log=lambda s: None)
    return out


def decode_cost(path: Path) -> dict:
    t0 = time.perf_counter()
    with FileSource(path) as src:
        frames = 0
        convert = []
        for frame in src.frames():
            frames += 1
            if frames % 30 == 0:
                t1 = time.perf_counter()
                frame.image  # noqa: B018 - the RGB conversion a sampled frame pays
                convert.append(time.perf_counter() - t1)
        duration = src.duration
    wall = time.perf_counter() - t0 - sum(convert)
    return {"frames": frames, "seconds": duration, "decode_ms": 1000 * wall / frames,
            "rgb_ms": 1000 * statistics.median(convert)}


def sampled_frames(path: Path, n: int) -> list:
    """One frame per second of the file (at 30 frames/s), the first `n`."""
    with FileSource(path) as src:
        return [f.image.copy() for f in src.frames() if f.index % 30 == 0][:n]


def median_ms(run, images) -> float:
    """Median wall time of `run(image)` over `images`, after one warm-up run."""
    run(images[0])
    times = []
    for im in images:
        t0 = time.perf_counter()
        run(im)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def caption_ms(pipe, images) -> float:
    prompt = [pipe.caption_prompt(None)]
    return median_ms(lambda im: pipe.generate_for_image(im, prompt), images)


def model_cost(pipe, retriever, path: Path, n: int = 10) -> dict:
    images = sampled_frames(path, n)
    return {"caption_ms": caption_ms(pipe, images), "itc_ms": median_ms(lambda im: retriever.embed_images([im]), images)}


def watch_file(pipe, path: Path) -> dict:
    t0 = time.perf_counter()
    events = [e for e in pipe.watch(path, every=1.0, skip_duplicates=False)]
    wall = time.perf_counter() - t0
    described = sum(e.kind == "caption" for e in events)
    return {"described": described, "wall": wall, "video_s": events[-1].timestamp,
            "speed": events[-1].timestamp / wall}


def watch_live(pipe, shots, seconds: float, fps: int, noise: float, port: int = 5650) -> dict:
    stop, late = threading.Event(), []
    url = f"udp://127.0.0.1:{port}"
    sender = threading.Thread(target=stream_video, args=(f"{url}?pkt_size=1316", shots),
                              kwargs=dict(fps=fps, size=SIZE, noise=noise, stop=stop, loop=True, late=late), daemon=True)
    source = LiveSource(f"{url}?overrun_nonfatal=1&fifo_size=1000000", open_timeout=10, stall_timeout=5, reconnects=0)
    sender.start()
    lags, rss, described, dropped = [], [(0.0, rss_mib())], 0, 0
    t0 = time.monotonic()
    next_rss = t0 + 5
    watch = pipe.watch(source, every=1 / fps, skip_duplicates=False)
    for e in watch:  # keeps numbers only: the run's memory is the watch's
        if e.kind != "caption":
            continue
        dropped += e.dropped if described else 0
        described += 1
        lags.append(e.lag)
        now = time.monotonic()
        if now >= next_rss:
            rss.append((now - t0, rss_mib()))
            next_rss = now + 5
        if now - t0 >= seconds:
            break
    watch.close()
    wall = time.monotonic() - t0
    stop.set()
    sender.join(timeout=10)
    decoded = source.received
    return {"wall": wall, "described": described, "fps": described / wall, "decoded": decoded,
            "decoded_fps": decoded / wall, "dropped": dropped, "lag_median": statistics.median(lags),
            "lag_p95": sorted(lags)[int(0.95 * (len(lags) - 1))], "lag_max": max(lags),
            "sender_late_max": max(late, default=0.0), "rss": rss}


def index_throughput(retriever, location: Path, path: Path, seconds: float, work: Path) -> dict:
    folder = work / "library"
    folder.mkdir()
    os.link(path, folder / path.name)
    db = IndexDb.open(work / "videos.db", create=True)
    t0 = time.perf_counter()
    report = update_index(db, retriever, folder, location)
    wall = time.perf_counter() - t0
    db.close()
    return {"wall": wall, "frames": report.video_frames, "minutes_per_minute": seconds / wall}


def live_lines(live: dict, fps: int) -> str:
    return "\n".join([
        f"| watch live 1080p{fps} over UDP, every frame due: captions/s | {live['fps']:.1f} "
        f"({live['described']} in {live['wall']:.0f} s) |",
        f"| live: frames decoded/s; dropped (never queued) | {live['decoded_fps']:.1f}; {live['dropped']} |",
        f"| live lag capture -> caption: median / p95 / max | {live['lag_median'] * 1000:.0f} / "
        f"{live['lag_p95'] * 1000:.0f} / {live['lag_max'] * 1000:.0f} ms |",
        f"| live: the sender's worst delay behind real time (it shares the CPU) | {live['sender_late_max'] * 1000:.0f} ms |"])


def memory_line(rss: list[tuple[float, float]]) -> str:
    after = [v for t, v in rss if t >= 60] or [rss[-1][1]]
    return ("RSS during the live run (s: MiB): " + ", ".join(f"{t:.0f}: {v:.0f}" for t, v in rss)
            + f"; after the first minute: min {min(after):.0f}, max {max(after):.0f}, last {rss[-1][1]:.0f} MiB")


def bench_model_rows(clip: Path, shots, args, decode: dict) -> list[str]:
    """The bench-sized model, FP32 and uint8 visual + INT4 LLM: caption cost per 1080p frame,
    watch on the file, and a live run."""
    from bench.common import OUT, ensure_fp32_artifacts, timed

    _, fp32 = ensure_fp32_artifacts("bench")
    quantized = OUT / "artifacts" / "bench-uint8-int4"
    if not (quantized / "manifest.json").is_file():
        timed([sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(quantized), "--synthetic", "64",
               "--activations", "uint8", "--llm", "int4", "--held-out", "16", "--no-gate", "--overwrite"])
    rows = []
    for label, art in (("bench FP32", fp32), ("bench uint8 + INT4", quantized)):
        pipe = Blip2Pipeline.from_artifacts(art)
        per_caption = caption_ms(pipe, sampled_frames(clip, 6))
        w = watch_file(pipe, clip)
        live = watch_live(pipe, shots, args.bench_live_seconds, args.fps, args.noise)
        rows += [f"| {label}: caption of one 1080p frame | {per_caption:.1f} ms "
                 f"(decode of a second of video / caption: {args.fps * decode['decode_ms'] / per_caption:.2f}) |",
                 f"| {label}: watch file, --every 1s, {w['described']} captions | {w['wall']:.1f} s wall, "
                 f"{w['speed']:.1f}x real time |",
                 f"| {label}: watch live 1080p{args.fps}, {args.bench_live_seconds:g} s: captions/s; lag median / p95 "
                 f"/ max | {live['fps']:.2f}; {live['lag_median'] * 1000:.0f} / {live['lag_p95'] * 1000:.0f} / "
                 f"{live['lag_max'] * 1000:.0f} ms |"]
        pipe.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the 1080p file (default 30 s)")
    ap.add_argument("--live-seconds", type=float, default=120.0, help="length of the live run (default 120 s)")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--noise", type=float, default=8.0,
                    help="sensor-like noise (std of 0-255 levels); near-still scenes at 2 compress to almost nothing")
    ap.add_argument("--live-only", action="store_true", help="only the live run (the long memory run)")
    ap.add_argument("--bench-model", action="store_true",
                    help="also the bench-sized model, FP32 and uint8 visual + INT4 LLM (built once under bench/out/)")
    ap.add_argument("--bench-live-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [f"machine: {machine()}; read bandwidth {read_bandwidth(0.5) / 1e9:.1f} GB/s"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toy, rtoy = toy_artifacts(work)
        scenes = [s for s, _ in make_scenes(6, seed=4)]
        shots = [Shot(s, args.seconds / len(scenes)) for s in scenes]
        pipe, retriever = Blip2Pipeline.from_artifacts(toy), Blip2Retriever.from_artifacts(rtoy)
        if args.live_only:
            live = watch_live(pipe, shots, args.live_seconds, args.fps, args.noise)
            print(live_lines(live, args.fps))
            print(memory_line(live["rss"]))
            return
        clip = work / "clip-1080p.mp4"
        t0 = time.perf_counter()
        write_video(clip, shots, fps=args.fps, size=SIZE, preset="veryfast", noise=args.noise)
        print(f"wrote {clip.name}: {args.seconds:g} s of 1080p{args.fps} H.264 ({clip.stat().st_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        d = decode_cost(clip)
        m = model_cost(pipe, retriever, clip)
        w = watch_file(pipe, clip)
        ix = index_throughput(retriever, rtoy, clip, args.seconds, work)
        live = watch_live(pipe, shots, args.live_seconds, args.fps, args.noise)
        bench_rows = bench_model_rows(clip, shots, args, d) if args.bench_model else []
    rows = [
        "| measurement | value |",
        "| --- | --- |",
        f"| decode 1080p H.264 (+ 64-px grayscale measure), per frame | {d['decode_ms']:.2f} ms "
        f"({1000 / d['decode_ms']:.0f} frames/s) |",
        f"| RGB conversion of a sampled 1080p frame | {d['rgb_ms']:.2f} ms |",
        f"| toy caption of one 1080p frame (preprocess + vision + caption) | {m['caption_ms']:.1f} ms |",
        f"| toy retrieval ITC embedding of one 1080p frame | {m['itc_ms']:.1f} ms |",
        f"| decode cost / caption cost, per described frame (all {args.fps} frames of a second decoded) | "
        f"{args.fps * d['decode_ms'] / m['caption_ms']:.2f} |",
        f"| watch file, --every 1s, duplicates kept: {w['described']} captions over {w['video_s']:.0f} s of video | "
        f"{w['wall']:.1f} s wall, {w['speed']:.1f}x real time |",
        live_lines(live, args.fps),
        f"| index {args.seconds:g} s of 1080p video (scene changes + every 10 s): frames, wall | {ix['frames']}, "
        f"{ix['wall']:.1f} s |",
        f"| index throughput | {ix['minutes_per_minute']:.1f} minutes of video per minute |",
        *bench_rows,
    ]
    mem = memory_line(live["rss"])
    text = "\n".join([*lines, "", *rows, "", mem]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"# Video bench (bench/video_bench.py)\n\n```\npython bench/video_bench.py "
                            f"--seconds {args.seconds:g} --live-seconds {args.live_seconds:g} --fps {args.fps} "
                            f"--noise {args.noise:g}\n```\n\n"
                            + text)


if __name__ == "__main__":
    main()
