"""`blip2-edge doctor [DIR]`: the smoke test to run first on a new device.

It reports the machine (Python, ONNX Runtime and its providers, TensorRT, cuda-python, the
CUDA driver and runtime, the GPU, JetPack and the power mode on a Jetson) and checks what the
TensorRT backend needs; with an artifact directory it verifies it, captions synthetic images on
the CPU, and runs each GPU backend the machine allows against the CPU (runs.py). Every
check is pass, fail or skip with the reason (and what to install). Exit 0 when nothing failed,
else 1 with one line per problem on stderr; --json FILE writes the whole report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runtime.artifact.atomic_file import replace_file
from runtime.cli.outputs import check_output_file
from runtime.doctor.environment import FAIL, PASS, SKIP, Check, environment_checks, probe

EXIT_PROBLEMS = 1


def register(sub) -> None:
    from runtime.doctor.runs import BACKENDS

    p = sub.add_parser("doctor", help="report what this machine can run, and check it on an artifact directory",
                       description="Report versions and devices; with ARTIFACTS, verify the directory, caption on the "
                                   "CPU and compare every GPU backend this machine allows with it.")
    p.add_argument("artifacts", type=Path, nargs="?")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=[],
                   help="check only these (a backend named here that cannot run is a failure, not a skip)")
    p.add_argument("--build-engines", action="store_true",
                   help="build the TensorRT engines first (with a timing cache under ARTIFACTS/engines/)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON ('-': stdout)")
    p.set_defaults(run=run)


def build_engines(artifacts: Path) -> Check:
    """Builds the visual stages' engines with the real command, in a child process (a crash in
    TensorRT ends that process, not the doctor)."""
    cache = artifacts / "engines" / "timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "runtime.cli", "build-engines", str(artifacts),
                               "--timing-cache", str(cache), "--contexts", "2", "--no-tf32"],
                              capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return Check("build-engines", FAIL, "did not finish within an hour")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return Check("build-engines", FAIL, last.removeprefix("error: "))
    return Check("build-engines", PASS, f"engines built without TF32 (for the comparisons), timing cache {cache}")


def report(artifacts: Path | None, backends: tuple[str, ...], build: bool) -> dict:
    from runtime.doctor.runs import ArtifactRun, strict_fp32

    tf32_note = strict_fp32() if artifacts is not None else None  # before any GPU library is loaded
    env = probe()
    if tf32_note:
        env.notes.append(tf32_note)
    checks = environment_checks(env)
    if artifacts is not None:
        if build:
            checks.append(build_engines(artifacts))
        checks.extend(ArtifactRun(artifacts, env, backends).run())
    elif backends:
        checks.append(Check("artifacts", FAIL, "--backend checks need an artifact directory: blip2-edge doctor DIR"))
    return {"environment": env.as_dict(), "checks": [c.__dict__ for c in checks]}


def format_text(data: dict) -> str:
    env = data["environment"]
    lines = [f"python {env['python']} on {env['platform']}",
             f"onnxruntime {env['onnxruntime'] or 'not installed'}: {', '.join(env['providers']) or 'no providers'}",
             f"tensorrt {env['tensorrt'] or 'not installed'}; cuda-python {env['cuda_python'] or 'not installed'}; "
             f"CUDA driver {env['cuda_driver'] or '?'}, cuda-python built for CUDA {env['cuda_runtime'] or '?'}",
             f"gpu: {env['gpu'] + ' (sm ' + str(env['compute_capability']) + ')' if env['gpu'] else 'none'}"]
    if env["jetson"]:
        j = env["jetson"]
        lines.append(f"jetson: L4T {j['l4t']}, JetPack {j['jetpack']}, power mode {j.get('power_mode') or '?'}")
    lines += [f"note: {n}" for n in env["notes"]]
    lines.append("")
    for c in data["checks"]:
        lines.append(f"{c['status'].upper():<5} {c['name']}: {c['detail']}")
    return "\n".join(lines)


def run(args) -> int:
    if args.json is not None and str(args.json) != "-":
        check_output_file("--json", args.json)  # before the checks, which it would otherwise lose
    data = report(args.artifacts, tuple(args.backend), args.build_engines)
    if args.json is not None and str(args.json) == "-":
        print(json.dumps(data, indent=2))
    else:
        print(format_text(data))
        if args.json is not None:
            replace_file(args.json, (json.dumps(data, indent=2) + "\n").encode())
    problems = [c for c in data["checks"] if c["status"] == FAIL]
    for c in problems:
        print(f"problem: {c['name']}: {' '.join(c['detail'].split())}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else 0


__all__ = ["register", "run", "report", "PASS", "FAIL", "SKIP"]
