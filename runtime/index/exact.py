"""Exact BLIP-2 similarity in numpy: an image's score for a text is the largest dot product of
the text embedding with any of the image's Q query embeddings (transformers' ITC:
`sim_i2t.max(-1)` over query tokens), computed chunk by chunk so memory stays at one chunk
whatever the size of the library.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

DEFAULT_CHUNK = 1024  # images per chunk: 1024 x 32 x 256 x (2 + 4) bytes = 48 MiB at blip2-itm-vit-g shapes


def similarity(embeddings: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """(N, Q, D) image embeddings, (M, D) text embeddings -> (N, M) max-over-queries similarity."""
    n, q, d = embeddings.shape
    sims = embeddings.reshape(n * q, d).astype(np.float32, copy=False) @ texts.astype(np.float32, copy=False).T
    return sims.reshape(n, q, -1).max(axis=1)


def ranked(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best (id, score) by score, highest first; equal scores in id order, so a result
    never depends on how the library was chunked."""
    if len(ids) > k:
        # argpartition keeps every id whose score ties the k-th one, then the exact order settles them
        cut = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= cut
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def top_k(chunks: Iterable[tuple[np.ndarray, np.ndarray]], text: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` images most similar to one text embedding (D,), from (ids (n,), embeddings (n, Q, D))
    chunks: (ids, scores float32), best first."""
    best_ids = np.empty(0, dtype=np.int64)
    best_scores = np.empty(0, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32).reshape(1, -1)
    for ids, emb in chunks:
        scores = similarity(emb, text)[:, 0]
        best_ids, best_scores = ranked(np.concatenate([best_ids, ids]), np.concatenate([best_scores, scores]), k)
    return best_ids, best_scores


def in_chunks(ids: np.ndarray, embeddings: np.ndarray, chunk: int = DEFAULT_CHUNK):
    """An in-memory (ids, embeddings) pair as chunks for top_k."""
    for start in range(0, len(ids), chunk):
        yield ids[start:start + chunk], embeddings[start:start + chunk]
