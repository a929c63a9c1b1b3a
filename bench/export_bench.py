"""Export (with validation) and INT4 quantize of random-weight checkpoints: wall time, peak RSS,
artifact size, each run in its own child process, with the up-front estimate beside each peak.

    python bench/export_bench.py                                    # tiny and bench (OPT), fp32 and fp16
    python bench/export_bench.py --shapes bench bench-t5 bench-llama --dtypes fp32
    python bench/export_bench.py --shapes blip2-opt-2.7b --dtypes fp16
    python bench/export_bench.py --shapes blip2-opt-2.7b --dtypes fp16 --no-validate --no-quantize

A shape is tiny, bench or full with an optional LLM (bench-t5, tiny-llama, full-opt), an
InstructBLIP one (bench-instructblip-t5), or a released checkpoint's name (blip2-flan-t5-xl,
instructblip-vicuna-7b, ...: exporter/random_models.py's RELEASED). Checkpoints are built once
under bench/out/models/ by `make-model` (tiny and bench in fp32, full and released shapes in
fp16 shards, as the hub's), artifacts go to bench/out/artifacts/.

Peak RSS is the child's own high-water mark (wait4's ru_maxrss). The per-phase peaks come from
sampling the child's VmRSS every 20 ms between the lines it prints (loaded, exported <stage>,
validation, wrote): they show where the peak is, the headline figure is ru_maxrss. The estimate
is what `export` / `quantize` print before loading anything (exporter/memory_estimate.py,
calibration/memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, REPO, dir_size, machine  # noqa: E402

SIZES = ("tiny", "bench", "full")
CLI = [sys.executable, "-m", "runtime.cli"]


def parse_shape(shape: str) -> tuple[str, str | None, str | None]:
    """(make-model size or released name, llm, arch) of a shape name."""
    from exporter.random_models import RELEASED

    if shape in RELEASED:
        return shape, None, None
    size, *rest = shape.split("-")
    arch = None
    if rest and rest[0] == "instructblip":
        arch, rest = "instructblip", rest[1:]
    if size not in SIZES or len(rest) > 1:
        raise SystemExit(f"unknown shape {shape!r}: tiny|bench|full[-instructblip][-opt|-t5|-llama] or one of "
                         f"{', '.join(RELEASED)}")
    return size, (rest[0] if rest else None), arch


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process: all its resident pages, and those not backed by a file (the
    rest, RssFile, are mapped files: safetensors weights torch maps without copying, which the
    kernel can drop and read again under memory pressure)."""
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, anon


