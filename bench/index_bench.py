"""Photo-index search at scale: query latency, memory per image, recall of the approximate index.

    flock /tmp/blip2-heavy.lock python bench/index_bench.py --out bench/INDEX_RESULTS.md   # 10k and 100k
    flock /tmp/blip2-heavy.lock python bench/index_bench.py --sizes 10000 --queries 50

Synthetic vectors at blip2-itm-vit-g shapes (Q = 32 query vectors of D = 256 per image), written
into a real index file (runtime.index.db) and searched through the real code (PhotoSearch.top):
- exact, streamed from SQLite in chunks (what `blip2-edge search` does: memory stays at one chunk);
- exact over the same vectors held in memory as float16 (a long-running process could do this);
- approximate: usearch candidates re-scored exactly, for several candidate counts.
recall@10 = |approximate top 10 and exact top 10| / 10, averaged over the queries.

Two kinds of synthetic vectors (Library's docstring): "scene", where an image's query vectors
share its direction (the mean represents the image well), and "concept", where what the text asks
for is carried by 4 of the 32 query vectors and diluted in their mean (the hard case for the
approximate index). Images belong to N / 50 topics in both.
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
    """Deterministic synthetic embeddings, generated chunk by chunk (see the module docstring).

    kind "scene": every query vector is the image's own direction plus an aspect of its own; a text
    is one query vector of a target image plus noise. The mean of an image's query vectors points
    where its best one does: the easy case for a mean-vector graph.
    kind "concept": an image holds 8 of 2,000 shared concepts, each carried by 4 of its 32 query
    vectors on top of a weaker scene direction; a text is one concept plus noise. The exact top 10
    are the images whose query vectors carry that concept, while their mean vectors are diluted by
    the image's 7 other concepts: the hard case (a "bicycle" in a street scene).
    """

    CONCEPTS, PER_IMAGE = 2000, 8

    def __init__(self, n: int, kind: str, seed: int = 0):
        self.n, self.kind, self.seed = n, kind, seed
        rng = np.random.default_rng(seed)
        self.topics = unit(rng.standard_normal((max(n // 50, 1), D)))
        self.concepts = unit(rng.standard_normal((self.CONCEPTS, D)))

    def chunk(self, start: int, stop: int) -> np.ndarray:  # (n, Q, D) float32
        rng = np.random.default_rng([self.seed, start])
        m = stop - start
        topic = self.topics[rng.integers(0, len(self.topics), m)]
        image = unit(topic + 0.7 * unit(rng.standard_normal((m, D))))
        if self.kind == "scene":
            aspects = unit(rng.standard_normal((m, Q, D)))
            return unit(image[:, None, :] + 0.9 * aspects).astype(np.float32)
        held = np.stack([rng.choice(self.CONCEPTS, self.PER_IMAGE, replace=False) for _ in range(m)])  # (m, 8)
        per_token = np.repeat(held, Q // self.PER_IMAGE, axis=1)  # (m, Q): each concept on 4 query vectors
        noise = unit(rng.standard_normal((m, Q, D)))
        return unit(0.5 * image[:, None, :] + self.concepts[per_token] + 0.5 * noise).astype(np.float32)

    def queries(self, count: int, all_vectors: np.ndarray) -> np.ndarray:  # (count, D)
        rng = np.random.default_rng([self.seed, 10**9])
        noise = 0.6 * unit(rng.standard_normal((count, D)))
        if self.kind == "scene":
            target, token = rng.integers(0, self.n, count), rng.integers(0, Q, count)
            return unit(all_vectors[target, token].astype(np.float32) + noise)
        return unit(self.concepts[rng.integers(0, self.CONCEPTS, count)] + noise)


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


def bench_size(n: int, kind: str, args, rows: list[str]) -> None:
    lib = Library(n, kind)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "photos.db"
        t = time.perf_counter()
        vectors = write_db(path, lib)
        print(f"[{n} {kind}] wrote {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        queries = lib.queries(args.queries, vectors)
        truth = reference_top10(vectors, queries)
        db = IndexDb.open(path)
        record = db.model()
        t = time.perf_counter()
        built = ann.rebuild_if_needed(db, record, threshold=1)
        build_s = time.perf_counter() - t
        db_bytes = sum(os.path.getsize(p) for p in Path(tmp).iterdir())
        ann_bytes = len(db.conn.execute("SELECT data FROM ann").fetchone()[0])
        print(f"[{n} {kind}] approximate index {built} in {build_s:.1f} s", file=sys.stderr)

        exact_db = PhotoSearch(db, _Model(), "synthetic", mode="exact")
        ms, ids = timed(lambda: exact_db.top(queries[0], 10)[0], args.repeats)
        agree = set(ids.tolist()) == truth[0]
        rows.append(f"| {n:,} | {kind} | exact, streamed from SQLite (chunks of {exact.DEFAULT_CHUNK}) | {ms:.0f} | 1.000 "
                    f"| {db_bytes / n / 1024:.1f} KiB on disk, {exact.DEFAULT_CHUNK * Q * D * 6 / 2**20:.0f} MiB RAM |")
        mem_ids = np.arange(1, n + 1)
        ms, _ = timed(lambda: exact.top_k(exact.in_chunks(mem_ids, vectors, 4096), queries[0], 10), args.repeats)
        rows.append(f"| {n:,} | {kind} | exact, float16 matrix in memory | {ms:.0f} | 1.000 | {Q * D * 2 / 1024:.1f} KiB RAM |")
        for cand in args.candidates:
            approx = PhotoSearch(db, _Model(), "synthetic", mode="approximate", candidates=cand)
            ms, _ = timed(lambda: approx.top(queries[0], 10), args.repeats)
            recall = statistics.mean(len(set(approx.top(q, 10)[0].tolist()) & truth[m]) / 10
                                     for m, q in enumerate(queries))
            rows.append(f"| {n:,} | {kind} | approximate, {cand} candidates re-scored | {ms:.1f} | {recall:.3f} "
                        f"| +{ann_bytes / n:.0f} B graph (built in {build_s:.1f} s) |")
        db.close()
        if not agree:
            raise SystemExit("exact search from the db disagrees with the in-memory reference")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=100, help="queries for recall@10")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per latency (median)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 400, 1000, 4000])
    ap.add_argument("--kinds", nargs="+", default=["scene", "concept"], choices=["scene", "concept"])
    ap.add_argument("--out", help="also write the table to this markdown file (e.g. bench/INDEX_RESULTS.md)")
    ap.add_argument("--tmp", default=None, help="where the temporary index files go")
    args = ap.parse_args(argv)
    rows = ["| images | vectors | search | query latency (ms, median) | recall@10 vs exact | memory per image |",
            "| --- | --- | --- | --- | --- | --- |"]
    for n in args.sizes:
        for kind in args.kinds:
            bench_size(n, kind, args, rows)
    text = "\n".join([f"Machine: {machine()}; Q={Q}, D={D}, float16 storage; {args.queries} queries for recall; "
                      f"`python bench/index_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
                      *rows])
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Photo-index search (bench/index_bench.py)\n\n{text}\n")


if __name__ == "__main__":
    main()
