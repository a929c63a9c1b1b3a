"""The device check (bench/gpu_check.sh and its Python parts) on this machine, which has no GPU:
its torch checks run here on the CPU (the exporter's real wrappers, real toy checkpoints, a real
fp16 export on ONNX Runtime), and a run that tested nothing on the GPU never exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check_report as report
from bench import gpu_torch_check as check
from tests.conftest import REPO

HAS_CUDA = check.has(check.capabilities(), "torch-cuda")


def test_the_dry_run_checks_every_family_on_the_cpu_and_says_nothing_was_tested_on_the_gpu(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_torch_check", "--device", "cpu", "--quick", "--json", out],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    capabilities = [line.split(":")[0] for line in lines if line.startswith("capability ")]
    assert {"capability torch-cuda", "capability onnxruntime", "capability tensorrt", "capability cuda-python"} \
        <= set(capabilities)
    assert lines.index(next(line for line in lines if line.startswith("capability "))) < \
        lines.index(next(line for line in lines if line.startswith(("PASS", "FAIL", "SKIP"))))
    assert "nothing was tested on the GPU (dry run on the CPU)" in proc.stdout
    results = {r["name"]: r for r in json.loads(out.read_text())["checks"]}
    for name in ("fp16-opt-toy", "fp16-t5-toy", "fp16-llama-toy", "fp16-export-opt", "fp16-export-llama"):
        assert results[name]["status"] == "pass" and results[name]["device"] == "cpu", results[name]
    decoder = results["fp16-opt-toy"]["metrics"]["stages"]["decoder"]["outputs"]["logits"]
    assert decoder["finite"] and decoder["cosine"] >= 0.99 and decoder["argmax_agreement"] > 0.5


@pytest.mark.skipif(HAS_CUDA, reason="here torch has CUDA: the check would run for real")
def test_gpu_check_without_a_gpu_exits_non_zero_with_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "nothing was tested on the GPU" in proc.stdout and "capability torch-cuda: no" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.json" in files and "gpu_check.log" in files
    assert json.loads((out / "summary.json").read_text())["exit"] == 3
    assert "nothing was tested on the GPU" in (out / "gpu_check.log").read_text()


def test_a_wrapper_that_differs_in_fp16_is_a_failure_for_every_family_exported_in_fp16():
    import torch

    toys = check.toy_checkpoints()
    model32, model16 = check.load_toy(toys["opt"], torch.float32), check.load_toy(toys["opt"], torch.float16)
    assert check.check_wrappers(model32, model16, "cpu", "the opt toy")["status"] == "pass"
    with torch.no_grad():  # an fp16 decoder that is not the fp32 one
        model16.get_output_embeddings().weight.copy_(torch.randn_like(model16.get_output_embeddings().weight))
    result = check.check_wrappers(model32, model16, "cpu", "the opt toy")
    assert result["status"] == "fail" and "decoder logits: cosine" in result["detail"]
    t5_32, t5_16 = check.load_toy(toys["t5"], torch.float32), check.load_toy(toys["t5"], torch.float16)
    with torch.no_grad():
        t5_16.get_output_embeddings().weight.copy_(torch.randn_like(t5_16.get_output_embeddings().weight))
    result = check.check_wrappers(t5_32, t5_16, "cpu", "the t5 toy")  # T5 is exported in fp16 too now
    assert result["status"] == "fail" and result["metrics"]["fp16_exported"]


def test_the_full_modes_verdict_from_a_real_junit_report_and_doctor_report(tmp_path):
    junit = tmp_path / "gpu-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--junitxml",
                           junit, "tests/runtime/test_devices.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    counts = report.junit_counts(junit)
    assert counts["passed"] == 0 and counts["skipped"] >= 1 and counts["skip_reasons"]
    status, line = report.verdict({"export": 0, "gpu-tests": 0}, counts, {})
    assert status == 3 and line.startswith("nothing was tested on the GPU")
    assert report.verdict({"doctor": 1, "gpu-tests": 0}, counts, {})[0] == 1  # a failure wins, and says both
    assert "nothing was tested on the GPU" in report.verdict({"doctor": 1}, counts, {})[1]
    assert report.verdict({"gpu-tests": 0}, {**counts, "passed": 1}, {}) == (0, "passed on the GPU: 1 tests, doctor ")
    assert report.junit_counts(tmp_path / "missing.xml")["passed"] == 0
    # doctor: the machine checks (TensorRT installed) are not GPU runs; the backends after the build are
    doctor = tmp_path / "doctor.json"
    checks = [{"name": "gpu", "status": "pass"}, {"name": "tensorrt", "status": "pass"},
              {"name": "build-engines", "status": "fail"}, {"name": "artifact", "status": "pass"},
              {"name": "cpu", "status": "pass"}, {"name": "cuda", "status": "pass"}, {"name": "tensorrt", "status": "skip"}]
    doctor.write_text(json.dumps({"environment": {}, "checks": checks[:2]}))
    assert report.doctor_gpu_checks(doctor) == {}
    doctor.write_text(json.dumps({"environment": {}, "checks": checks}))
    assert report.doctor_gpu_checks(doctor) == {"build-engines": "fail", "cuda": "pass", "tensorrt": "skip"}
    assert report.verdict({"doctor": 0}, counts, report.doctor_gpu_checks(doctor))[0] == 0
