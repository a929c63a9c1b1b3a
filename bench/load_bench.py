"""Load time of a pipeline per backend, with and without OpenVINO's compiled-stage cache
(runtime/backends/openvino_cache.py), side by side on this machine.

    flock /tmp/heavy.lock python bench/load_bench.py [ARTIFACTS ...] [--rounds 3]

Each load runs in a fresh process (so nothing compiled stays in memory between loads), in
rounds that rotate the order; the artifact files' hash cache and the page cache are warm for
every load (one warm-up load of each first), and every backend's cache lives in one temporary
XDG_CACHE_HOME. `auto` reads its placement from the measurement the warm-up made. Medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, REPO, machine_line, read_bandwidth  # noqa: E402

CASES = {  # label -> (backend, precision, BLIP2_EDGE_OPENVINO_CACHE)
    "onnxruntime": ("onnxruntime", "f32", "off"),
    "openvino bf16, no cache": ("openvino", "bf16", "off"),
    "openvino bf16, cached": ("openvino", "bf16", "8GB"),
    "auto, no cache": ("auto", "f32", "off"),
    "auto, cached": ("auto", "f32", "8GB"),
}
LOAD = ("import sys, time; t0 = time.perf_counter(); from runtime.pipeline import Blip2Pipeline; "
        "p = Blip2Pipeline.from_artifacts(sys.argv[1], backend=sys.argv[2], precision=sys.argv[3]); "
        "print(time.perf_counter() - t0)")


def load_seconds(art: Path, backend: str, precision: str, cache: str, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD, str(art), backend, precision], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**env, "BLIP2_EDGE_OPENVINO_CACHE": cache})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", type=Path,
                    default=[OUT / "artifacts" / "bench-fp32", OUT / "artifacts" / "bench-uint8-int4"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(machine_line(read_bandwidth()))
    with tempfile.TemporaryDirectory() as xdg:
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": xdg}
        for art in args.artifacts:
            for backend, precision, cache in CASES.values():  # warm-up: hashes, auto's measurement, blobs
                load_seconds(art, backend, precision, cache, env)
            times: dict[str, list[float]] = {label: [] for label in CASES}
            labels = list(CASES)
            for r in range(args.rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    times[label].append(load_seconds(art, *CASES[label], env))
            print(f"\n{art.name}: load, median of {args.rounds} fresh processes (s)")
            for label, ts in times.items():
                print(f"  {label:<26} {statistics.median(ts):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
