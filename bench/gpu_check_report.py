"""The verdict of `bench/gpu_check.sh --full`: what ran on the GPU, from pytest's JUnit XML of
the tests marked `gpu` and from doctor's JSON report, written as summary.json.

    python -m bench.gpu_check_report --junit gpu-tests.xml --doctor doctor.json \
        --step export=0 --step doctor=1 --step gpu-tests=0 --json summary.json

Exit status: the first failing step's (a test that failed, a doctor check that failed); 3 when
nothing failed but nothing was tested on the GPU either (every GPU test and every GPU backend
of doctor skipped: no GPU, no TensorRT, no onnxruntime-gpu); 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

NOTHING_ON_GPU = "nothing was tested on the GPU"
# doctor's checks that run on the GPU (runtime/doctor/runs.py and cli.py)
DOCTOR_GPU = ("build-engines", "cuda", "tensorrt", "onnxruntime-trt")


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped test cases, and the skip reasons (first 5) of a JUnit XML file;
    all zero when the file is missing or unreadable (the step that should have written it failed)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            if reason and reason not in counts["skip_reasons"] and len(counts["skip_reasons"]) < 5:
                counts["skip_reasons"].append(reason)
        else:
            counts["passed"] += 1
    return counts


def doctor_gpu_checks(path: Path) -> dict[str, str]:
    """doctor's GPU runs and their status (pass / fail / skip); empty when there is no report.
    Only the checks from the engine build on count: the machine checks before them ("tensorrt":
    TensorRT is installed) test nothing on the GPU."""
    try:
        checks = json.loads(Path(path).read_text())["checks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out, runs = {}, False
    for c in checks:
        if not isinstance(c, dict):
            continue
        runs = runs or c.get("name") in ("build-engines", "artifact")
        if runs and c.get("name") in DOCTOR_GPU:
            out[c["name"]] = c.get("status")
    return out


def verdict(steps: dict[str, int], tests: dict, doctor: dict[str, str]) -> tuple[int, str]:
    """(exit status, closing line) from each step's exit status, the GPU tests and doctor's GPU checks."""
    failed = [name for name, rc in steps.items() if rc != 0]
    on_gpu = tests["passed"] + sum(status == "pass" for status in doctor.values())
    nothing = "" if on_gpu else f"; {NOTHING_ON_GPU}"
    if failed:
        return steps[failed[0]], f"failed: {', '.join(failed)}{nothing}"
    if not on_gpu:
        why = "; ".join(tests["skip_reasons"][:2]) or "no GPU test ran"
        return 3, f"{NOTHING_ON_GPU} (every GPU test and doctor GPU check skipped: {why})"
    return 0, f"passed on the GPU: {tests['passed']} tests, doctor {', '.join(k for k, v in doctor.items() if v == 'pass')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--junit", type=Path, required=True)
    ap.add_argument("--doctor", type=Path, required=True)
    ap.add_argument("--step", action="append", default=[], metavar="NAME=STATUS", help="a step's exit status")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    steps = {name: int(rc) for name, rc in (s.split("=", 1) for s in args.step)}
    tests, doctor = junit_counts(args.junit), doctor_gpu_checks(args.doctor)
    status, line = verdict(steps, tests, doctor)
    print(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped; doctor on the GPU: "
          f"{', '.join(f'{k} {v}' for k, v in doctor.items()) or 'no report'}")
    print(f"gpu_check --full: {line}")
    if args.json:
        args.json.write_text(json.dumps({"mode": "full", "steps": steps, "gpu_tests": tests, "doctor_gpu": doctor,
                                         "exit": status, "verdict": line}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
