"""Bringing an index up to date with a photo folder, embedding only what is new.

A file is looked at again only when its size or mtime differs from the db's record; then its
content hash decides: content already embedded (a moved, renamed, touched or duplicated photo)
just points the path at that embedding, new content is decoded and embedded. Files gone from the
folder are removed, and embeddings no file points at any more are dropped.

Work is committed in batches (one transaction per embedded batch): a run killed at any point
keeps every batch committed before, and the next run starts where it stopped. Images are untrusted:
each is decoded on its own through the runtime's checked loader, and one that cannot be read
is listed in the report, never fatal.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact.verified_files import open_regular, sha256_fd
from runtime.errors import Blip2EdgeError, OptionError
from runtime.images import walk_image_files
from runtime.index import ann
from runtime.index.db import EMBEDDING_DTYPE, IndexDb, IndexDbError, ModelRecord, path_bytes
from runtime.index.videos import DEFAULT_VIDEO_EVERY, update_videos
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS

DEFAULT_BATCH = 16


@dataclass
class IndexReport:
    root: str
    db: str
    files: int = 0  # image files found under root
    unchanged: int = 0  # same size and mtime as recorded
    embedded: int = 0  # new content, embedded in this run
    relinked: int = 0  # changed metadata or new path, content already embedded (moved, renamed, copied)
    removed: int = 0  # files gone from root (or now unreadable) whose records were deleted
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Folders that could not be listed, and the records under them, kept as they were.
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    kept: int = 0
    videos: int = 0  # video files found under root
    videos_unchanged: int = 0  # same size and mtime as recorded: not decoded
    videos_indexed: int = 0  # new or changed videos sampled and embedded in this run
    video_frames: int = 0  # frames sampled from them
    videos_removed: int = 0  # videos gone from root (or now unreadable) whose records were deleted
    images: int = 0  # distinct embedded images (photos and video frames) in the whole db after the run
    ann: str = "none"

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["unreadable"] = [{"path": p, "reason": r} for p, r in self.unreadable]
        out["unreadable_folders"] = [{"path": p, "reason": r} for p, r in self.unreadable_folders]
        return out


def model_record(retriever, location: str | os.PathLike) -> ModelRecord:
    return ModelRecord(retriever.artifact_sha256, os.path.abspath(location), int(retriever.num_query_tokens),
                       int(retriever.embed_dim))


class _Pending:
    """What the next commit writes: new embeddings and path records."""

    def __init__(self):
        self.images: dict[str, object] = {}  # sha256 -> decoded image, to embed
        self.files: list[tuple[bytes, int, int, str]] = []  # (path, size, mtime_ns, sha256)

    def __len__(self):
        return len(self.images)


def _content_hash(path: str) -> str:
    fd = open_regular(path)  # never a FIFO or a device, even one swapped in after the walk
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def update_index(db: IndexDb, retriever, root: str | os.PathLike, location: str | os.PathLike, *,
                 batch_size: int = DEFAULT_BATCH, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 ann_threshold: int = ann.DEFAULT_THRESHOLD, progress=None, allow_empty: bool = False,
                 video_every: float = DEFAULT_VIDEO_EVERY) -> IndexReport:
    """Indexes the images and videos under `root` with `retriever` (loaded from `location`) into
    `db`; a video's frames are sampled at scene changes and at least every `video_every` seconds
    (runtime.index.videos).

    Records are removed only for files known to be gone: never under a folder that could not be
    listed (it is reported, its records kept), and never all of a root that now lists no image
    at all (an unmounted drive looks like that) unless `allow_empty`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"--batch-size must be a positive integer, got {batch_size!r}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise OptionError(f"{root}: not a directory (index takes the folder of photos)")
    record = model_record(retriever, location)
    db.bind_model(record)
    report = IndexReport(str(root), str(db.path))
    known = _known_files(db, os.fsencode(root) + b"/")
    todo, seen, blind = _walk(root, known, report)
    if report.files == 0 and not blind and known and not allow_empty:
        raise OptionError(f"{root}: no images there, but the index holds {len(known)} from it (a drive that is not "
                          "mounted?); nothing was changed. If they were deleted, index again with --allow-empty")
    progress_factory = progress
    if progress is not None:
        progress = progress("indexing", len(todo))
    pending = _Pending()
    gone = [p for p in known if p not in seen and not p.startswith(blind)]
    report.kept = sum(1 for p in known if blind and p.startswith(blind))
    for path, st in todo:
        if not _add_file(db, retriever, path, st, pending, report, max_pixels) and os.fsencode(path) in known:
            gone.append(os.fsencode(path))  # its recorded embedding is of content that is no longer there
        if len(pending) >= batch_size or len(pending.files) >= 16 * batch_size:
            _commit(db, retriever, record, pending)
            pending = _Pending()
        if progress is not None:
            progress.advance(1)
    _commit(db, retriever, record, pending)
    report.removed = _remove(db, gone)
    update_videos(db, retriever, record, root, report, every=video_every, max_pixels=max_pixels, blind=blind,
                  progress=progress_factory, allow_empty=allow_empty)
    report.images = db.count_images()
    report.ann = ann.rebuild_if_needed(db, record, ann_threshold)
    return report


