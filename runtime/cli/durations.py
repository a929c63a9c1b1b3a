"""Durations on the command line: '1s', '500ms', '2m', '1.5' (seconds)."""

from __future__ import annotations

import argparse
import re

UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0}


def seconds(text: str) -> float:
    """An argparse type: a duration -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 1s, 500ms or 2m, got {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]
