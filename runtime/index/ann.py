"""The approximate index for large libraries: usearch's HNSW graph over one vector per image.

Why usearch: one 2.3 MB wheel with no build step on x86-64 and aarch64 (Jetson), maintained
(monthly releases), float16 vectors stored inside the graph, and a graph that serialises to bytes,
so it lives inside the SQLite file, in the same transactions as the vectors it indexes. hnswlib's
last release (2023) ships no wheels (a C++ compiler on the device); faiss-cpu is an 18.8 MB wheel
whose IVF indexes need a training step and a retrain as a library grows.

Why one vector per image: the exact score is a max over Q = 32 query vectors, but indexing all of
them multiplies the graph by 32 (3.2 M nodes for 100k photos; ~8 minutes to build on one core).
The graph holds each image's normalised mean query vector and returns `candidates` images; those
are re-scored exactly (max over queries) from the stored vectors. Recall vs exact is measured by
bench/index_bench.py (bench/INDEX_RESULTS.md).

The graph is rebuilt at the end of an indexing run whose library is at least `threshold` images,
and is used only while its recorded generation matches the vectors' (db.IndexDb.generation); a
stale one (an indexing run killed before the rebuild) is ignored and search stays exact.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import ArtifactError, require
from runtime.index import graph_seal
from runtime.index.db import IndexDb, ModelRecord

KIND = "usearch-hnsw-mean-f16"
# bench/INDEX_RESULTS.md: exact search costs ~18 ms per 1,000 images on a 2-core x86 (under ~1 s
# below 50k); 4,000 candidates keep recall@10 >= 0.96 at 100k even when the text's concept lives in
# 4 of the 32 query vectors (400 candidates: 0.52), at ~120 ms.
DEFAULT_THRESHOLD = 50_000  # images
DEFAULT_CANDIDATES = 4000  # images re-scored exactly per query
CONNECTIVITY = 16
EXPANSION_ADD = 128


def _usearch():
    return require("usearch.index", "ann", "the approximate photo index (libraries over the --ann-threshold)")


def image_vectors(embeddings: np.ndarray) -> np.ndarray:
    """(n, Q, D) -> (n, D): each image's mean query vector, L2-normalised, float32."""
    mean = embeddings.astype(np.float32).mean(axis=1)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    return mean / np.maximum(norms, 1e-12)


def new_graph(dim: int, expansion_search: int):
    return _usearch().Index(ndim=dim, metric="ip", dtype="f16", connectivity=CONNECTIVITY,
                            expansion_add=EXPANSION_ADD, expansion_search=expansion_search)


def build(chunks, dim: int, expansion_search: int = DEFAULT_CANDIDATES):
    """A graph over every image of the (ids, embeddings) chunks."""
    graph = new_graph(dim, expansion_search)
    for ids, emb in chunks:
        graph.add(ids.astype(np.uint64), image_vectors(emb))
    return graph


def rebuild_if_needed(db: IndexDb, record: ModelRecord, threshold: int, chunk: int = 4096) -> str:
    """Brings the stored graph up to date: built when the library has at least `threshold`
    images and the stored one is stale, dropped below. Returns what was done, for the report."""
    count = db.count_images()
    with db.errors():
        row = db.conn.execute(f"SELECT generation, {_KIND_BYTES} FROM ann WHERE id = 1").fetchone()
    generation = db.generation()
    if count < threshold:
        if row is not None:
            with db.transaction() as c:
                c.execute("DELETE FROM ann")
            return "dropped"
        return "none"
    if row is not None and row[0] == generation and row[1] == KIND.encode() and _sealed_graph(db) is not None:
        return "current"
    try:
        graph_seal.key()
    except (ArtifactError, OSError):  # no usable cache directory: an unsealed graph would never be used
        return "none (no key: search stays exact)"
    data = bytes(build(db.iter_embeddings(record, chunk), record.dim).save())
    with db.transaction() as c:
        if db.generation() != generation:  # another writer committed meanwhile: its run rebuilds
            return "stale"
        c.execute("INSERT OR REPLACE INTO ann VALUES (1, ?, ?, ?)", (generation, KIND, data))
        db.set_meta(c, SEAL_KEY, graph_seal.seal(data))
    return "built"


SEAL_KEY = "ann_seal"  # meta key: the graph's HMAC (runtime/index/graph_seal.py)
# The ann row's text columns read as bytes: a damaged row (text that is not UTF-8 where a blob or
# the kind should be) must leave search exact, not fail SQLite's decoding of every query.
_KIND_BYTES = "CAST(kind AS BLOB)"
_DATA_BYTES = "CAST(data AS BLOB)"


def _sealed_graph(db: IndexDb) -> bytes | None:
    """The stored graph's bytes if this user's key sealed them, else None (never restored)."""
    with db.errors():
        row = db.conn.execute(f"SELECT {_DATA_BYTES} FROM ann WHERE id = 1").fetchone()
    if row is None or not isinstance(row[0], bytes):
        return None
    try:
        sealed = graph_seal.is_sealed(row[0], db.meta(SEAL_KEY))
    except (ArtifactError, OSError):  # no usable key: nothing is trusted, search stays exact
        return None
    return row[0] if sealed else None


def load(db: IndexDb, expansion_search: int):
    """The stored graph if it is current, else None (search falls back to exact)."""
    with db.errors():
        row = db.conn.execute(f"SELECT generation, {_KIND_BYTES} FROM ann WHERE id = 1").fetchone()
    if row is None or row[0] != db.generation() or row[1] != KIND.encode():
        return None
    data = _sealed_graph(db)
    if data is None:  # not built by this user (a crafted blob can crash usearch): stay exact
        return None
    try:
        graph = _usearch().Index.restore(data)
    except (ValueError, RuntimeError):
        return None
    if graph is None or len(graph) != db.count_images():  # not the graph of these vectors: stay exact
        return None
    graph.expansion_search = expansion_search
    return graph


def candidates(graph, text: np.ndarray, count: int) -> np.ndarray:
    """Ids of up to `count` images whose mean vector is nearest to the text embedding (D,)."""
    matches = graph.search(np.asarray(text, dtype=np.float32).reshape(-1), count)
    return np.asarray(matches.keys, dtype=np.int64)
