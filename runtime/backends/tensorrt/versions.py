"""Which TensorRT, cuda-python and CUDA driver the TensorRT backend runs with, checked once
with a one-line error that names what to install.

Supported: TensorRT 10.3 (JetPack 6.1/6.2) through 11.x for the native engines; the `tensorrt`
extra installs 10.x, which ONNX Runtime's TensorRT provider is built on. The backend builds strongly typed
networks only: TensorRT 10.x has them behind NetworkDefinitionCreationFlag.STRONGLY_TYPED,
TensorRT 11 has nothing else (it removed BuilderFlag.FP16/INT8 and layer precisions).
TensorRT 8.x (JetPack 5, JetPack 6.0) has no IProgressMonitor and reads create_network(0)
as an implicit-batch network, so it is refused here rather than failing mid-build.
cuda-python must be 12.x: 13.x links the CUDA 13 runtime, which a CUDA 12 driver (JetPack 6)
cannot load; any CUDA 12 driver runs it (minor-version compatibility), so the driver check
compares CUDA majors only. The functions here take version strings, so they are tested without a GPU.
"""

from __future__ import annotations

import importlib
import re
import threading
from pathlib import Path

from runtime.errors import Blip2EdgeError, install_command

MIN_TENSORRT = (10, 3)
MAX_TENSORRT_MAJOR = 11  # the newest major this code is written and checked against
# ONNX Runtime's TensorRT provider (onnxruntime-gpu 1.18 to 1.2x) is built on TensorRT 10 and loads
# libnvinfer.so.10 only, so the `tensorrt` extra stays on 10.x; the native engines take 10.3 to 11.x.
ORT_TENSORRT_MAJOR = 10
TENSORRT_EXTRA = "tensorrt-cu12>=10.3,<11"
CUDA_PYTHON_MAJOR = 12
CUDA_PYTHON = "cuda-python>=12.3,<13"
JETSON_HINT = ("on a Jetson use JetPack 6.1 or newer and its own TensorRT (a venv made with "
               f"--system-site-packages), elsewhere {install_command('tensorrt')}")


# L4T's release file: present on a Jetson only ('# R36 (release), REVISION: 4.0, ...').
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


class UnsupportedVersionError(Blip2EdgeError):
    """An installed TensorRT, cuda-python or CUDA driver that the backend cannot use."""


class MissingTensorRTError(Blip2EdgeError):
    """TensorRT or cuda-python is not installed; the message says how to get it on this machine."""


def l4t_release(path: Path = TEGRA_RELEASE) -> str | None:
    """'36.4.0' from a Jetson's /etc/nv_tegra_release; its first line (80 characters) when it
    reads otherwise; None off a Jetson."""
    try:
        first = path.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"{m.group(1)}.{m.group(2)}" if m else first.strip()[:80]


def missing_message(package: str, what: str, jetson: bool) -> str:
    """What to install for a missing `package` ('tensorrt' or 'cuda-python'): on a Jetson,
    JetPack's TensorRT and a plain cuda-python (the tensorrt extra's wheels are not built for
    it: docs/tensorrt-jetson.md); elsewhere, the tensorrt extra."""
    if not jetson:
        return (f"{what} needs the '{package}' package: {install_command('tensorrt')} (on a Jetson: JetPack's "
                f"TensorRT and pip install '{CUDA_PYTHON}' instead, docs/tensorrt-jetson.md)")
    if package == "tensorrt":
        return (f"{what} needs TensorRT, which on a Jetson is JetPack's own: sudo apt install python3-libnvinfer, in a "
                f"venv made with python3 -m venv --system-site-packages (not the tensorrt extra; docs/tensorrt-jetson.md)")
    return f"{what} needs cuda-python: pip install '{CUDA_PYTHON}' (on a Jetson, not the tensorrt extra)"


