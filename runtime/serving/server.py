"""The tritonserver binary that nvidia-pytriton ships, made runnable for this Python.

Why the binary and not PyTriton's Python API: `serve` and `triton-repo` then run one and the
same Python-backend model (runtime.serving.triton_model), so what a fleet's stock tritonserver
serves is what the tests serve; each request of a dynamic batch gets its own error; Triton's own
SIGTERM drain, readiness and metrics apply unchanged; and no proxy process sits between Triton
and the pipeline. nvidia-pytriton is only located here (its package is never imported).

Two things the bundled Python backend needs, checked before the server starts, each failing
with one line:
- its stub embeds libpython: LD_LIBRARY_PATH must start with this interpreter's own lib
  directory (sys.base_prefix/lib), or a system libpython of the same version but an older
  patch release is picked up and model loading fails deep inside threading;
- the stub (Triton 2.51) reads tensors through numpy's 1.x C layout: under numpy 2 every input
  tensor arrives corrupted, which is why nvidia-pytriton 0.7.0 requires numpy<2. The model's
  Python environment (--python-env, default this one) must have numpy<2.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from runtime.errors import Blip2EdgeError, MissingExtraError

STUB = "triton_python_backend_stub"


class ServingSetupError(Blip2EdgeError):
    """Triton cannot be started here (a missing piece of the Python environment)."""


def pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver distribution directory, its bundled shared libraries) inside nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("nvidia-pytriton", "serve", "serving on Triton")
    package = Path(list(spec.submodule_search_locations)[0])
    dist, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServingSetupError(f"{dist}: nvidia-pytriton has no bundled tritonserver here (its wheels ship it for "
                                "Linux x86-64 and aarch64); install Triton itself and use 'blip2-edge triton-repo'")
    return dist, libs


def python_version_of(python_env: Path) -> tuple[str, str]:
    """(major.minor, numpy version) of the environment's python, asked in a subprocess."""
    python = python_env / "bin" / "python"
    if not python.exists():
        raise ServingSetupError(f"{python_env}: no bin/python; --python-env must be a Python environment (a venv)")
    code = "import sys; import numpy; print('%d.%d' % sys.version_info[:2], numpy.__version__)"
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServingSetupError(f"{python}: cannot run it ({exc})") from None
    if proc.returncode != 0:
        raise ServingSetupError(f"{python}: has no numpy (the Python backend needs it): pip install 'numpy<2' there")
    version, numpy_version = proc.stdout.split()
    return version, numpy_version


def check_python_env(python_env: Path) -> None:
    version, numpy_version = python_version_of(python_env)
    own = "%d.%d" % sys.version_info[:2]
    if version != own:
        raise ServingSetupError(f"{python_env}: Python {version}, but the Python backend stub is chosen for this "
                                f"interpreter's {own}; use an environment of the same Python version")
    if int(numpy_version.split(".")[0]) >= 2:
        raise ServingSetupError(
            f"{python_env}: numpy {numpy_version}; the Python backend bundled with nvidia-pytriton (Triton 2.51) "
            "corrupts input tensors under numpy 2 (pytriton requires numpy<2): run the model in an environment with "
            "numpy<2, e.g. a venv made for 'pip install blip2-edge[serve]', given with --python-env")


def own_libpython_dir() -> Path:
    """The directory of this interpreter's shared libpython, which the stub must load."""
    lib = Path(sys.base_prefix) / "lib"
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and (lib / name).exists()):
        raise ServingSetupError(f"{sys.base_prefix}: this Python has no shared libpython ({name or 'libpython'} in "
                                f"{lib}); Triton's Python backend embeds one: use a Python built with --enable-shared")
    return lib


def backend_home(home: Path) -> Path:
    """A backend directory for this Python: the bundled python backend with the stub built for
    this interpreter's version, as links (the stub's own library path follows the real file)."""
    dist, _ = pytriton_dist()
    version = "%d.%d" % sys.version_info[:2]
    stub = dist / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        found = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServingSetupError(f"nvidia-pytriton has no Python backend stub for Python {version} "
                                f"(it has {', '.join(found)}); serve from one of those versions")
    python = home / "backends" / "python"
    python.mkdir(parents=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / STUB).symlink_to(stub)
    return home / "backends"


def server_env(python_env: Path) -> dict:
    """tritonserver's environment: this interpreter's libpython first, then pytriton's libraries;
    the model's Python environment first on PATH (the stub finds its site-packages from it)."""
    _, libs = pytriton_dist()
    env = dict(os.environ)
    tail = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(own_libpython_dir()), *tail, str(libs)])
    env["PATH"] = os.pathsep.join([str(python_env / "bin"), env.get("PATH", "")])
    return env


def server_command(repository: Path, backends: Path, http_port: int, grpc_port: int, metrics_port: int,
                   address: str, exit_timeout_s: int, log_verbose: bool = False) -> list[str]:
    dist, _ = pytriton_dist()
    return [str(dist / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={backends}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}", f"--http-address={address}", f"--grpc-address={address}",
            f"--metrics-address={address}", f"--exit-timeout-secs={exit_timeout_s}",
            "--strict-readiness=true", "--disable-auto-complete-config", f"--log-verbose={int(log_verbose)}"]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a killed `serve` leaves no
    server behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
