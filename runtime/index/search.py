"""Searching an index with a text: exact (chunked numpy) or approximate (usearch candidates
re-scored exactly), then optionally the top K re-scored by the ITM head."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import Blip2EdgeError, OptionError
from runtime.index import ann, exact
from runtime.index.db import IndexDb, ModelRecord
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, load_image
from runtime.video.file_source import FileSource

MODES = ("auto", "exact", "approximate")


@dataclass
class Hit:
    path: str  # the first of `paths` that still holds the indexed content (or the first recorded)
    score: float  # BLIP-2 ITC similarity: max over query tokens of image . text
    itm: float | None = None  # ITM match probability, when reranked
    paths: tuple[str, ...] = ()  # every indexed file with this content (duplicates)
    image_id: int = 0
    timestamp: float | None = None  # a video's frame: seconds into `path`

    def to_json(self) -> dict:
        out = {"path": self.path, "score": round(self.score, 6), "paths": list(self.paths)}
        if self.timestamp is not None:
            out["timestamp"] = round(self.timestamp, 3)
        if self.itm is not None:
            out["itm"] = round(self.itm, 6)
        return out


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PhotoSearch:
    """Searches one index with the retriever that made it (checked by manifest sha256).

    Keep one open to serve many queries (the demo, a server): the approximate graph is loaded once.
    """

    def __init__(self, db: IndexDb, retriever, location: str | os.PathLike, *, mode: str = "auto",
                 chunk: int = exact.DEFAULT_CHUNK, candidates: int = ann.DEFAULT_CANDIDATES,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if mode not in MODES:
            raise OptionError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.db, self.retriever = db, retriever
        self.record: ModelRecord = db.check_model(retriever.artifact_sha256, str(location))
        self.chunk = _positive(chunk, "chunk")
        self.candidates = _positive(candidates, "--candidates")
        self.max_pixels = max_pixels
        self.graph = None
        if mode != "exact":
            self.graph = ann.load(db, self.candidates)
            if self.graph is None and mode == "approximate":
                raise Blip2EdgeError(f"{db.path} has no current approximate index (it is built by `blip2-edge index` "
                                     "for libraries over --ann-threshold images); search with --mode exact or auto")
        self.mode = "approximate" if self.graph is not None else "exact"

    def text_embedding(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise OptionError("the search text is empty")
        return np.asarray(self.retriever.embed_texts([text]), dtype=np.float32)[0]

    def top(self, text_embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k best images for a text embedding (D,), best first."""
        k = _positive(k, "--top")
        if self.graph is None:
            return exact.top_k(self.db.iter_embeddings(self.record, self.chunk), text_embedding, k)
        ids = ann.candidates(self.graph, text_embedding, max(self.candidates, k))
        return exact.top_k([self.db.embeddings_of(self.record, ids)], text_embedding, k)

    def search(self, text: str, top: int = 10, rerank: int = 0) -> list[Hit]:
        """The `top` images for `text`; with `rerank` K >= top, the best K by similarity are
        re-scored by the ITM head and the `top` most probable matches returned."""
        top = _positive(top, "--top")
        if rerank:
            rerank = _positive(rerank, "--rerank")
            if rerank < top:
                raise OptionError(f"--rerank ({rerank}) must be at least --top ({top}): it is how many of the best "
                                  "images the ITM head re-scores")
        t = self.text_embedding(text)
        ids, scores = self.top(t, max(top, rerank))
        hits = [self._hit(int(i), float(s)) for i, s in zip(ids, scores)]
        if rerank:
            hits = self._rerank(hits, text)
        return hits[:top]

    def _hit(self, image_id: int, score: float) -> Hit:
        files = self.db.paths_of(image_id)
        if not files:  # a frame of a video (the first moment whose video is unchanged)
            moments = self.db.frames_of(image_id)
            if moments:
                current = [(p, t) for p, t, size, mtime in moments if _unchanged(p, size, mtime)]
                path, timestamp = current[0] if current else moments[0][:2]
                return Hit(path, score, None, tuple(dict.fromkeys(m[0] for m in moments)), image_id, timestamp)
        current = [p for p, size, mtime in files if _unchanged(p, size, mtime)]
        paths = tuple(p for p, _, _ in files)
        return Hit(current[0] if current else (paths[0] if paths else ""), score, None, paths, image_id)

    def _rerank(self, hits: list[Hit], text: str, batch: int = 16) -> list[Hit]:
        """ITM probabilities for the hits whose file still holds the indexed content; a file
        changed or gone since indexing is kept with its similarity but ranked after the others.
        Images are decoded a batch at a time and kept at model size (K photos of 12 Mpx would be
        36 MB each)."""
        for start in range(0, len(hits), batch):
            readable = []
            for hit in hits[start:start + batch]:
                try:
                    if hit.timestamp is not None and any(_unchanged(p, size, mtime) for p, _, size, mtime
                                                         in self.db.frames_of(hit.image_id) if p == hit.path):
                        readable.append((hit, self.retriever.preprocessing.resize(video_frame(hit.path, hit.timestamp))))
                        continue
                    if hit.path and any(_unchanged(*f) for f in self.db.paths_of(hit.image_id) if f[0] == hit.path):
                        image = load_image(hit.path, self.max_pixels)
                        readable.append((hit, self.retriever.preprocessing.resize(image)))
                        continue
                    warnings.warn(f"{hit.path or 'image ' + str(hit.image_id)}: changed or gone since it was "
                                  "indexed; not reranked (run blip2-edge index again)")
                except Blip2EdgeError as exc:
                    warnings.warn(f"not reranked: {exc}")
            if readable:
                probs = np.asarray(self.retriever.itm([im for _, im in readable], [text]), dtype=np.float64)[:, 0]
                for (hit, _), p in zip(readable, probs):
                    hit.itm = float(p)
        return sorted(hits, key=lambda h: (h.itm is None, -(h.itm or 0.0), -h.score, h.image_id))


def video_frame(path: str, timestamp: float):
    """The frame of a video at `timestamp`, as a PIL image (needs the video extra)."""
    with FileSource(path) as src:
        return Image.fromarray(src.frame_at(timestamp).image)


def _unchanged(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
