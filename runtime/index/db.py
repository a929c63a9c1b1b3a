"""The photo index's SQLite file: schema, opening (and refusing what is not ours), the model record.

Decisions (docs/retrieval.md, "Photo search", repeats them for users):
- Embeddings are stored as float16: 32 x 256 x 2 = 16 KiB per image for blip2-itm-vit-g instead of
  32 KiB. They are L2-normalised (every component in [-1, 1]), where float16's relative error of
  2^-11 moves a similarity by at most ~1e-3, far below the gaps that order a photo library; the
  search converts each chunk to float32 before the matrix product.
- Embeddings are keyed by the file's content hash, not its path: a moved, renamed or duplicated
  photo points at the embedding already there (files.image_id), nothing is embedded twice.
- WAL journal with synchronous=NORMAL: a search (reader) never waits for an indexing run (writer)
  or blocks it; each batch commit appends to the WAL instead of rewriting pages twice. A killed
  process loses nothing committed (the WAL is in the OS's cache and replayed at the next open);
  a power cut can lose the last batches but never corrupts the file, and lost batches are simply
  embedded again at the next run. (WAL needs a local file system: not for a db on NFS.)
- The artifact that produced the vectors is recorded (its manifest's sha256); vectors of another
  model are refused, never mixed.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.errors import Blip2EdgeError

# 2: videos and their sampled frames (version 1 files are migrated when opened; a blip2-edge that
# reads only version 1 refuses a version 2 file rather than deleting its frames' embeddings).
SCHEMA_VERSION = 2
APPLICATION_ID = 0x42324958  # "B2IX": tells our files from any other SQLite database
EMBEDDING_DTYPE = np.dtype("<f2")
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                    image_id INTEGER NOT NULL REFERENCES images(id));
CREATE INDEX IF NOT EXISTS files_by_image ON files(image_id);
CREATE TABLE IF NOT EXISTS ann (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL, kind TEXT NOT NULL,
                  data BLOB NOT NULL);
"""
# A video is recorded with the frames sampled from it, each pointing at its embedding like a photo.
_VIDEO_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                     duration REAL NOT NULL);
CREATE TABLE IF NOT EXISTS frames (path BLOB NOT NULL REFERENCES videos(path) ON DELETE CASCADE,
                     timestamp REAL NOT NULL, image_id INTEGER NOT NULL REFERENCES images(id),
                     PRIMARY KEY (path, timestamp));
