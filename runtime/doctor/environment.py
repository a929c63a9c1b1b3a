"""What `blip2-edge doctor` reports about the machine: versions and devices, probed without
importing anything that could fail to load (a missing library is a finding, not a crash)."""

from __future__ import annotations

import importlib.util
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.backends.onnxrt import (
    GPU_PROVIDERS,
    INSTALL_ORT,
    OnnxRuntimeMissingError,
    flavour_conflict,
    import_onnxruntime,
    onnxruntime_distributions,
    provider_loads,
)
from runtime.backends.tensorrt.engines import DEVICE_TREE_COMPATIBLE, gpu_identity, nvidia_smi
from runtime.backends.tensorrt.versions import (
    ORT_TENSORRT_MAJOR,
    TEGRA_RELEASE,
    TENSORRT_EXTRA,
    UnsupportedVersionError,
    check_cuda_python_version,
    check_driver,
    check_tensorrt_version,
    cuda_version_text,
    installed_version,
    l4t_release,
    parse_version,
)
from runtime.errors import install_command
from runtime.profiling.environment import _nvpmodel

# L4T release -> JetPack (NVIDIA's release notes); TensorRT 10.3 arrived with L4T 36.4.
JETPACK = {"35": "5.x (TensorRT 8.5)", "36.2": "6.0 DP (TensorRT 8.6)", "36.3": "6.0 (TensorRT 8.6)",
           "36.4": "6.1/6.2 (TensorRT 10.3)"}
PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str


@dataclass
class Environment:
    python: str
    platform: str
    onnxruntime: str | None
    providers: list[str]
    tensorrt: str | None
    cuda_python: str | None
    gpu: str | None = None
    compute_capability: str | None = None
    driver: str | None = None
    cuda_driver: str | None = None
    cuda_runtime: str | None = None
    jetson: dict | None = None
    notes: list[str] = field(default_factory=list)
    # Every installed distribution that ships the onnxruntime package: (name, version); more than
    # one overwrite each other's files (runtime.backends.onnxrt.flavour_conflict).
    onnxruntime_distributions: list[tuple[str, str]] = field(default_factory=list)
    onnxruntime_error: str | None = None  # why onnxruntime does not import, when it does not
    # GPU providers ONNX Runtime lists (built in) but cannot load here (onnxrt.provider_loads).
    unloadable_providers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def jetson_release(path: Path = TEGRA_RELEASE) -> dict | None:
    """{'l4t': '36.4.0', 'jetpack': '6.1/6.2 (TensorRT 10.3)'} from /etc/nv_tegra_release
    ('# R36 (release), REVISION: 4.0, ...'), or None off a Jetson."""
    l4t = l4t_release(path)
    if l4t is None:
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)[\d.]*", l4t)
    if not m:
        return {"l4t": l4t, "jetpack": "unknown"}
    jetpack = JETPACK.get(f"{m.group(1)}.{m.group(2)}") or JETPACK.get(m.group(1)) or "unknown"
    return {"l4t": l4t, "jetpack": jetpack}


