"""Videos in the photo index: each video file under the folder is sampled at its scene changes
(and at least every `every` seconds), and each sampled frame is embedded and stored with
(file, timestamp), so that a search finds the moment.

A video whose size and mtime match the record is not decoded again; a changed one is sampled and
embedded again, replacing its old frames in one transaction; one gone from the folder is removed
with its frames. A video that cannot be read (or a missing `video` extra) is listed in the
report, never fatal: the photos and the other videos are indexed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import Blip2EdgeError, OptionError
from runtime.index.db import EMBEDDING_DTYPE, IndexDb, IndexDbError, ModelRecord, path_bytes
from runtime.video.file_source import FileSource
from runtime.video.opening import VIDEO_SUFFIXES
from runtime.video.sampling import Sampler, SamplingOptions

DEFAULT_VIDEO_EVERY = 10.0  # seconds: the longest stretch of a video without a sampled frame


def video_files(root: Path) -> list[Path]:
    """Regular files under `root` with a video suffix, sorted (links to folders not followed)."""
    found = []
    for top, _, names in os.walk(root):
        for n in names:
            p = Path(top, n)
            if p.suffix.lower() in VIDEO_SUFFIXES:
                try:
                    if stat.S_ISREG(os.stat(p).st_mode):
                        found.append(p)
                except OSError:
                    continue
    return sorted(found)


def sample_video(path: str, preprocessing, every: float, max_pixels: int) -> tuple[list[tuple[float, Image.Image]], float]:
    """(timestamp, model-size image) of the frames sampled from a video, and its duration."""
    frames = []
    sampler = Sampler(SamplingOptions(every=every, scene=True, skip_duplicates=True))
    with FileSource(path, max_pixels=max_pixels) as src:
        for frame in src.frames():
            if sampler.wants(frame.timestamp, frame.gray):
                frames.append((round(frame.timestamp, 3), preprocessing.resize(Image.fromarray(frame.image))))
        duration = src.duration or src.last_timestamp
    return frames, float(duration)


def _frame_sha(image: Image.Image) -> str:
    h = hashlib.sha256(b"video-frame\0")
    h.update(f"{image.width}x{image.height}\0".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def update_videos(db: IndexDb, retriever, record: ModelRecord, root: Path, report, *, every: float,
                  max_pixels: int, blind: tuple[bytes, ...] = (), progress=None, allow_empty: bool = False) -> None:
    """Brings the index's videos under `root` up to date (counts in `report`)."""
    prefix = os.fsencode(root) + b"/"
    with db.errors():
        rows = db.conn.execute("SELECT path, size, mtime_ns FROM videos").fetchall()
    known = {path_bytes(p): (s, m) for p, s, m in rows if path_bytes(p).startswith(prefix)}
    found = video_files(root)
    report.videos = len(found)
    if not found and not report.files and known and not blind and not allow_empty:
        raise OptionError(f"{root}: nothing there, but the index holds {len(known)} videos from it (a drive that is not "
                          "mounted?); nothing was changed. If they were deleted, index again with --allow-empty")
    todo = []
    for path in found:
        st = os.stat(path)
        if known.get(os.fsencode(path)) == (st.st_size, st.st_mtime_ns):
            report.videos_unchanged += 1
        else:
            todo.append((str(path), st))
    if progress is not None and todo:
        progress = progress("videos", len(todo))
    for path, st in todo:
        try:
            frames, duration = sample_video(path, retriever.preprocessing, every, max_pixels)
        except IndexDbError:
            raise
        except Blip2EdgeError as exc:  # VideoError, or the missing video extra
            text = " ".join(str(exc).split())
            report.unreadable.append((path, text[len(path) + 2:] if text.startswith(f"{path}: ") else text))
            _forget(db, [os.fsencode(path)])
        else:
            _store(db, retriever, record, path, st, frames, duration)
            report.videos_indexed += 1
            report.video_frames += len(frames)
        if progress is not None:
            progress.advance(1)
    seen = {os.fsencode(p) for p in found}
    gone = [p for p in known if p not in seen and not p.startswith(blind)]
    report.videos_removed = _forget(db, gone)


def _store(db: IndexDb, retriever, record: ModelRecord, path: str, st: os.stat_result,
           frames: list[tuple[float, Image.Image]], duration: float) -> None:
    """Embeds a video's sampled frames (content already embedded is reused) and replaces its
    record and frames in one transaction."""
    shas = [_frame_sha(im) for _, im in frames]
    with db.errors():
        have = {r[0] for r in db.conn.execute(
            f"SELECT sha256 FROM images WHERE sha256 IN ({','.join('?' * len(shas))})", shas)} if shas else set()
    new = {s: im for s, (_, im) in zip(shas, frames) if s not in have}
    blobs = []
    if new:
        emb = np.asarray(retriever.embed_images(list(new.values())))
        if emb.shape != (len(new), record.num_query_tokens, record.dim):
            raise Blip2EdgeError(f"the model returned image embeddings of shape {emb.shape}, expected "
                                 f"({len(new)}, {record.num_query_tokens}, {record.dim})")
        blobs = [(s, emb[i].astype(EMBEDDING_DTYPE).tobytes()) for i, s in enumerate(new)]
    key = os.fsencode(path)
    with db.transaction() as c:
        if blobs:
            c.executemany("INSERT OR IGNORE INTO images (sha256, embedding) VALUES (?, ?)", blobs)
            db.bump_generation(c)
        c.execute("DELETE FROM frames WHERE path = ?", (key,))
        c.execute("INSERT OR REPLACE INTO videos (path, size, mtime_ns, duration) VALUES (?, ?, ?, ?)",
                  (key, st.st_size, st.st_mtime_ns, duration))
        c.executemany("INSERT OR REPLACE INTO frames (path, timestamp, image_id) "
                      "VALUES (?, ?, (SELECT id FROM images WHERE sha256 = ?))",
                      [(key, t, s) for (t, _), s in zip(frames, shas)])
        _drop_orphans(db, c)


def _forget(db: IndexDb, paths: list[bytes]) -> int:
    """Removes videos (and their frames), then embeddings nothing points at; how many were removed."""
    if not paths:
        return 0
    with db.transaction() as c:
        removed = 0
        for start in range(0, len(paths), 500):
            part = paths[start:start + 500]
            marks = ",".join("?" * len(part))
            c.execute(f"DELETE FROM frames WHERE path IN ({marks})", part)
            removed += c.execute(f"DELETE FROM videos WHERE path IN ({marks})", part).rowcount
        _drop_orphans(db, c)
    return removed


def _drop_orphans(db: IndexDb, c) -> None:
    if c.execute("DELETE FROM images WHERE id NOT IN (SELECT image_id FROM files) "
                 "AND id NOT IN (SELECT image_id FROM frames)").rowcount:
        db.bump_generation(c)
