"""`blip2-edge watch`: captions, answers or alerts for video files, streams and cameras.

    blip2-edge watch out/toy clip.mp4 --srt clip.srt
    blip2-edge watch out/toy rtsp://cam/stream -q "is the door open?" --every 2s --json
    blip2-edge watch out/retrieval cam.mp4 --alert "a person at the door" --threshold 0.35

Each event is one line, flushed as it comes (JSON with --json). A file that cannot be read is
one `error:` line and the next file goes on (exit 2 at the end); Ctrl-C or SIGTERM stops at once,
flushing what was found (subtitles of the part watched are written whole) and exits 130.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from runtime.cli.durations import seconds
from runtime.cli.generate import _integer, add_generation_options, generation_kwargs, text_argument
from runtime.cli.outputs import check_output_file
from runtime.cli.progress import Progress
from runtime.errors import Blip2EdgeError, OptionError
from runtime.video.opening import is_live

HELP = "caption, question or watch for alerts in video files, streams and cameras"


def register(sub) -> None:
    p = sub.add_parser("watch", help=HELP, description=HELP + ". With a captioning artifact: a caption (or the "
                       "answers to -q) per sampled frame; with a retrieval artifact: --alert texts scored per frame "
                       "(ITC, no LLM), an event when an alert starts and when it ends.")
    p.add_argument("artifacts", help="artifact directory: a captioning model, or a retrieval model for --alert")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="video files, stream URLs (rtsp://, udp://, http://...) or cameras (/dev/video0)")
    p.add_argument("-q", "--question", action="append", default=[], dest="questions",
                   help="a question to answer about each sampled frame (repeatable: one vision run per frame)")
    p.add_argument("--prompt", help="caption prefix, e.g. 'a photo of'")
    p.add_argument("--every", type=seconds, default=None,
                   help="time between sampled frames: 1s (default without --scene), 500ms, 2m")
    p.add_argument("--scene", action="store_true",
                   help="sample at scene changes (with --every too: also after that long without one)")
    p.add_argument("--scene-threshold", type=float, default=None, metavar="F",
                   help="fraction of pixels that must change for a scene change (default 0.03)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="describe frames that look the same as the last one described (skipped by default)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--srt", type=Path, metavar="FILE", help="write the captions as SRT subtitles (one file source)")
    p.add_argument("--vtt", type=Path, metavar="FILE", help="write the captions as WebVTT subtitles (one file source)")
    g = p.add_argument_group("alerts (a retrieval artifact)")
    g.add_argument("--alert", action="append", default=[], metavar="TEXT", help="a text to watch for (repeatable)")
    g.add_argument("--threshold", type=float, default=0.35, help="ITC score at which an alert starts (default 0.35)")
    g.add_argument("--hysteresis", type=float, default=0.02,
                   help="an alert ends under threshold - hysteresis (default 0.02)")
    g.add_argument("--min-duration", type=seconds, default=0.0, metavar="S",
                   help="seconds over (under) the threshold before an alert starts (ends); default 0")
    g.add_argument("--confirm-itm", type=float, default=None, metavar="P",
                   help="a frame over the threshold counts only if the ITM head also matches it with probability >= P")
    g.add_argument("--scores", action="store_true", help="also print every sampled frame's scores")
    s = p.add_argument_group("streams")
    s.add_argument("--timeout", type=seconds, default=10.0, metavar="S",
                   help="seconds for a stream to open and send a first frame (default 10s)")
    s.add_argument("--stall-timeout", type=seconds, default=5.0, metavar="S",
                   help="seconds without data before a live stream is reopened (default 5s)")
    s.add_argument("--reconnects", type=_integer, default=5, metavar="N",
                   help="reopenings in a row before a live stream is given up (default 5; -1: never give up)")
    p.add_argument("--progress", action="store_true", help="show the progress bar for files even when stderr is "
                                                           "not a terminal")
    p.add_argument("--max-image-pixels", type=_integer, metavar="N", default=None,
                   help="refuse videos whose frames are over N pixels (default: 8192x8192)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    add_generation_options(p)
    p.set_defaults(run=run)


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _on_sigterm(signum, frame):
    raise Stopped()


def run(args) -> int:
    from runtime.artifact.manifest import load_manifest
    from runtime.families import family_for
    from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
    from runtime.video.alerts import AlertRule
    from runtime.video.library import import_av
    from runtime.video.sources import SourceOptions

    max_pixels = check_max_pixels(
        DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels, "--max-image-pixels")
    for q in args.questions:
        text_argument(q, "--question")
    for a in args.alert:
        text_argument(a, "--alert")
    subtitles = [(kind, path) for kind, path in (("srt", args.srt), ("vtt", args.vtt)) if path is not None]
    for kind, path in subtitles:
        check_output_file(f"--{kind}", path)
    if subtitles and (len(args.sources) > 1 or is_live(args.sources[0])):
        raise OptionError("--srt and --vtt write the captions of one video file: give exactly one file")
    if args.every is not None and args.every <= 0:
        raise OptionError(f"--every must be a positive duration, got {args.every:g} s")
    for flag, value in (("--timeout", args.timeout), ("--stall-timeout", args.stall_timeout)):
        if value <= 0:
            raise OptionError(f"{flag} must be a positive duration, got {value:g} s")
    if args.reconnects < -1:
        raise OptionError(f"--reconnects must be >= 0 (or -1: never give up), got {args.reconnects}")
    import_av("blip2-edge watch")  # the missing extra is named before the model loads
    manifest = load_manifest(Path(args.artifacts))
    retrieval = family_for(manifest.data).task == "retrieval"
    if retrieval and not args.alert:
        raise OptionError(f"{args.artifacts} is a retrieval model: give the texts to watch for with --alert TEXT "
                          "(captions need a captioning model)")
    if not retrieval and args.alert:
        raise OptionError(f"--alert scores frames with a retrieval model; {args.artifacts} is a captioning model "
                          "(use -q QUESTION for answers)")
    if retrieval and subtitles:
        raise OptionError("--srt and --vtt write captions: they need a captioning model")
    sources = SourceOptions(open_timeout=args.timeout, stall_timeout=args.stall_timeout,
                            reconnects=None if args.reconnects == -1 else args.reconnects, max_pixels=max_pixels)
    every = args.every if args.every is not None else (None if args.scene else 1.0)
    if retrieval:
        from runtime.retriever import Blip2Retriever

        model = Blip2Retriever(manifest, device=args.device)
        rules = [AlertRule(a, args.threshold, args.hysteresis, args.min_duration, args.confirm_itm) for a in args.alert]

        def start(source, on_frame):
            from runtime.video.watch import watch_retriever

            return watch_retriever(model, source, rules, every=every, scene=args.scene,
                                   skip_duplicates=False,
                                   scene_threshold=args.scene_threshold, source_options=sources, on_frame=on_frame)
    else:
        from runtime.generation.options import GenerationOptionError
        from runtime.pipeline import Blip2Pipeline

        model = Blip2Pipeline(manifest, device=args.device)
        gen = generation_kwargs(args)
        try:
            model.options(**gen)  # a bad option fails before any source opens, named by its flag
        except GenerationOptionError as exc:
            raise exc.as_flag() from None

        def start(source, on_frame):
            return model.watch(source, every=every, questions=args.questions, prompt=args.prompt, scene=args.scene,
                               skip_duplicates=not args.keep_duplicates, scene_threshold=args.scene_threshold,
                               source_options=sources, on_frame=on_frame, **gen)

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    failed = 0
    try:
        for source in args.sources:
            failed += _watch_one(source, start, args, subtitles, sources)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 2 if failed else 0


def _watch_one(source: str, start, args, subtitles, options) -> int:
    """Watches one source, printing each event; 1 if it failed (its error line printed), else 0."""
    from runtime.video.sources import open_source

    try:
        opened = open_source(source, options)
    except Blip2EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    progress = None
    if not opened.live and opened.duration and (args.progress or sys.stderr.isatty()):
        progress = Progress(Path(source).name[:22], max(int(opened.duration), 1), live=True if args.progress else None)

    def on_frame(timestamp: float) -> None:
        if progress is not None and progress.done < min(int(timestamp), progress.total - 1):
            progress.advance(min(int(timestamp), progress.total - 1) - progress.done)

    events = []
    watch = start(opened, on_frame)
    try:
        for event in watch:
            if event.kind == "end" and progress is not None:
                progress.advance(progress.total - progress.done)
            events.append(event)
            _print_event(source, event, args)
    except Blip2EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        watch.close()  # stops a live source's decoder thread
        _write_subtitles(subtitles, events)  # the part watched, written whole
        raise
    finally:
        watch.close()
        opened.close()
    _write_subtitles(subtitles, events)
    return 0


def _write_subtitles(subtitles, events) -> None:
    from runtime.video.subtitles import cues, write_subtitles

    end = next((e.timestamp for e in reversed(events) if e.kind == "end"), None)
    end = end if end is not None else max((e.timestamp for e in events), default=0.0)
    for kind, path in subtitles:
        write_subtitles(path, cues(events, end), kind)


def _print_event(source: str, event, args) -> None:
    if event.kind == "score" and not args.scores:
        return
    if args.json:
        print(json.dumps({"source": source, **event.to_json()}), flush=True)
        return
    at = f"{event.timestamp:8.2f}s"
    lag = f"  (lag {event.lag:.2f}s)" if event.lag is not None else ""
    if event.kind in ("caption", "answer"):
        q = f"{event.question} " if event.question else ""
        print(f"{source} {at}  {q}{event.text}{lag}", flush=True)
    elif event.kind == "score":
        print(f"{source} {at}  " + "  ".join(f"{s:.3f} {q}" for q, s in event.scores.items()), flush=True)
    elif event.kind == "alert":
        print(f"{source} {at}  ALERT {event.query!r} from {event.start:.2f}s (score {event.peak:.3f}){lag}", flush=True)
    elif event.kind == "clear":
        print(f"{source} {at}  clear {event.query!r}: {event.start:.2f}s - {event.end:.2f}s (peak {event.peak:.3f})",
              flush=True)
    elif event.kind == "end" and event.reason != "end of file":
        print(f"{source}: ended ({event.reason})", file=sys.stderr, flush=True)