def _cuda_versions(env: Environment) -> None:
    """The CUDA driver's version and the CUDA version cuda-python was built for (what its
    cudaRuntimeGetVersion answers, loaded runtime or not), when cuda-python loads."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, driver = cudart.cudaDriverGetVersion()
        err2, runtime = cudart.cudaRuntimeGetVersion()
    except Exception as exc:  # noqa: BLE001  (a broken install is reported, not raised)
        env.notes.append(f"cuda-python does not load: {' '.join(str(exc).split())[:200]}")
        return
    if int(getattr(err, "value", err)) == 0:
        env.cuda_driver = cuda_version_text(int(driver)) if int(driver) else "none"
    if int(getattr(err2, "value", err2)) == 0:
        env.cuda_runtime = cuda_version_text(int(runtime))


def probe(tegra_release: Path = TEGRA_RELEASE, compatible: Path = DEVICE_TREE_COMPATIBLE) -> Environment:
    ort_version, providers, ort_error = None, [], None
    try:
        ort = import_onnxruntime()
        ort_version, providers = ort.__version__, list(ort.get_available_providers())
    except OnnxRuntimeMissingError as exc:
        ort_error = str(exc)
    unloadable = unloadable_providers(providers)
    env = Environment(python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
                      onnxruntime=ort_version, providers=providers,
                      tensorrt=installed_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13") or _module_version(),
                      cuda_python=installed_version("cuda-python", "cuda-bindings"),
                      onnxruntime_distributions=onnxruntime_distributions(), onnxruntime_error=ort_error,
                      unloadable_providers=unloadable)
    row = nvidia_smi("name", "compute_cap", "driver_version")
    if row:
        env.gpu, env.compute_capability, env.driver = row
    if not re.fullmatch(r"\d+\.\d+", env.compute_capability or ""):
        # A Jetson's nvidia-smi may be missing, fail or answer [N/A]: CUDA's or the SoC's answer.
        found = gpu_identity(tegra_release, compatible)
        if found is not None:
            env.gpu, env.compute_capability = found
    if env.cuda_python:
        _cuda_versions(env)
    jetson = jetson_release(tegra_release)
    if jetson is not None:
        jetson["power_mode"] = _nvpmodel()
        env.jetson = jetson
    return env


def unloadable_providers(providers) -> list[str]:
    """The GPU providers among `providers` (ONNX Runtime's list) that do not load here."""
    return [p for p in GPU_PROVIDERS if p in providers and not provider_loads(p)]


def _module_version() -> str | None:
    """JetPack's TensorRT has no pip metadata: its module's version, if it imports."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001  (a TensorRT whose libraries do not load)
        return "unloadable"


def environment_checks(env: Environment) -> list[Check]:
    """What the machine can do, as checks: a skip says what to install."""
    checks = [onnxruntime_check(env)]
    for provider in GPU_PROVIDERS:
        if provider in env.providers:
            problem = provider_problem(env, provider)
            checks.append(Check(provider, SKIP, problem) if problem else Check(provider, PASS, "loads (a one-node session)"))
    if env.gpu:
        checks.append(Check("gpu", PASS, f"{env.gpu}, compute capability {env.compute_capability}, "
                                         f"driver {env.driver or '?'}"))
    elif env.jetson:
        checks.append(Check("gpu", PASS, f"Jetson, L4T {env.jetson['l4t']} (JetPack {env.jetson['jetpack']})"))
    else:
        checks.append(Check("gpu", SKIP, "no NVIDIA GPU found (nvidia-smi absent or reports none): CPU only"))
    if env.tensorrt is None:
        checks.append(Check("tensorrt", SKIP, f"not installed: {install_command('tensorrt')} (on a Jetson: "
                                              "JetPack's python3-libnvinfer in a --system-site-packages venv)"))
    else:
        try:
            check_tensorrt_version(env.tensorrt)
            checks.append(Check("tensorrt", PASS, f"TensorRT {env.tensorrt}"))
        except UnsupportedVersionError as exc:
            checks.append(Check("tensorrt", FAIL, str(exc)))
    if env.cuda_python is None:
        checks.append(Check("cuda-python", SKIP, "not installed: pip install 'cuda-python>=12.3,<13' "
                                                 "(the tensorrt extra brings it)"))
    else:
        try:
            check_cuda_python_version(env.cuda_python)
            if env.cuda_driver is not None and env.cuda_runtime is not None and env.cuda_driver != "none":
                check_driver(_cuda_int(env.cuda_driver), _cuda_int(env.cuda_runtime))
            checks.append(Check("cuda-python", PASS, f"cuda-python {env.cuda_python} (built for CUDA "
                                                     f"{env.cuda_runtime or '?'}), CUDA driver {env.cuda_driver or '?'}"))
        except UnsupportedVersionError as exc:
            checks.append(Check("cuda-python", FAIL, str(exc)))
    return checks


def onnxruntime_check(env: Environment) -> Check:
    """Fails when no ONNX Runtime imports (nothing runs), or when two flavours are installed: they
    share one folder, so the providers of the one installed first may be gone (the CPU wheel
    installed after NVIDIA's onnxruntime-gpu on a Jetson)."""
    conflict = flavour_conflict(list(env.onnxruntime_distributions))
    if conflict:
        return Check("onnxruntime", FAIL, conflict)
    if env.onnxruntime is None:
        return Check("onnxruntime", FAIL, env.onnxruntime_error or f"ONNX Runtime is not installed: {INSTALL_ORT}")
    installed = ", ".join(f"{n} {v}" for n, v in env.onnxruntime_distributions) or f"onnxruntime {env.onnxruntime}"
    return Check("onnxruntime", PASS, f"{installed}: {', '.join(env.providers)}")


def tensorrt_libs_dir() -> str | None:
    """Where the TensorRT wheels put libnvinfer (site-packages/tensorrt_libs), found without
    importing it (its __init__ loads the libraries)."""
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return locations[0] if locations else None


def provider_problem(env: Environment, provider: str) -> str | None:
    """Why a provider ONNX Runtime lists does not load here, with the fix; None when it loads."""
    if provider not in env.unloadable_providers:
        return None
    listed = f"ONNX Runtime {env.onnxruntime} lists {provider} but it does not load"
    if provider == "CUDAExecutionProvider":
        return (f"{listed}: CUDA 12's and cuDNN 9's libraries (libcublas.so.12, libcudnn.so.9) are missing or not on "
                "the loader path; install them (ONNX Runtime's CUDA provider requirements) and put their lib directories "
                "on LD_LIBRARY_PATH (on a Jetson: JetPack's CUDA with NVIDIA's onnxruntime-gpu for that JetPack)")
    if _major(env.tensorrt) not in (None, ORT_TENSORRT_MAJOR):
        return (f"{listed}: its TensorRT provider is built on TensorRT {ORT_TENSORRT_MAJOR} (libnvinfer.so."
                f"{ORT_TENSORRT_MAJOR}) and this machine has TensorRT {env.tensorrt}: pip install '{TENSORRT_EXTRA}' "
                "(the native engines of --backend tensorrt take 10.3 to 11.x)")
    libs = tensorrt_libs_dir()
    where = (f"export LD_LIBRARY_PATH={libs}:$LD_LIBRARY_PATH before starting Python" if libs else
             f"install TensorRT {ORT_TENSORRT_MAJOR} (pip install '{TENSORRT_EXTRA}', or JetPack's) and put its lib "
             "directory (site-packages/tensorrt_libs for the wheels) on LD_LIBRARY_PATH")
    return f"{listed}: TensorRT {ORT_TENSORRT_MAJOR}'s libnvinfer.so.{ORT_TENSORRT_MAJOR} is not on the loader path; {where}"


def _major(version: str | None) -> int | None:
    try:
        return parse_version(version)[0] if version else None
    except UnsupportedVersionError:  # "unloadable", or nothing a version can be read from
        return None


def _cuda_int(text: str) -> int:
    major, minor = text.split(".")
    return int(major) * 1000 + int(minor) * 10