CREATE INDEX IF NOT EXISTS frames_by_image ON frames(image_id);
"""


class IndexDbError(Blip2EdgeError):
    """The photo-index file is missing, damaged, not ours, or made by another model."""


@dataclass(frozen=True)
class ModelRecord:
    """Which artifact produced the vectors of an index."""

    sha256: str  # the artifact's manifest sha256
    location: str  # where it was when the index was made (search loads it from there)
    num_query_tokens: int
    dim: int

    @property
    def embedding_bytes(self) -> int:
        return self.num_query_tokens * self.dim * EMBEDDING_DTYPE.itemsize


def _fix(path: Path) -> str:
    return (f"move {path} away or pass another --db (`blip2-edge index MODEL PHOTOS --db NEW.db` "
            "builds a new index)")


class IndexDb:
    """One open index file. Writers use `transaction()`; everything else only reads."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path, self.conn = path, conn

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = False) -> "IndexDb":
        """Opens (or with `create`, makes) an index, or raises an IndexDbError in one line."""
        path = Path(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not create:
                raise IndexDbError(f"{path}: no such photo index (make one with `blip2-edge index MODEL PHOTOS "
                                   f"--db {path}`)") from None
            st = None
        except OSError as exc:
            raise IndexDbError(f"{path}: cannot be read ({exc.strerror})") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            # sqlite would open a FIFO and wait forever, or fail on a directory with a vaguer message
            raise IndexDbError(f"{path}: not a regular file; pass a file path to --db")
        mode = "rwc" if create else "rw"
        try:
            conn = sqlite3.connect(f"{Path(os.path.abspath(path)).as_uri()}?mode={mode}", uri=True,
                                   isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except sqlite3.Error as exc:
            raise IndexDbError(f"{path}: cannot open ({exc})") from None
        db = cls(path, conn)
        try:
            with db.errors():
                db._check_or_create(create)
        except BaseException:
            conn.close()
            raise
        return db

    def _check_or_create(self, create: bool) -> None:
        c = self.conn
        # The first read of the header: a file that is not SQLite fails here ("file is not a database").
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID:
            if tables or not create:
                raise IndexDbError(f"{self.path}: an SQLite database but not a blip2-edge photo index; {_fix(self.path)}")
            c.execute("PRAGMA journal_mode=WAL")
            # One transaction (a creator killed half-way leaves an empty file, made again next time);
            # IF NOT EXISTS / OR IGNORE let two first runs race without failing.
            c.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{_VIDEO_SCHEMA}PRAGMA application_id={APPLICATION_ID};"
                            f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');"
                            "INSERT OR IGNORE INTO meta VALUES ('generation', '0');COMMIT;")
        version = self.meta("schema_version")
        if version is None or not version.isdigit():
            raise IndexDbError(f"{self.path}: photo index without a schema version (damaged); {_fix(self.path)}")
        if int(version) > SCHEMA_VERSION:
            raise IndexDbError(f"{self.path}: photo index schema version {version}, this blip2-edge reads up to "
                               f"{SCHEMA_VERSION}: upgrade blip2-edge, or build a new index with this one")
        if int(version) == 1:  # photos only: add the video tables
            c.executescript(f"BEGIN IMMEDIATE;{_VIDEO_SCHEMA}"
                            "UPDATE meta SET value = '2' WHERE key = 'schema_version' AND value = '1';COMMIT;")
        elif int(version) < SCHEMA_VERSION:
            raise IndexDbError(f"{self.path}: photo index schema version {version} is not supported; {_fix(self.path)}")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def errors(self) -> Iterator[None]:
        """SQLite's errors on a damaged or foreign file, as one line naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise IndexDbError(f"{self.path}: busy (another process has held it for "
                                   f"{BUSY_TIMEOUT_MS // 1000} s); try again") from None
            raise IndexDbError(f"{self.path}: not a usable photo index ({' '.join(str(exc).split())}); "
                               f"{_fix(self.path)}") from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self.errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # -- meta ------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, conn: sqlite3.Connection, key: str, value) -> None:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def generation(self) -> int:
        """Bumped by every transaction that adds or removes embeddings: a stored approximate
        index is valid only for the generation it was built at."""
        value = self.meta("generation") or 0
        try:
            return int(value)
        except (TypeError, ValueError):
            raise IndexDbError(f"{self.path}: damaged index (meta.generation is {str(value)[:40]!r}, not a number); "
                               "delete the file and index again") from None

    def bump_generation(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def model(self) -> ModelRecord | None:
        with self.errors():
            sha = self.meta("model_sha256")
            if sha is None:
                return None
            try:
                record = ModelRecord(sha, self.meta("model_location") or "", int(self.meta("num_query_tokens")),
                                     int(self.meta("dim")))
            except (TypeError, ValueError):
                record = None
            if record is None or not (0 < record.num_query_tokens <= 4096 and 0 < record.dim <= 65536):
                raise IndexDbError(f"{self.path}: damaged model record; {_fix(self.path)}")
            return record

    def bind_model(self, record: ModelRecord) -> None:
        """Records the model of a new index, or checks that it is the one already recorded."""
        have = self.model()
        if have is None:
            with self.transaction() as c:
                for key, value in (("model_sha256", record.sha256), ("model_location", record.location),
                                   ("num_query_tokens", record.num_query_tokens), ("dim", record.dim),
                                   ("embedding_dtype", "float16")):
                    self.set_meta(c, key, value)
            return
        if have.sha256 != record.sha256:
            raise IndexDbError(
                f"{self.path} holds vectors of another model (manifest sha256 {have.sha256[:12]}, from "
                f"{have.location or 'unknown'}), not of {record.location} ({record.sha256[:12]}); vectors of two models "
                f"cannot be mixed: index with that model, or into a new --db")
        if (have.num_query_tokens, have.dim) != (record.num_query_tokens, record.dim):
            raise IndexDbError(f"{self.path}: damaged model record (shape {have.num_query_tokens}x{have.dim} for "
                               f"{record.num_query_tokens}x{record.dim}); {_fix(self.path)}")
        if have.location != record.location:  # the same artifact moved: search should find it there
            with self.transaction() as c:
                self.set_meta(c, "model_location", record.location)

    def check_model(self, sha256: str, location: str) -> ModelRecord:
        """The recorded model, which must be the artifact `sha256` (at `location`) given for a search."""
        have = self.model()
        if have is None:
            raise IndexDbError(f"{self.path}: empty photo index (run `blip2-edge index MODEL PHOTOS --db {self.path}`)")
        if have.sha256 != sha256:
            raise IndexDbError(f"{location} is not the model that made {self.path} (manifest sha256 {sha256[:12]} vs "
                               f"{have.sha256[:12]}, from {have.location or 'unknown'}): search with that model, or "
                               "re-index with this one into a new --db")
        return have

    # -- embeddings ------------------------------------------------------------------------------

    def embeddings(self, record: ModelRecord, rows) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), float16 embeddings (n, Q, D)) from (id, blob) rows; a blob of the wrong size
        is a damaged index, never reshaped into garbage."""
        rows = list(rows)
        want = record.embedding_bytes
        for image_id, blob in rows:
            if not isinstance(blob, bytes) or len(blob) != want:
                raise IndexDbError(f"{self.path}: embedding of image row {image_id} is damaged "
                                   f"({len(blob) if isinstance(blob, bytes) else type(blob).__name__} bytes, expected "
                                   f"{want}); {_fix(self.path)}")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        flat = np.frombuffer(b"".join(r[1] for r in rows), dtype=EMBEDDING_DTYPE)
        return ids, flat.reshape(len(rows), record.num_query_tokens, record.dim)

    def iter_embeddings(self, record: ModelRecord, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All embeddings in chunks of at most `chunk` images (keyset pagination: memory stays at
        one chunk, and a writer committing meanwhile cannot shift the pages)."""
        last = -1
        while True:
            with self.errors():
                rows = self.conn.execute("SELECT id, embedding FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                         (last, chunk)).fetchall()
            if not rows:
                return
            ids, emb = self.embeddings(record, rows)
            last = int(ids[-1])
            yield ids, emb

    def embeddings_of(self, record: ModelRecord, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in ids]
        out = []
        with self.errors():
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[start:start + 500]
                out += self.conn.execute(f"SELECT id, embedding FROM images WHERE id IN ({','.join('?' * len(part))})",
                                         part).fetchall()
        return self.embeddings(record, out)

    def frames_of(self, image_id: int) -> list[tuple[str, float, int, int]]:
        """(video path, timestamp, size, mtime_ns) of every sampled video frame with this content."""
        with self.errors():
            rows = self.conn.execute("SELECT f.path, f.timestamp, v.size, v.mtime_ns FROM frames f JOIN videos v "
                                     "ON v.path = f.path WHERE f.image_id = ? ORDER BY f.path, f.timestamp",
                                     (int(image_id),)).fetchall()
        return [(os.fsdecode(path_bytes(p)), float(t), s, m) for p, t, s, m in rows]

    def count_images(self) -> int:
        with self.errors():
            return int(self.conn.execute("SELECT count(*) FROM images").fetchone()[0])

    def paths_of(self, image_id: int) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of every file with this content, in path order."""
        with self.errors():
            rows = self.conn.execute("SELECT path, size, mtime_ns FROM files WHERE image_id = ? ORDER BY path",
                                     (int(image_id),)).fetchall()
        return [(os.fsdecode(path_bytes(p)), s, m) for p, s, m in rows]


def path_bytes(value) -> bytes:
    """A stored path as bytes (paths are stored as BLOBs: any byte string a file system allows)."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
