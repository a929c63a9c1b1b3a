"""Captions of a video file as subtitles: SRT and WebVTT, each cue from one described frame to the
next (the last to the end of the video), written whole or not at all."""

from __future__ import annotations

from pathlib import Path

from runtime.artifact.atomic_file import replace_file


def _clock(seconds: float, separator: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def cues(events, end: float) -> list[tuple[float, float, str]]:
    """(start, end, text) per described frame from caption/answer events (several questions about
    one frame share a cue, one line each), in time order."""
    by_frame: dict[int, tuple[float, list[str]]] = {}
    for e in events:
        if e.kind not in ("caption", "answer"):
            continue
        line = f"{e.question} {e.text}" if e.question else e.text
        by_frame.setdefault(e.frame, (e.timestamp, []))[1].append(line)
    rows = sorted(by_frame.values(), key=lambda r: r[0])
    out = []
    for i, (start, lines) in enumerate(rows):
        stop = rows[i + 1][0] if i + 1 < len(rows) else max(end, start + 0.5)
        out.append((start, stop, "\n".join(lines)))
    return out


def srt(rows: list[tuple[float, float, str]]) -> str:
    return "".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n\n" for i, (a, b, text) in enumerate(rows, 1))


def webvtt(rows: list[tuple[float, float, str]]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n\n" for a, b, text in rows)


def write_subtitles(path, rows: list[tuple[float, float, str]], kind: str) -> None:
    text = srt(rows) if kind == "srt" else webvtt(rows)
    replace_file(Path(path), text.encode("utf-8"))
