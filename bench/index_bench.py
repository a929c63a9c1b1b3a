"""Photo-index search at scale: query latency, memory per image, recall of the approximate index.

    flock /tmp/blip2-heavy.lock python bench/index_bench.py                  # 10k and 100k images
    flock /tmp/blip2-heavy.lock python bench/index_bench.py --sizes 10000 --queries 50

Synthetic vectors at blip2-itm-vit-g shapes (Q = 32 query vectors of D = 256 per image), written
into a real index file (runtime.index.db) and searched through the real code (PhotoSearch.top):
- exact, streamed from SQLite in chunks (what `blip2-edge search` does: memory stays at one chunk);
- exact over the same vectors held in memory as float16 (a long-running process could do this);
- approximate: usearch candidates re-scored exactly, for several candidate counts.
recall@10 = |approximate top 10 and exact top 10| / 10, averaged over the queries.

The vectors have the structure that makes max-over-queries matter: images belong to topics
(N / 50 topic centres), each image has its own direction near its topic, and each of its 32
query vectors adds its own "aspect" to it; a text query is the aspect of one query vector of a
random target image plus noise, so the best image is decided by one query vector, not the mean.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from runtime.index import ann, exact  # noqa: E402
from runtime.index.db import EMBEDDING_DTYPE, IndexDb, ModelRecord  # noqa: E402
from runtime.index.search import PhotoSearch  # noqa: E402

Q, D = 32, 256


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Library:
    """Deterministic synthetic embeddings, generated chunk by chunk."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        rng = np.random.default_rng(seed)
        self.topics = unit(rng.standard_normal((max(n // 50, 1), D)))

    def chunk(self, start: int, stop: int) -> np.ndarray:  # (n, Q, D) float32
        rng = np.random.default_rng([self.seed, start])
        topic = self.topics[rng.integers(0, len(self.topics), stop - start)]
        image = unit(topic + 0.7 * unit(rng.standard_normal((stop - start, D))))
        aspects = unit(rng.standard_normal((stop - start, Q, D)))
        return unit(image[:, None, :] + 0.9 * aspects).astype(np.float32)

    def queries(self, count: int, all_vectors: np.ndarray) -> np.ndarray:  # (count, D)
        rng = np.random.default_rng([self.seed, 10**9])
        target = rng.integers(0, self.n, count)
        token = rng.integers(0, Q, count)
        return unit(all_vectors[target, token].astype(np.float32) + 0.6 * unit(rng.standard_normal((count, D))))


class _Model:
    """Only what PhotoSearch checks: the vectors were 'made by' this artifact."""

    artifact_sha256 = hashlib.sha256(b"synthetic").hexdigest()


def write_db(path: Path, lib: Library, chunk: int = 5000) -> np.ndarray:
    """A real index file holding the library; returns the float16 vectors (n, Q, D) for the reference."""
    db = IndexDb.open(path, create=True)
    db.bind_model(ModelRecord(_Model.artifact_sha256, "synthetic", Q, D))
    out = np.empty((lib.n, Q, D), dtype=EMBEDDING_DTYPE)
    for start in range(0, lib.n, chunk):
        stop = min(start + chunk, lib.n)
        emb = lib.chunk(start, stop).astype(EMBEDDING_DTYPE)
        out[start:stop] = emb
        with db.transaction() as c:
            c.executemany("INSERT INTO images (id, sha256, embedding) VALUES (?, ?, ?)",
                          [(start + i + 1, f"{start + i:064x}", emb[i].tobytes()) for i in range(stop - start)])
            c.executemany("INSERT INTO files VALUES (?, 0, 0, ?)",
                          [(f"/photos/{start + i}.jpg".encode(), start + i + 1) for i in range(stop - start)])
            db.bump_generation(c)
    db.close()
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (page cache, lazy allocations)
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, result


def reference_top10(vectors: np.ndarray, queries: np.ndarray, chunk: int = 4096) -> list[set[int]]:
    """Exact top 10 of every query at once (ids are row + 1), for recall."""
    ids = np.arange(1, len(vectors) + 1)
    best = [(np.empty(0, np.int64), np.empty(0, np.float32))] * len(queries)
    for start in range(0, len(vectors), chunk):
        sims = exact.similarity(vectors[start:start + chunk], queries)  # (n, M)
        best = [exact.ranked(np.concatenate([b[0], ids[start:start + chunk]]),
                             np.concatenate([b[1], sims[:, m]]), 10) for m, b in enumerate(best)]
    return [set(b[0].tolist()) for b in best]


def bench_size(n: int, args, rows: list[str]) -> None:
    lib = Library(n)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "photos.db"
        t = time.perf_counter()
        vectors = write_db(path, lib)
        print(f"[{n}] wrote {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        queries = lib.queries(args.queries, vectors)
        truth = reference_top10(vectors, queries)
        db = IndexDb.open(path)
        record = db.model()
        t = time.perf_counter()
        built = ann.rebuild_if_needed(db, record, threshold=1)
        build_s = time.perf_counter() - t
        db_bytes = sum(os.path.getsize(p) for p in Path(tmp).iterdir())
        ann_bytes = len(db.conn.execute("SELECT data FROM ann").fetchone()[0])
        print(f"[{n}] approximate index {built} in {build_s:.1f} s", file=sys.stderr)

        exact_db = PhotoSearch(db, _Model(), "synthetic", mode="exact")
        ms, ids = timed(lambda: exact_db.top(queries[0], 10)[0], args.repeats)
        agree = set(ids.tolist()) == truth[0]
        rows.append(f"| {n:,} | exact, streamed from SQLite (chunks of {exact.DEFAULT_CHUNK}) | {ms:.0f} | 1.000 "
                    f"| {db_bytes / n / 1024:.1f} KiB on disk, {exact.DEFAULT_CHUNK * Q * D * 6 / 2**20:.0f} MiB RAM |")
        mem_ids = np.arange(1, n + 1)
        ms, _ = timed(lambda: exact.top_k(exact.in_chunks(mem_ids, vectors, 4096), queries[0], 10), args.repeats)
        rows.append(f"| {n:,} | exact, float16 matrix in memory | {ms:.0f} | 1.000 | {Q * D * 2 / 1024:.1f} KiB RAM |")
        for cand in args.candidates:
            approx = PhotoSearch(db, _Model(), "synthetic", mode="approximate", candidates=cand)
            ms, _ = timed(lambda: approx.top(queries[0], 10), args.repeats)
            recall = statistics.mean(len(set(approx.top(q, 10)[0].tolist()) & truth[m]) / 10
                                     for m, q in enumerate(queries))
            rows.append(f"| {n:,} | approximate, {cand} candidates re-scored | {ms:.1f} | {recall:.3f} "
                        f"| +{ann_bytes / n:.0f} B graph (built in {build_s:.1f} s) |")
        db.close()
        if not agree:
            raise SystemExit("exact search from the db disagrees with the in-memory reference")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=100, help="queries for recall@10")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per latency (median)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 400, 1000])
    ap.add_argument("--tmp", default=None, help="where the temporary index files go")
    args = ap.parse_args(argv)
    rows = ["| images | search | query latency (ms, median) | recall@10 vs exact | memory per image |",
            "| --- | --- | --- | --- | --- |"]
    for n in args.sizes:
        bench_size(n, args, rows)
    print(f"Machine: {machine()}; Q={Q}, D={D}, float16 storage; {args.queries} queries for recall")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