_LOGGERS: dict[int, tuple[object, object]] = {}
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt):
    """This process's one TensorRT logger: TensorRT keeps the first ILogger a Builder, Runtime or
    parser is given and ignores later ones with a warning, so all of them get this one."""
    with _LOGGER_LOCK:
        held = _LOGGERS.get(id(trt))
        if held is None or held[0] is not trt:
            held = _LOGGERS[id(trt)] = (trt, trt.Logger(trt.Logger.WARNING))
        return held[1]


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); a suffix such as '.post1' or 'rc1' is ignored."""
    numbers = []
    for part in str(text).split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    if not numbers:
        raise UnsupportedVersionError(f"cannot read the version '{text}'")
    return tuple(numbers)


def check_tensorrt_version(version: str) -> tuple[int, ...]:
    v = parse_version(version)
    if v[:2] < MIN_TENSORRT:
        raise UnsupportedVersionError(
            f"TensorRT {version} is too old: the TensorRT backend needs TensorRT "
            f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} to {MAX_TENSORRT_MAJOR}.x (strongly typed networks); {JETSON_HINT}")
    if v[0] > MAX_TENSORRT_MAJOR:
        raise UnsupportedVersionError(
            f"TensorRT {version} is newer than this blip2-edge supports (TensorRT {MIN_TENSORRT[0]}."
            f"{MIN_TENSORRT[1]} to {MAX_TENSORRT_MAJOR}.x): pip install '{TENSORRT_EXTRA}' (what the tensorrt extra "
            f"installs, and what ONNX Runtime's TensorRT provider loads)")
    return v


def check_cuda_python_version(version: str) -> None:
    if parse_version(version)[0] != CUDA_PYTHON_MAJOR:
        raise UnsupportedVersionError(
            f"cuda-python {version} is installed; the TensorRT backend needs cuda-python 12.x (13.x links the "
            f"CUDA 13 runtime, which CUDA 12 drivers and JetPack 6 cannot load): pip install '{CUDA_PYTHON}'")


def cuda_version_text(number: int) -> str:
    """CUDA's integer versions: 12060 -> '12.6'."""
    return f"{number // 1000}.{number % 1000 // 10}"


# The oldest Linux driver branch of each CUDA major (NVIDIA's CUDA compatibility guide, "minor
# version compatibility"): a runtime of that major runs on any driver of that branch or newer.
MIN_DRIVER = {11: "R450", 12: "R525", 13: "R580"}


def check_driver(driver: int, runtime: int) -> None:
    """driver: cudaDriverGetVersion (0 without a driver); runtime: cudaRuntimeGetVersion, which
    cuda-python answers with the CUDA version it was built against (12090 for any 12.9 build, with or
    without a libcudart; NVIDIA/cuda-python issue 16), not a loaded runtime. CUDA's minor-version
    compatibility runs a 12.x runtime on any 12.x driver (JetPack 6's 12.2/12.6 with cuda-python
    12.9 included), so only the majors are compared."""
    if driver == 0:
        raise UnsupportedVersionError("no NVIDIA driver found: the TensorRT backend needs an NVIDIA GPU and its driver")
    need = runtime // 1000
    if driver // 1000 < need:
        update = f"an {MIN_DRIVER[need]} driver or newer" if need in MIN_DRIVER else f"a CUDA {need}.x driver"
        raise UnsupportedVersionError(
            f"the NVIDIA driver supports CUDA {cuda_version_text(driver)}, older than the CUDA {need}.x that cuda-python "
            f"(built for CUDA {cuda_version_text(runtime)}) needs: install {update} (on a Jetson: JetPack 6.1 or newer)")


def installed_version(*distributions: str) -> str | None:
    """The version of the first of `distributions` that is installed (pip metadata), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def import_tensorrt(what: str, tegra_release: Path = TEGRA_RELEASE):
    """The tensorrt module, or a one-line error naming what to install here (a Jetson's
    `tegra_release` file says which advice)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingTensorRTError(missing_message("tensorrt", what, tegra_release.is_file())) from exc
    check_tensorrt_version(trt.__version__)
    return trt


def tensorrt_major(trt) -> int:
    return parse_version(trt.__version__)[0]


def _runtime_module(what: str, tegra_release: Path = TEGRA_RELEASE):
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6.1; cuda.cudart is its old name
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingTensorRTError(missing_message("cuda-python", what, tegra_release.is_file()))


_CHECKED: dict[str, object] = {}


def import_cudart(what: str):
    """cuda-python's runtime module, after checking its major version and that the driver is of
    the CUDA major it was built for (else the first call fails with 'insufficient driver')."""
    if "cudart" in _CHECKED:
        return _CHECKED["cudart"]
    cudart = _runtime_module(what)
    version = installed_version("cuda-python", "cuda-bindings")
    if version is not None:  # JetPack's or a source build may carry no pip metadata
        check_cuda_python_version(version)
    err, driver = cudart.cudaDriverGetVersion()
    err2, runtime = cudart.cudaRuntimeGetVersion()
    if int(err) != 0 or int(err2) != 0:
        raise UnsupportedVersionError(f"CUDA cannot report its driver and runtime versions (error {int(err) or int(err2)}); "
                                      "is the NVIDIA driver installed?")
    check_driver(int(driver), int(runtime))
    _CHECKED["cudart"] = cudart
    return cudart
