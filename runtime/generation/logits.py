"""Logits processors in numpy, matching transformers' processors and warpers one for one.

Each takes scores (N, V) float32 and returns new scores; `history` is every id the model has
seen for each row (query placeholders, padding, prompt, generated), as transformers' `input_ids`.
"""

from __future__ import annotations

import numpy as np

from runtime.generation.options import GenerationOptions


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def repetition_penalty(scores: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    rows = np.arange(scores.shape[0])[:, None]
    picked = scores[rows, history]
    scores = scores.copy()
    scores[rows, history] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def forbid(scores: np.ndarray, token_ids) -> np.ndarray:
    scores = scores.copy()
    scores[:, list(token_ids)] = -np.inf
    return scores


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
    return np.where(scores < kth, -np.inf, scores)


def top_p(scores: np.ndarray, p: float) -> np.ndarray:
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def process(scores: np.ndarray, history: np.ndarray, new_tokens: int, opts: GenerationOptions,
            eos_ids: tuple[int, ...]) -> np.ndarray:
    """The processors transformers applies before choosing (greedy) or before warping."""
    if opts.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, opts.repetition_penalty)
    if new_tokens < opts.min_new_tokens and eos_ids:
        scores = forbid(scores, eos_ids)
    return scores


def warp(scores: np.ndarray, opts: GenerationOptions) -> np.ndarray:
    """Sampling warpers, in transformers' order: temperature, top-k, top-p."""
    if opts.temperature != 1.0:
        scores = scores / opts.temperature
    if opts.top_k:
        scores = top_k(scores, opts.top_k)
    if opts.top_p < 1.0:
        scores = top_p(scores, opts.top_p)
    return scores
