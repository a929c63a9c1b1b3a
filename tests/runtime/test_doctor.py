"""`blip2-edge doctor`: the CPU path for real (artifact verified, captions on the CPU, two
threads against one after the other); the GPU backends report 'skip' with what to install, or
'fail' when asked for by name; version problems are one line each."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.doctor.environment import FAIL, PASS, SKIP, Environment, environment_checks, jetson_release
from runtime.errors import install_command
from tests.conftest import run_cli


def env(**kw) -> Environment:
    base = dict(python="3.10.12", platform="Linux aarch64", onnxruntime="1.20.0", providers=["CPUExecutionProvider"],
                tensorrt=None, cuda_python=None)
    return Environment(**{**base, **kw})


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


@pytest.mark.parametrize("text, l4t, jetpack", [
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024",
     "36.4.0", "6.1/6.2 (TensorRT 10.3)"),
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64", "36.3.0", "6.0 (TensorRT 8.6)"),
    ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64", "35.5.0", "5.x (TensorRT 8.5)"),
    ("something else", "something else", "unknown"),
])
def test_jetson_release(tmp_path, text, l4t, jetpack):
    path = tmp_path / "nv_tegra_release"
    path.write_text(text + "\n")
    assert jetson_release(path) == {"l4t": l4t, "jetpack": jetpack}


def test_no_jetson_release_file_means_no_jetson(tmp_path):
    assert jetson_release(tmp_path / "missing") is None


def test_nothing_installed_is_skipped_with_what_to_install():
    checks = by_name(environment_checks(env()))
    assert checks.pop("onnxruntime").status == PASS
    assert {c.status for c in checks.values()} == {SKIP}
    assert install_command("tensorrt") in checks["tensorrt"].detail and "--system-site-packages" in checks["tensorrt"].detail
    assert "cuda-python>=12.3,<13" in checks["cuda-python"].detail


def test_jetpack_6_0_and_cuda_python_13_and_an_old_driver_fail_in_one_line_each():
    jetson = {"l4t": "36.3.0", "jetpack": "6.0 (TensorRT 8.6)"}
    checks = by_name(environment_checks(env(tensorrt="8.6.2.3", cuda_python="13.0.1", jetson=jetson)))
    assert checks["gpu"].status == PASS
    assert checks["tensorrt"].status == FAIL and "TensorRT 8.6.2.3 is too old" in checks["tensorrt"].detail
    assert checks["cuda-python"].status == FAIL and "cuda-python 13.0.1" in checks["cuda-python"].detail
    checks = by_name(environment_checks(env(tensorrt="8.5.2.2", cuda_python="12.9.4", cuda_driver="11.4",
                                            cuda_runtime="12.9", jetson={"l4t": "35.5.0", "jetpack": "5.x"})))
    assert checks["tensorrt"].status == FAIL
    assert checks["cuda-python"].status == FAIL and "R525 driver or newer" in checks["cuda-python"].detail
    for c in checks.values():
        assert "\n" not in c.detail


@pytest.mark.parametrize("driver", ["12.2", "12.6", "12.8"])
def test_jetpack_6_and_desktop_12_x_drivers_pass_with_cuda_python_12_9(driver):
    """cuda-python 12.9 reports 12.9 as its runtime with any driver; a 12.x driver runs it."""
    checks = by_name(environment_checks(env(tensorrt="10.3.0.30", cuda_python="12.9.4", cuda_driver=driver,
                                            cuda_runtime="12.9", gpu="Orin", compute_capability="8.7", driver="540")))
    assert checks["tensorrt"].status == PASS and checks["gpu"].status == PASS
    assert checks["cuda-python"].status == PASS, checks["cuda-python"].detail
    assert f"CUDA driver {driver}" in checks["cuda-python"].detail


def test_doctor_without_artifacts_reports_the_machine():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "python " in proc.stdout and "onnxruntime " in proc.stdout and "tensorrt" in proc.stdout


def test_doctor_runs_the_cpu_pipeline_and_skips_what_this_machine_lacks(toy_artifacts, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "report.json"
    proc = run_cli("doctor", toy_artifacts, "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["artifact"]["status"] == PASS
    assert checks["cpu"]["status"] == PASS and "two threads at once equal" in checks["cpu"]["detail"]
    assert "caption '" in checks["cpu"]["detail"]
    assert data["environment"]["onnxruntime"] == ort.__version__
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert checks["cuda"]["status"] == SKIP and install_command("gpu") in checks["cuda"]["detail"]
        assert checks["tensorrt"]["status"] == SKIP and install_command("tensorrt") in checks["tensorrt"]["detail"]
        assert checks["onnxruntime-trt"]["status"] == SKIP
    assert "PASS  cpu:" in proc.stdout


def test_a_backend_asked_for_that_cannot_run_fails_with_one_line_each(toy_artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a GPU provider")
    proc = run_cli("doctor", toy_artifacts, "--backend", "cuda", "tensorrt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    problems = proc.stderr.strip().splitlines()
    assert [p.split(":")[0:2] for p in problems] == [["problem", " cuda"], ["problem", " tensorrt"]]
    assert "onnxruntime-trt" not in proc.stdout  # not asked for, not run


def test_a_retrieval_artifact_is_verified_and_a_backend_asked_for_fails(retrieval_tiny_artifacts):
    """doctor checks captioning models; on a retrieval artifact it verifies the files, says how to
    check the model, and fails a backend asked for by name instead of passing silently."""
    plain = run_cli("doctor", retrieval_tiny_artifacts)
    assert plain.returncode == 0 and "blip2-edge match" in plain.stdout, plain.stdout + plain.stderr
    asked = run_cli("doctor", retrieval_tiny_artifacts, "--backend", "cuda")
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert [p.split(":")[0:2] for p in asked.stderr.strip().splitlines()] == [["problem", " cuda"]]


def test_a_tampered_artifact_fails_naming_the_file(toy_artifacts, tmp_path):
    art = shutil.copytree(toy_artifacts, tmp_path / "art")
    with open(art / "qformer.onnx", "ab") as f:
        f.write(b"\0")
    proc = run_cli("doctor", art)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "problem: artifact:" in proc.stderr and "qformer.onnx" in proc.stderr


def test_backend_checks_need_an_artifact_directory():
    proc = run_cli("doctor", "--backend", "cpu")
    assert proc.returncode == 1 and "need an artifact directory" in proc.stderr
