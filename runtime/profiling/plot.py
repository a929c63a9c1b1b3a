"""A PNG of a profile: stacked per-stage latency per artifact directory, and per-token decode
time. Needs matplotlib (the 'plot' extra)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import require
from runtime.profiling.report import stage_order


def plot(path: Path, profiles: list[dict]) -> None:
    matplotlib = require("matplotlib", "plot", "--plot")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [Path(p["artifacts"]).name for p in profiles]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(profiles)
    for stage in stage_order(profiles):
        values = [p["stages"][stage]["mean"] * 1e3 if stage in p["stages"] else 0.0 for p in profiles]
        left.bar(names, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("ms (mean)")
    left.set_title("end-to-end latency by stage")
    left.legend(fontsize=8)
    for name, p in zip(names, profiles):
        steps = p["runs"][0]["decode_steps"]
        right.plot(range(1, len(steps) + 1), [s * 1e3 for s in steps], marker="o", markersize=3, label=name)
    right.set_xlabel("decode step")
    right.set_ylabel("ms")
    right.set_title("per-token decode time (first measured run)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
