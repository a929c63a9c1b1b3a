"""Side by side on the CPU, bench model (ViT-B/16 + Q-Former + OPT-125m shapes), batch 1, 20
forced new tokens: our runtime against transformers and two other inference engines.

    pip install -e '.[export,bench]'                         # openvino, ctranslate2: optional
    flock /tmp/blip2-heavy.lock python bench/peers.py --out bench/RESULTS.md

1. End to end: transformers eager `generate`, the same with torch.compile on each sub-model's
   forward, ours FP32, ours uint8 visual + INT8 LLM, ours uint8 visual + INT4 LLM, ours FP32
   visual + INT4 LLM (`quantize --visual none`); FP32's (and torch.compile's) tokens are checked
   against eager's on every round. The FP32, uint8 + INT4 and FP32 visual + INT4 artifacts again
   under --backend auto (its measurement made once before the rounds, the workers read it from
   the cache), with the placement it chose.
2. Per stage on the same ONNX files (vision, Q-Former, one decoder step at past length 42): ONNX
   Runtime as the pipeline builds it, OpenVINO f32 and OpenVINO bf16 (the precision hint set
   explicitly and read back; skipped where the CPU has no native bf16), with each OpenVINO
   output's cosine to ONNX Runtime's.
3. Decode per token: ours against CTranslate2 on the same OPT weights (float32, int8), and each
   against its floor: weight bytes read per step / read bandwidth measured in this run.

Every engine runs in its own process (bench/peers_workers.py), loaded and warmed up once; the
rounds are interleaved with a rotating order and a pause after each run, so one engine's
spinning threads never bias the next; medians over rounds. An engine that is not installed or
fails is skipped with its reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    OUT,
    REPO,
    ensure_fp32_artifacts,
    graph_weight_bytes,
    machine_line,
    read_bandwidth,
    timed,
)
from bench.peers_workers import E2E_ONLY_DIRS, VARIANT_DIRS, artifact, serve  # noqa: E402
from bench.quant_bench import VARIANTS  # noqa: E402
from runtime.host_cpu import cpu_model  # noqa: E402

OURS = {"ours FP32": "fp32", "ours uint8 visual + INT8 LLM": "uint8+int8", "ours uint8 visual + INT4 LLM": "uint8+int4",
        "ours FP32 visual + INT4 LLM": "fp32+int4"}
OURS_AUTO = {"ours FP32, --backend auto": "fp32/auto", "ours uint8 visual + INT4 LLM, --backend auto": "uint8+int4/auto",
             "ours FP32 visual + INT4 LLM, --backend auto": "fp32+int4/auto"}
E2E = {"transformers eager": "hf:eager", "transformers torch.compile": "hf:compile",
       **{k: f"ours:{v}" for k, v in {**OURS, **OURS_AUTO}.items()}}
STAGE_ENGINES = {"ONNX Runtime": "stages:ort", "OpenVINO f32": "stages:ov-f32", "OpenVINO bf16": "stages:ov-bf16"}
CT2 = {"CTranslate2 float32": "ct2:float32", "CTranslate2 int8": "ct2:int8"}


class Worker:
    """One engine's process; its protocol lines arrive through a queue so waits can time out."""

    def __init__(self, label: str, name: str, args):
        argv = [sys.executable, __file__, "--worker", name, "--new-tokens", str(args.new_tokens),
                "--stage-reps", str(args.stage_reps), "--stage-pause", str(args.stage_pause)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.label = label
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def answer(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            return {"skip": f"no answer within {timeout:.0f} s"}
        return msg if msg is not None else {"skip": f"process exited ({self.proc.wait()})"}

    def run(self, timeout: float) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def phase(engines: dict, args, ready_timeout: float) -> tuple[dict, dict, dict]:
    """Starts every engine, waits until all are warm, then interleaved rounds. Returns
    (ready info, per-engine list of run results, skipped engine -> reason)."""
    workers = {label: Worker(label, name, args) for label, name in engines.items()}
    info, skipped = {}, {}
    deadline = time.monotonic() + ready_timeout
    for label, w in workers.items():
        msg = w.answer(max(1.0, deadline - time.monotonic()))
        if "ready" in msg:
            info[label] = msg["ready"]
        else:
            skipped[label] = msg.get("skip", msg.get("error"))
            w.proc.kill()
            print(f"skipped {label}: {skipped[label]}", flush=True)
    live = [label for label in workers if label in info]
    results = {label: [] for label in live}
    time.sleep(args.pause)
    for r in range(args.rounds):
        for label in live[r % len(live):] + live[:r % len(live)] if live else []:
            if label in skipped:
                continue
            msg = workers[label].run(timeout=300)
            if "skip" in msg or "error" in msg:
                skipped[label] = msg.get("skip") or msg.get("error")
                print(f"skipped {label} (round {r + 1}): {skipped[label]}", flush=True)
            else:
                results[label].append(msg)
            time.sleep(args.pause)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    for w in workers.values():
        w.close()
    return info, {k: v for k, v in results.items() if k not in skipped}, skipped


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def cosine(a: list, b: list) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def ensure_artifacts(num_calib: int) -> None:
    """FP32 export and the two uint8-visual variants, made as bench/quant_bench.py makes them, and
    the FP32-visual + INT4 one (`quantize --visual none`);
    the per-stage comparison's concat-form decoders (peers_workers.stage_file)."""
    from bench.peers_workers import CONCAT_DECODERS, stage_file
    from calibration.llm import LLMOptions, quantize_decoder

    _, concat = ensure_fp32_artifacts("bench", kv_cache="concat")
    for variant, precision in CONCAT_DECODERS.items():
        target = stage_file(variant, "decoder")
        if precision is not None and not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            quantize_decoder(concat / "decoder.onnx", target, LLMOptions(precision=precision))
    _, fp32 = ensure_fp32_artifacts("bench")

    def quantize(art: Path, *flags: str) -> None:
        timed([sys.executable, "-m", "runtime.cli", "quantize", str(fp32), str(art), "--synthetic", str(num_calib),
               "--held-out", "16", "--no-gate", "--overwrite", *flags])

    for label, (activations, llm) in VARIANTS.items():
        art = OUT / "artifacts" / f"bench-{activations}-{llm}"
        # quantized again when written before quantize recorded each INT8 stage's fidelity (auto reads it)
        if activations == "uint8" and not recorded_fidelity(art):
            quantize(art, "--activations", activations, "--llm", llm,
                     "--calibration-cache", str(OUT / f"bench-ranges-{activations}.json"))
    if not (artifact("fp32+int4") / "manifest.json").is_file():
        quantize(artifact("fp32+int4"), "--visual", "none", "--llm", "int4")


def recorded_fidelity(art: Path) -> bool:
    """Whether `art` is a quantized directory whose INT8 vision stage records its fidelity."""
    try:
        vision = json.loads((art / "manifest.json").read_text())["stages"]["vision"]
    except (OSError, ValueError, KeyError):
        return False
    return "fidelity" in (vision.get("quantization") or {})


def report_e2e(lines: list, runs: dict, skipped: dict, floors: dict, n: int) -> bool:
    eager = runs.get("transformers eager")
    lines += ["| end to end | ms | speedup vs eager | tokens = eager (rounds) | decode ms/token | floor ms | x floor |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    all_identical = True
    for label in E2E:
        if label not in runs:
            lines.append(f"| {label} | skipped: {skipped.get(label)} | | | | | |")
            continue
        r = runs[label]
        total, step = med(r, "total"), med(r, "step")
        speed = f"{med(eager, 'total') / total:.2f}" if eager else "-"
        same = "-"
        if eager and label in ("ours FP32", "transformers torch.compile", "transformers eager"):
            hits = sum(a["tokens"] == b["tokens"] for a, b in zip(r, eager))
            all_identical &= hits == len(r) == len(eager)
            same = f"{hits}/{len(r)}"
        elif eager:
            same = f"{sum(a['tokens'] == b['tokens'] for a, b in zip(r, eager))}/{len(r)} (not required)"
        variant = OURS.get(label) or OURS_AUTO.get(label, "").split("/")[0]
        floor = floors.get(variant or ("fp32" if label.startswith("transformers") else ""))
        xf = f"{step / floor:.2f}" if floor else "-"
        lines.append(f"| {label} | {total * 1e3:.0f} | {speed} | {same} | {step * 1e3:.1f} | "
                     f"{floor * 1e3:.2f} | {xf} |" if floor else
                     f"| {label} | {total * 1e3:.0f} | {speed} | {same} | {step * 1e3:.1f} | - | - |")
    for label in {**OURS, **OURS_AUTO}:
        if label in runs:
            r = runs[label]
            lines.append(f"- {label} inside the pipeline: vision {med(r, 'vision') * 1e3:.1f} ms, Q-Former "
                         f"{med(r, 'qformer') * 1e3:.1f} ms, prefill {med(r, 'prefill') * 1e3:.1f} ms")
    return all_identical


def report_stages(lines: list, info: dict, runs: dict, skipped: dict) -> None:
    engines = [e for e in STAGE_ENGINES if e in runs]
    lines += ["", "| stage alone, ms (cosine to ORT on the same graph; to ORT FP32) | " + " | ".join(engines) + " |",
              "| --- |" + " --- |" * len(engines)]
    ort_samples = info.get("ONNX Runtime", {}).get("samples", {})
    for variant in VARIANT_DIRS:
        for stage in ("vision", "qformer", "decoder"):
            key = f"{variant} {stage}"
            # Every variant's stage reads the same seeded inputs (peers_workers.stage_feeds): the
            # cosine to the FP32 graph's output on ONNX Runtime compares engines at equal inputs.
            fp32 = ort_samples.get(f"fp32 {stage}") if variant != "fp32" else None
            cells = []
            for e in engines:
                if key not in runs[e][0]:
                    cells.append("failed: " + info[e]["skipped"].get(key, "?")[:80])
                    continue
                cell = f"{med(runs[e], key) * 1e3:.2f}"
                same = (f"{cosine(info[e]['samples'][key], ort_samples[key]):.5f}"
                        if e != "ONNX Runtime" and key in ort_samples else "")
                to_fp32 = f"FP32 {cosine(info[e]['samples'][key], fp32):.5f}" if fp32 is not None else ""
                if same or to_fp32:
                    cell += f" ({'; '.join(c for c in (same, to_fp32) if c)})"
                cells.append(cell)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for e in STAGE_ENGINES:
        if e in skipped:
            lines.append(f"- {e} skipped: {skipped[e]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stage-reps", type=int, default=5, help="runs of each stage per round (their median)")
    ap.add_argument("--stage-pause", type=float, default=0.3, help="seconds of idle before each stage's runs")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle after each engine's run")
    ap.add_argument("--compile-timeout", type=float, default=300, help="seconds allowed to load + warm up phase 1")
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--out", type=Path, help="append the results as a section of this markdown file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(args.worker, args)
        return 0

    ensure_artifacts(args.num_calib)
    # --backend auto measures the engines once per artifact and machine: here, on a quiet machine,
    # rather than in the workers while the others load (they then read the cache)
    measure = "from runtime.pipeline import Blip2Pipeline\nfor v in %r: Blip2Pipeline.from_artifacts(v, backend='auto')" % (
        [str(artifact(v.split("/")[0])) for v in OURS_AUTO.values()],)
    subprocess.run([sys.executable, "-c", measure], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    bw_before = read_bandwidth()
    floors = {v: graph_weight_bytes(artifact(v) / "decoder.onnx") / bw_before for v in {**VARIANT_DIRS, **E2E_ONLY_DIRS}}
    print("phase 1: end to end", flush=True)
    e2e_info, e2e, e2e_skip = phase(E2E, args, args.compile_timeout)
    print("phase 2: stages alone", flush=True)
    st_info, st_runs, st_skip = phase(STAGE_ENGINES, args, 300)
    print("phase 3: CTranslate2", flush=True)
    ct_skip = {}
    try:
        prep = subprocess.run([sys.executable, "-c", "from bench.peers_workers import prepare_ct2; prepare_ct2()"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=300)
        if prep.returncode != 0:
            raise RuntimeError((prep.stderr.strip().splitlines() or ["?"])[-1][:200])
        ct_info, ct_runs, ct_skip = phase(CT2, args, 120)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        ct_info, ct_runs = {}, {}
        ct_skip = {k: f"conversion failed: {exc}" for k in CT2}
    bw_after = read_bandwidth()

    n = args.new_tokens
    lines = [f"{machine_line(bw_before)} (before; {bw_after / 1e9:.1f} GB/s after); torch threads, ORT, OpenVINO, "
             f"CTranslate2 on every core; other processes share this machine",
             f"bench model, CPU, batch 1, {n} forced new tokens, {args.rounds} interleaved rounds (rotating order, "
             f"{args.pause:g} s pause after each run), medians; read bandwidth {bw_before / 1e9:.1f} GB/s before, "
             f"{bw_after / 1e9:.1f} GB/s after (floor = decoder weight bytes / the first)", ""]
    identical = report_e2e(lines, e2e, e2e_skip, floors, n)
    for label in OURS_AUTO:
        if label in e2e_info:
            lines.append(f"- {label} placement: " + "; ".join(f"{s}: {p}" for s, p in e2e_info[label]["placement"].items()))
    report_stages(lines, st_info, st_runs, st_skip)
    lines += ["", "| decode per token | ms | floor ms | x floor |", "| --- | --- | --- | --- |"]
    for label, variant in OURS.items():
        if label in e2e:
            s = med(e2e[label], "step")
            floor = floors[variant]
            lines.append(f"| {label} (in the pipeline) | {s * 1e3:.2f} | {floor * 1e3:.2f} | {s / floor:.2f} |")
        if "ONNX Runtime" in st_runs and variant in VARIANT_DIRS:  # E2E_ONLY_DIRS reuse another's decoder
            s = med(st_runs["ONNX Runtime"], f"{variant} decoder")
            lines.append(f"| ORT {variant} decoder step alone (past {42}) | {s * 1e3:.2f} | {floors[variant] * 1e3:.2f} | "
                         f"{s / floors[variant]:.2f} |")
    for label in CT2:
        if label in ct_runs:
            s, floor = med(ct_runs[label], "step"), ct_info[label]["weight_bytes"] / bw_before
            lines.append(f"| {label} {ct_info[label]['ct2']} | {s * 1e3:.2f} | {floor * 1e3:.2f} | {s / floor:.2f} |")
        else:
            lines.append(f"| {label} | skipped: {ct_skip.get(label)} | | |")
    if "transformers eager" in e2e:
        lines.append(f"| transformers eager ((20 - 1 token) / 19) | {med(e2e['transformers eager'], 'step') * 1e3:.2f} | | |")
    lines.append(f"\nFP32 (and torch.compile) tokens identical to transformers eager on every round: {identical}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        cmd = "flock /tmp/heavy.lock python bench/peers.py " + " ".join(sys.argv[1:])
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.out, "a") as f:
            f.write(f"\n## Peers on {cpu_model()}: transformers, OpenVINO, CTranslate2 ({stamp})\n\n`{cmd}`\n\n{text}\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