def _known_files(db: IndexDb, prefix: bytes) -> dict[bytes, tuple]:
    """path -> (size, mtime_ns, image_id) of the recorded files under the folder `prefix`."""
    with db.errors():
        rows = db.conn.execute("SELECT path, size, mtime_ns, image_id FROM files").fetchall()
    return {path_bytes(p): (s, m, i) for p, s, m, i in rows if path_bytes(p).startswith(prefix)}


def _walk(root: Path, known: dict,
          report: IndexReport) -> tuple[list[tuple[str, os.stat_result]], set[bytes], tuple[bytes, ...]]:
    """The image files under `root`: (path, stat) of those new or whose size or mtime changed,
    the paths of all that are there (counted in the report), and the path prefixes of the
    folders that could not be listed (reported; what the index holds under them is kept)."""
    todo, seen = [], set()
    files, unreadable = walk_image_files(root)
    if unreadable and unreadable[0][0] == root:
        raise OptionError(f"{root}: cannot be read ({unreadable[0][1].strerror}); nothing was changed")
    for folder, exc in unreadable:
        report.unreadable_folders.append((str(folder), exc.strerror or str(exc)))
    blind = tuple(os.fsencode(folder) + b"/" for folder, _ in unreadable)
    for path in files:
        key = os.fsencode(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            report.unreadable.append((str(path), exc.strerror or str(exc)))
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        report.files += 1
        seen.add(key)
        old = known.get(key)
        if old is not None and (old[0], old[1]) == (st.st_size, st.st_mtime_ns):
            report.unchanged += 1
        else:
            todo.append((str(path), st))
    return todo, seen, blind


def _add_file(db: IndexDb, retriever, path: str, st: os.stat_result, pending: _Pending, report: IndexReport,
              max_pixels: int) -> bool:
    """Hashes one new or changed file and adds it to `pending` (decoded only when its content is
    new); False when it could not be read (listed in the report)."""
    try:
        sha = _content_hash(path)
        with db.errors():
            exists = db.conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone()
        image = None
        if exists is None and sha not in pending.images:
            # keep only the model-sized image while the batch fills (a 12 Mpx photo is 36 MB decoded)
            image = retriever.preprocessing.load(path, max_pixels)
        if _identity(os.stat(path)) != _identity(st):
            # written to between the walk and now: the hash and the pixels may be of two versions
            report.unreadable.append((path, "changed while being indexed; run index again"))
            return True
    except IndexDbError:
        raise
    except Blip2EdgeError as exc:  # ImageError, or ArtifactError from open_regular
        report.unreadable.append((path, _reason(exc, path)))
        return False
    except OSError as exc:
        report.unreadable.append((path, exc.strerror or str(exc)))
        return False
    if image is not None:
        pending.images[sha] = image
        report.embedded += 1
    else:
        report.relinked += 1
    pending.files.append((os.fsencode(path), st.st_size, st.st_mtime_ns, sha))
    return True


def _identity(st: os.stat_result) -> tuple:
    """What changes when a file is written to or replaced (ctime moves even when mtime is set back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _reason(exc: Exception, path: str) -> str:
    text = " ".join(str(exc).split())
    return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


def _commit(db: IndexDb, retriever, record: ModelRecord, pending: _Pending) -> None:
    """Embeds the pending images and writes them with their paths in one transaction."""
    if not pending.files:
        return
    blobs = {}
    if pending.images:
        shas = list(pending.images)
        emb = np.asarray(retriever.embed_images([pending.images[s] for s in shas]))
        if emb.shape != (len(shas), record.num_query_tokens, record.dim):
            raise Blip2EdgeError(f"the model returned image embeddings of shape {emb.shape}, expected "
                                 f"({len(shas)}, {record.num_query_tokens}, {record.dim})")
        blobs = {s: emb[i].astype(EMBEDDING_DTYPE).tobytes() for i, s in enumerate(shas)}
    with db.transaction() as c:
        if blobs:
            c.executemany("INSERT OR IGNORE INTO images (sha256, embedding) VALUES (?, ?)", list(blobs.items()))
            db.bump_generation(c)
        c.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, image_id) "
                      "VALUES (?, ?, ?, (SELECT id FROM images WHERE sha256 = ?))", pending.files)


def _remove(db: IndexDb, paths: list[bytes]) -> int:
    """Deletes the records of `paths`, then every embedding no file points at, in one transaction."""
    with db.transaction() as c:
        removed = 0
        for start in range(0, len(paths), 500):
            part = paths[start:start + 500]
            removed += c.execute(f"DELETE FROM files WHERE path IN ({','.join('?' * len(part))})", part).rowcount
        orphans = c.execute("DELETE FROM images WHERE id NOT IN (SELECT image_id FROM files) "
                            "AND id NOT IN (SELECT image_id FROM frames)").rowcount
        if orphans:
            db.bump_generation(c)
    return removed
