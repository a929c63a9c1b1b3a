"""ONNX Runtime thread spinning per stage: does one stage's spinning slow the next?

    python bench/threads_bench.py                       # bench model, FP32 and uint8 visual + INT4 LLM
    python bench/threads_bench.py --out bench/THREADS_RESULTS.md

ORT's intra-op threads spin for a while after a run; the next stage's session then waits for
the cores. Each artifact directory is loaded once per thread setting (runtime.backends.onnxrt.
ThreadSettings):
- on:   every stage spins (ONNX Runtime's own default, the pipeline's behaviour before);
- auto: the stages that run once per request (vision, qformer) don't, the decoder does;
- off:  no stage spins;
- visual on, decoder off: the fourth combination.
All pipelines run one after another in rounds with a rotating order and a pause between runs
(so one pipeline's spinning threads never bias the next), batch 1, forced new tokens; medians
per stage; every run's tokens must equal the first run's of the same directory.
The uint8 + INT4 directory is made once with `blip2-edge quantize --target cpu --llm int4`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, ensure_fp32_artifacts, machine, timed  # noqa: E402
from runtime import synthetic  # noqa: E402

SETTINGS = {"on": (("vision", True), ("qformer", True), ("decoder", True)),
            "auto": (("vision", False), ("qformer", False), ("decoder", True)),
            "off": (("vision", False), ("qformer", False), ("decoder", False)),
            "visual on, decoder off": (("vision", True), ("qformer", True), ("decoder", False))}
STAGES = ("vision", "qformer", "prefill", "decode_step", "total")


def ensure_uint8_int4(fp32: Path, num_calib: int) -> Path:
    art = OUT / "artifacts" / "bench-uint8-int4"
    if not (art / "manifest.json").is_file():
        timed([sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(art), "--synthetic", str(num_calib),
               "--target", "cpu", "--llm", "int4", "--held-out", "8", "--no-gate", "--overwrite"])
    return art


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process has used, CPU seconds this one has), from /proc/stat and
    os.times: their difference over a run is what other processes took from the cores."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def stage_times(result) -> dict:
    t = result.timings
    return {"vision": t["vision"], "qformer": t["qformer"], "prefill": t["prefill"],
            "decode_step": statistics.median(t["decode_steps"]), "total": t["total"]}


def table_rows(med: dict, dirs, settings, base_setting: str) -> list[str]:
    """One Markdown row per (directory, setting) of medians in ms (med[(d, s)][stage]), with
    end to end as a ratio to `base_setting`'s (engine_threads_bench.py uses it too)."""
    rows = []
    for d in dirs:
        base = med[(d, base_setting)]["total"]
        for s in settings:
            m = med[(d, s)]
            rows.append(f"| {d} | {s} | {m['vision']:.1f} | {m['qformer']:.1f} | {m['prefill']:.1f} | "
                        f"{m['decode_step']:.2f} | {m['total']:.1f} | x{m['total'] / base:.2f} |")
    return rows


def main() -> int:
    from runtime.backends.threads import ThreadSettings
    from runtime.pipeline import Blip2Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-calib", type=int, default=32, help="calibration images for the uint8 directory")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between runs (spinning threads settle)")
    ap.add_argument("--intra-op-threads", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()

    _, fp32 = ensure_fp32_artifacts("bench")
    dirs = {"FP32": fp32, "uint8 visual + INT4 LLM": ensure_uint8_int4(fp32, args.num_calib)}
    settings = SETTINGS
    pipes = {(d, s): Blip2Pipeline.from_artifacts(
                 path, threads=ThreadSettings(spin="on", intra_op_threads=args.intra_op_threads, stage_spin=spin))
             for d, path in dirs.items() for s, spin in settings.items()}
    image = synthetic.make_scenes(1, seed=99)[0][1]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, stop_strings=())

    def run(key):
        time.sleep(args.pause)
        return pipes[key].caption([image], **gen)[0]

    keys = list(pipes)
    cpu_before, t_before = busy_cpu_seconds(), time.perf_counter()
    for _ in range(args.warmup):
        for k in keys:
            run(k)
    reference = {d: run((d, "on")).tokens for d in dirs}
    times = {k: {s: [] for s in STAGES} for k in keys}
    mismatches = 0
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotating order
            result = run(k)
            mismatches += result.tokens != reference[k[0]]
            for s, v in stage_times(result).items():
                times[k][s].append(v)
    (all_after, own_after), wall = busy_cpu_seconds(), time.perf_counter() - t_before
    others = max(0.0, (all_after - cpu_before[0]) - (own_after - cpu_before[1])) / wall
    med = {k: {s: statistics.median(v) * 1e3 for s, v in t.items()} for k, t in times.items()}

    lines = [f"machine: {machine()}",
             f"bench model (ViT-B/16 + 12-layer Q-Former + OPT-125m shapes), CPU, batch 1, {args.new_tokens} new "
             f"tokens, intra-op threads {args.intra_op_threads or 'ORT default'}; medians (ms) of {args.rounds} "
             f"rounds after {args.warmup} warm-up, rotating order, {args.pause}s pause between runs; tokens identical "
             f"to the first run on every run: {mismatches == 0} ({mismatches} mismatches); "
             f"other processes used {others:.2f} of the "
             f"{os.cpu_count()} cores meanwhile (they bias spinning threads)", "",
             "| artifacts | spinning | vision | qformer | prefill | decode/token | end to end | vs on |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += table_rows(med, dirs, settings, "on")
    text = "\n".join(lines)
    print(text)
    if args.out:  # appended: several runs (thread counts) go in one file
        with args.out.open("a") as f:
            f.write(f"```\npython bench/threads_bench.py {' '.join(sys.argv[1:])}\n```\n\n{text}\n\n")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
