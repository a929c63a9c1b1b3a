"""A Jetson as the runtime meets it: its nvidia-smi may be missing or answer [N/A], TensorRT comes
from JetPack (never the tensorrt extra), and caches must still be keyed to its GPU (sm87 on Orin,
never unknown-gpu/sm00). Real files in JetPack's formats, a real failing nvidia-smi executable on
PATH, and this machine's real imports (it has neither TensorRT nor cuda-python)."""

from __future__ import annotations

import os
import re
import stat

import pytest

from runtime.backends.tensorrt import versions
from runtime.backends.tensorrt.engines import cuda_device, nvidia_device, ort_trt_cache_dir
from runtime.doctor.environment import probe
from runtime.errors import Blip2EdgeError, install_command
from tests.conftest import REPO

ORIN_RELEASE = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 2025\n"
ORIN_COMPATIBLE = b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0"


@pytest.fixture
def jetson(tmp_path):
    release, compatible = tmp_path / "nv_tegra_release", tmp_path / "compatible"
    release.write_text(ORIN_RELEASE)
    compatible.write_bytes(ORIN_COMPATIBLE)
    return release, compatible


def on_path(monkeypatch, tmp_path, script: str | None) -> None:
    """PATH with only an nvidia-smi that runs `script` (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if script is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + script + "\n")
        smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))


needs_no_cuda = pytest.mark.skipif(cuda_device() is not None, reason="this machine's CUDA answers first")


@needs_no_cuda
@pytest.mark.parametrize("script", [None, "exit 9", "echo 'Orin (nvgpu), [N/A]'", "echo 'NVIDIA-SMI has failed'"])
def test_a_jetson_whose_nvidia_smi_fails_keys_its_caches_by_its_real_gpu(jetson, monkeypatch, tmp_path, script):
    on_path(monkeypatch, tmp_path, script)
    release, compatible = jetson
    device = nvidia_device(release, compatible)
    assert device.compute_capability == "8.7" and device.sm == "87"
    assert device.gpu == "Jetson tegra234 (L4T 36.4.3)"
    cache = ort_trt_cache_dir(tmp_path / "art", "1.20.0", device)
    assert cache.name.endswith("-sm87") and "sm00" not in str(cache) and "unknown-gpu" not in str(cache)


@needs_no_cuda
def test_doctor_reports_a_jetsons_compute_capability_without_nvidia_smi(jetson, monkeypatch, tmp_path):
    on_path(monkeypatch, tmp_path, "echo 'Orin (nvgpu), [N/A], [N/A]'")
    env = probe(*jetson)
    assert env.compute_capability == "8.7" and env.gpu == "Jetson tegra234 (L4T 36.4.3)"
    assert env.jetson["l4t"] == "36.4.3" and env.jetson["jetpack"] == "6.1/6.2 (TensorRT 10.3)"


def test_a_working_nvidia_smi_is_believed(jetson, monkeypatch, tmp_path):
    on_path(monkeypatch, tmp_path, "echo 'NVIDIA GeForce RTX 4090, 8.9'")
    device = nvidia_device(tmp_path / "no-release", tmp_path / "no-compatible")
    assert (device.gpu, device.compute_capability) == ("NVIDIA GeForce RTX 4090", "8.9")


@needs_no_cuda
def test_no_gpu_to_key_a_cache_by_is_an_error_not_sm00(monkeypatch, tmp_path):
    on_path(monkeypatch, tmp_path, "exit 9")
    with pytest.raises(Blip2EdgeError) as err:
        nvidia_device(tmp_path / "no-release", tmp_path / "no-compatible")
    assert "cannot tell which GPU" in str(err.value) and "cuda-python>=12.3,<13" in str(err.value)


# ---- what to install: never the tensorrt extra on a Jetson -------------------------------------------

needs_no_tensorrt = pytest.mark.skipif(versions.installed_version("tensorrt", "tensorrt-cu12") is not None,
                                       reason="checks the message when TensorRT is missing")


@needs_no_tensorrt
def test_missing_tensorrt_on_a_jetson_names_jetpacks_tensorrt_not_the_extra(jetson):
    with pytest.raises(versions.MissingTensorRTError) as err:
        versions.import_tensorrt("blip2-edge build-engines", tegra_release=jetson[0])
    message = str(err.value)
    assert "python3-libnvinfer" in message and "--system-site-packages" in message
    assert install_command("tensorrt") not in message and "\n" not in message
    docs = (REPO / "docs" / "tensorrt-jetson.md").read_text()
    assert "sudo apt install python3-libnvinfer" in docs and "python3 -m venv --system-site-packages" in docs


@needs_no_tensorrt
def test_missing_tensorrt_elsewhere_names_the_extra(tmp_path):
    with pytest.raises(versions.MissingTensorRTError, match=re.escape(install_command("tensorrt"))):
        versions.import_tensorrt("blip2-edge build-engines", tegra_release=tmp_path / "no-release")


@pytest.mark.skipif(cuda_device() is not None or any(versions.installed_version(n) for n in ("cuda-python", "cuda-bindings")),
                    reason="checks the message when cuda-python is missing")
def test_missing_cuda_python_on_a_jetson_names_cuda_python_alone(jetson, tmp_path):
    with pytest.raises(versions.MissingTensorRTError) as err:
        versions._runtime_module("the TensorRT backend", jetson[0])
    assert "pip install 'cuda-python>=12.3,<13'" in str(err.value) and install_command("tensorrt") not in str(err.value)
    with pytest.raises(versions.MissingTensorRTError, match=re.escape(install_command("tensorrt"))):
        versions._runtime_module("the TensorRT backend", tmp_path / "no-release")


def test_a_missing_tensorrt_is_one_line_through_the_cli(tmp_path, tiny_artifacts):
    """build-engines without TensorRT: exit 2, one line, what to install (on this machine: not a Jetson)."""
    if versions.installed_version("tensorrt", "tensorrt-cu12") is not None or os.path.exists(versions.TEGRA_RELEASE):
        pytest.skip("checks the message off a Jetson without TensorRT")
    from tests.conftest import run_cli

    proc = run_cli("build-engines", tiny_artifacts)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert install_command("tensorrt") in proc.stderr and "JetPack" in proc.stderr
