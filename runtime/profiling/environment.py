"""The machine a profile ran on, recorded beside its numbers."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, driver, memory = (x.strip() for x in out[0].split(","))
    return {"name": name, "driver": driver, "memory": memory}


def nvidia_device():
    """The GPU (nvidia-smi) and TensorRT version (its Python package, if installed) that key
    engine caches."""
    from runtime.backends.tensorrt.engines import DeviceInfo

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        name, cc = (x.strip() for x in out[0].split(","))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        name, cc = "unknown-gpu", "0.0"
    return DeviceInfo(gpu=name, compute_capability=cc, trt_version=_tensorrt_version() or "unknown")


def _tensorrt_version() -> str | None:
    try:
        import tensorrt  # noqa: PLC0415  (optional; only its version is read)

        return tensorrt.__version__
    except ImportError:
        return None


def _nvpmodel() -> str | None:
    if not shutil.which("nvpmodel"):
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "Power Mode" in line:
            return line.split(":", 1)[1].strip()
    return out.strip() or None


def describe() -> dict:
    import onnxruntime as ort

    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "gpu": _gpu(), "tensorrt": _tensorrt_version(),
        "nvpmodel": _nvpmodel(),
    }
