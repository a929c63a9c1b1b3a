"""What this machine's CPU is: its model name and its /proc/cpuinfo feature flags (which decide
the precisions OpenVINO computes natively, and key --backend auto's measurement cache)."""

from __future__ import annotations

import platform


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, including Jetson's 'Model' line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is no such file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()
