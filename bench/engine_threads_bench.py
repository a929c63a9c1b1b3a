"""Threads across engines: with the visual stages on OpenVINO and the decoder on ONNX Runtime
(what --backend auto chooses on a bf16 CPU), do the two engines' thread pools fight?

    flock /tmp/heavy.lock python bench/engine_threads_bench.py --out bench/THREADS_RESULTS.md

Each run captions IMAGES images one after another (batch 1, forced new tokens), so every image
after the first starts its OpenVINO vision stage right after ONNX Runtime's decode steps, as a
caption loop or a server does; the stages of those images are what the table shows. Settings,
each a pipeline of its own (runtime.backends.threads.ThreadSettings for ONNX Runtime's side):
- policy: only the decoder's ONNX Runtime threads spin, and only during a run
  (session.force_spinning_stop: they stop when a step returns); both engines one thread per
  core (one count for both: --intra-op-threads); OpenVINO's CPU pinning at its default (on);
- OV pinning off: the policy with OpenVINO's threads not pinned (ENABLE_CPU_PINNING off);
- lingering: the decoder's threads keep spinning after each step returns, into the next
  image's OpenVINO vision stage (ONNX Runtime's behaviour, this project's before issue 24);
- ORT spin off: no ONNX Runtime stage spins (the decoder's threads sleep inside a step too);
- all ONNX Runtime, with the policy and lingering: the same two without a second engine.
(ORT spin on is not a row: with the visual stages on OpenVINO it differs from auto in nothing.)
All pipelines live in one process and run in rounds with a rotating order and a pause between
pipelines (not between a pipeline's images); medians; tokens checked against the first run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT, machine_line  # noqa: E402
from bench.threads_bench import busy_cpu_seconds, table_rows  # noqa: E402
from runtime import synthetic  # noqa: E402

STAGES = ("vision", "qformer", "prefill", "decode_step", "total")
# label -> (backend, ThreadSettings fields)
SETTINGS = {"policy": ("openvino", {}),
            "OV pinning off": ("openvino", {"openvino_pinning": False}),
            "lingering": ("openvino", {"linger": True}),
            "ORT spin off": ("openvino", {"spin": "off"}),
            "all ONNX Runtime, policy": ("onnxruntime", {}),
            "all ONNX Runtime, lingering": ("onnxruntime", {"linger": True})}


def load(path: Path, backend: str, settings: dict, precision: str, threads: int):
    from runtime.backends.threads import ThreadSettings
    from runtime.pipeline import Blip2Pipeline

    return Blip2Pipeline.from_artifacts(path, backend=backend, precision=precision if backend == "openvino" else "f32",
                                        threads=ThreadSettings(intra_op_threads=threads, **settings))


def main() -> int:
    from runtime.backends.openvino import cpu_flags, native_precisions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--images", type=int, default=3, help="images captioned back to back per run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between pipelines")
    ap.add_argument("--intra-op-threads", type=int, default=0, help="both engines' threads (0: one per core)")
    ap.add_argument("--out", type=Path, help="append the table as Markdown here")
    args = ap.parse_args()

    bf16 = "bf16" in native_precisions(cpu_flags() or frozenset())
    dirs = {f"FP32, visual OpenVINO {'bf16' if bf16 else 'f32'}": (OUT / "artifacts" / "bench-fp32", "bf16" if bf16 else "f32"),
            "uint8 visual + INT4 LLM, visual OpenVINO f32": (OUT / "artifacts" / "bench-uint8-int4", "f32")}
    for path, _ in dirs.values():
        if not (path / "manifest.json").is_file():
            raise SystemExit(f"{path} is missing: run bench/peers.py once (it builds the bench artifacts)")
    pipes = {(d, s): load(path, backend, settings, precision, args.intra_op_threads)
             for d, (path, precision) in dirs.items() for s, (backend, settings) in SETTINGS.items()}
    images = [im for _, im in synthetic.make_scenes(args.images, seed=99)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, stop_strings=())

    def run(key):
        time.sleep(args.pause)
        return [pipes[key].caption([im], **gen)[0] for im in images]

    keys = list(pipes)
    for _ in range(args.warmup):
        for k in keys:
            run(k)
    reference = {k: [r.tokens for r in run(k)] for k in keys}
    times = {k: {s: [] for s in STAGES} for k in keys}
    mismatches = 0
    cpu_before, t_before = busy_cpu_seconds(), time.perf_counter()
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            results = run(k)
            mismatches += [x.tokens for x in results] != reference[k]
            for result in results[1:]:  # the images that follow a decoder
                t = result.timings
                for s, v in (("vision", t["vision"]), ("qformer", t["qformer"]), ("prefill", t["prefill"]),
                             ("decode_step", statistics.median(t["decode_steps"])), ("total", t["total"])):
                    times[k][s].append(v)
        print(f"  round {r + 1}/{args.rounds}", flush=True)
    (all_after, own_after), wall = busy_cpu_seconds(), time.perf_counter() - t_before
    others = max(0.0, (all_after - cpu_before[0]) - (own_after - cpu_before[1])) / wall
    med = {k: {s: statistics.median(v) * 1e3 for s, v in t.items()} for k, t in times.items()}

    first = next(iter(SETTINGS))
    lines = [machine_line(),
             f"bench model, CPU, batch 1, {args.new_tokens} forced new tokens, {args.images} images back to back per "
             f"run (the table: images 2..{args.images}, which follow a decoder), {args.rounds} rounds after "
             f"{args.warmup} warm-up, rotating order, {args.pause:g} s pause between pipelines, medians (ms); threads "
             f"per engine: {args.intra_op_threads or 'one per core'}; tokens identical to each pipeline's first run on "
             f"every run: {mismatches == 0}; other processes used {others:.2f} cores meanwhile", "",
             "| artifacts | setting | vision | qformer | prefill | decode/token | image end to end | vs policy |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += table_rows(med, dirs, SETTINGS, first)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(f"\n```\nflock /tmp/heavy.lock python bench/engine_threads_bench.py {' '.join(sys.argv[1:])}\n```\n\n"
                    f"{text}\n")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