def run_child(cmd: list[str]) -> dict:
    """Runs `cmd`, echoing its output; returns wall seconds, peak RSS (ru_maxrss) and the sampled
    peak RSS of each phase (the span up to each line it printed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    current = {"peak": 0, "anon": 0, "anon_max": 0}
    lock = threading.Lock()
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, anon = _rss(proc.pid)
            with lock:
                current["peak"] = max(current["peak"], rss)
                current["anon"] = max(current["anon"], anon)
                current["anon_max"] = max(current["anon_max"], anon)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    phases, tail = [], []
    for line in proc.stdout:
        print("    | " + line.rstrip(), flush=True)
        tail.append(line.rstrip())
        with lock:
            phases.append((line.strip()[:60], current["peak"], current["anon"]))
            current["peak"], current["anon"] = _rss(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"ok": code == 0, "code": code, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,
            "peak_anon": current["anon_max"], "phases": phases, "last_line": tail[-1] if tail else ""}


def checkpoint(shape: str) -> tuple[Path, float]:
    size, llm, arch = parse_shape(shape)
    ckpt = OUT / "models" / shape
    if (ckpt / "config.json").is_file():
        return ckpt, 0.0
    cmd = [*CLI, "make-model", size, str(ckpt)]
    cmd += ["--llm", llm] if llm else []
    cmd += ["--arch", arch] if arch else []
    result = run_child(cmd)
    if not result["ok"]:
        raise SystemExit(f"make-model {shape} failed: {result['last_line']}")
    return ckpt, result["wall_s"]


def export_estimate(ckpt: Path, dtype: str, validate: bool) -> dict:
    """export's own estimate: anonymous peak, and with the checkpoint's mapped weights."""
    from transformers import AutoConfig

    from exporter.memory_estimate import export_peak, stored_sizes

    return export_peak(AutoConfig.from_pretrained(ckpt), dtype, validate, stored=stored_sizes(ckpt))


def quantize_estimate(art: Path) -> int:
    from calibration.memory import quantize_peak
    from runtime.artifact.manifest import load_manifest

    return quantize_peak(load_manifest(art, verify=False), "int4")["peak"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--no-quantize", dest="quantize", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts (default: removed after each run)")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        ckpt, build_s = checkpoint(shape)
        for dtype in args.dtypes:
            art = OUT / "artifacts" / f"{shape}-{dtype}"
            row = {"shape": shape, "dtype": dtype, "validated": args.validate, "checkpoint_bytes": dir_size(ckpt),
                   "build_s": build_s, "export_estimate": export_estimate(ckpt, dtype, args.validate)}
            cmd = [*CLI, "export", str(ckpt), str(art), "--overwrite", "--dtype", dtype]
            cmd += [] if args.validate else ["--no-validate"]
            print(f"\n== export {shape} {dtype}", flush=True)
            row["export"] = run_child(cmd)
            row["artifact_bytes"] = dir_size(art) if art.is_dir() else 0
            # Each export's figures printed and saved as soon as it ends: a long quantize stopped
            # by hand keeps them.
            print(f"   export: {row['export']['wall_s']:.1f} s, peak {row['export']['peak_rss'] / 1e9:.2f} GB, "
                  f"anonymous {row['export']['peak_anon'] / 1e9:.2f} GB", flush=True)
            (OUT / "export_bench.json").write_text(json.dumps(rows + [row], indent=1) + "\n")
            if args.quantize and row["export"]["ok"]:
                q = OUT / "artifacts" / f"{shape}-{dtype}-int4"
                row["quantize_estimate"] = quantize_estimate(art)
                print(f"\n== quantize {shape} {dtype} -> int4", flush=True)
                row["quantize"] = run_child([*CLI, "quantize", str(art), str(q), "--llm", "int4", "--synthetic", "8",
                                             "--held-out", "4", "--no-gate", "--overwrite"])
                row["quantized_bytes"] = dir_size(q) if q.is_dir() else 0
                if not args.keep:
                    subprocess.run(["rm", "-rf", str(q)], check=False)
            if not args.keep:
                subprocess.run(["rm", "-rf", str(art)], check=False)
            rows.append(row)
    (OUT / "export_bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nmachine: {machine()}")
    print("GB = 1e9 bytes. peak: the child's ru_maxrss (VmHWM: anonymous + mapped files); anon: its sampled "
          "RssAnon peak; est.: the estimate export / quantize print, anonymous (+ mapped checkpoint)")
    print(f"{'shape':<24}{'dtype':<6}{'val.':<5}{'ckpt':>6}{'export s':>9}{'peak':>7}{'anon':>7}{'est.':>7}"
          f"{'+mapped':>8}{'art.':>6} |{'INT4 s':>7}{'peak':>7}{'anon':>7}{'est.':>7}{'int4':>6}")
    for r in rows:
        e, est = r["export"], r["export_estimate"]
        q = r.get("quantize")
        qcols = (f"{q['wall_s']:>7.1f}{q['peak_rss'] / 1e9:>7.2f}{q['peak_anon'] / 1e9:>7.2f}"
                 f"{r['quantize_estimate'] / 1e9:>7.2f}{r['quantized_bytes'] / 1e9:>6.2f}"
                 + ("" if q["ok"] else f"  (quantize failed: {q['last_line'][:70]})")) if q else f"{'-':>7}" * 4
        status = "" if e["ok"] else f"  (export failed, exit {e['code']}: {e['last_line'][:70]})"
        print(f"{r['shape']:<24}{r['dtype']:<6}{'yes' if r['validated'] else 'no':<5}"
              f"{r['checkpoint_bytes'] / 1e9:>6.2f}{e['wall_s']:>9.1f}{e['peak_rss'] / 1e9:>7.2f}"
              f"{e['peak_anon'] / 1e9:>7.2f}{est['peak'] / 1e9:>7.2f}{est['rss'] / 1e9:>8.2f}"
              f"{r['artifact_bytes'] / 1e9:>6.2f} |{qcols}{status}")
    print("\nper-phase peak RSS / of which anonymous (GB; sampled every 20 ms up to each line the child printed):")
    for r in rows:
        for what in ("export", "quantize"):
            if what in r:
                spans = "; ".join(f"{text.split('(')[0].strip()[:28]} {rss / 1e9:.2f}/{anon / 1e9:.2f}"
                                  for text, rss, anon in r[what]["phases"] if rss)
                print(f"  {what} {r['shape']} {r['dtype']}: peak anonymous {r[what]['peak_anon'] / 1e9:.2f}; {spans}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
