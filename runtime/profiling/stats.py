"""Summary statistics of a list of durations (seconds)."""

from __future__ import annotations

import numpy as np

FIELDS = ("mean", "p50", "p90", "p99", "min", "max")


def duration_stats(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {f: None for f in FIELDS} | {"n": 0}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
