"""Export wall time and peak RSS, per model size, each export in its own process.

    python bench/export_bench.py                 # bench (fp32, validated) and full (fp16)
    python bench/export_bench.py --sizes bench

Random-weight checkpoints are built once under bench/out/models/. `full` (blip2-opt-2.7b shapes)
is built directly in fp16 to spare this machine's disk, and exported without validation:
validation runs PyTorch and ONNX Runtime side by side on the CPU, and the CPU has no fast fp16
kernels for a 2.7B decoder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, dir_size, machine, timed  # noqa: E402

RUNS = {"bench": ("fp32", True), "full": ("fp16", False)}


def build(size: str, dtype: str) -> tuple[Path, float, int]:
    ckpt = OUT / "models" / size
    if (ckpt / "config.json").is_file():
        return ckpt, 0.0, 0
    code = (f"import torch; from exporter.random_models import make_model; "
            f"make_model({size!r}, {str(ckpt)!r}, dtype={dtype!r})")
    return (ckpt, *timed([sys.executable, "-c", code]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        dtype, validate = RUNS[size]
        ckpt, build_s, build_rss = build(size, dtype)
        art = OUT / "artifacts" / f"{size}-{dtype}"
        cmd = [sys.executable, "-m", "runtime.cli", "export", str(ckpt), str(art), "--overwrite", "--dtype", dtype]
        if not validate:
            cmd.append("--no-validate")
        wall, rss = timed(cmd)
        rows.append((size, dtype, "yes" if validate else "no", dir_size(ckpt), wall, rss, dir_size(art)))
    print(f"\nmachine: {machine()}")
    print(f"{'model':<7}{'dtype':<7}{'validated':<11}{'checkpoint GB':>14}{'export s':>10}{'peak RSS GB':>13}"
          f"{'artifacts GB':>14}")
    for size, dtype, val, ck, wall, rss, art in rows:
        print(f"{size:<7}{dtype:<7}{val:<11}{ck / 1e9:>14.2f}{wall:>10.1f}{rss / 1e9:>13.2f}{art / 1e9:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
