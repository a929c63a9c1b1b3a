"""Per-token cosine similarity: the one measure of how far a stage's outputs moved, used by
quantize's fidelity report (against FP32) and by --backend auto (an engine against ONNX Runtime).
"""

from __future__ import annotations

import math

import numpy as np


def token_cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine of each output token (the last axis is the feature axis), in float64; two zero
    vectors agree (1.0)."""
    a = got.astype(np.float64).reshape(-1, got.shape[-1]) if got.ndim else got.astype(np.float64).reshape(1, 1)
    b = want.astype(np.float64).reshape(a.shape)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    same = (den == 0) & (num == 0)
    return np.where(same, 1.0, num / np.maximum(den, 1e-30))


def worst_1pct(cosines: np.ndarray) -> float:
    """The 1st percentile of per-token cosines: the report's "worst 1%"."""
    return float(np.percentile(cosines, 1))


def chained_cosine(first: float, second: float) -> float:
    """A lower bound on cos(a, c) from cos(a, b) and cos(b, c): the angles add at most (the
    triangle inequality on the sphere). For means over tokens it holds to second order in the
    angles (Minkowski on their root mean squares), which is the regime of these measures."""
    angle = math.acos(min(1.0, max(-1.0, first))) + math.acos(min(1.0, max(-1.0, second)))
    return math.cos(min(angle, math.pi))
