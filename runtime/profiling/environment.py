"""The machine a profile ran on, recorded beside its numbers."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from runtime.backends.onnxrt import import_onnxruntime
from runtime.backends.tensorrt.engines import nvidia_smi, tensorrt_version
from runtime.backends.threads import ThreadSettings
from runtime.host_cpu import cpu_model


def _gpu() -> dict | None:
    row = nvidia_smi("name", "driver_version", "memory.total")
    return None if row is None else dict(zip(("name", "driver", "memory"), row))


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


def describe(threads=None, stages=()) -> dict:
    """The machine, the runtime's versions and ONNX Runtime's thread settings (a ThreadSettings,
    default: the pipeline's default) with what they give each of `stages`."""
    ort = import_onnxruntime()
    threads = threads or ThreadSettings()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "gpu": _gpu(), "tensorrt": tensorrt_version(),
        "nvpmodel": _nvpmodel(), "onnxruntime_threads": threads.describe(dict.fromkeys(stages)),
    }
