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
  Python environment (--python-env, default this one) must have numpy<2. The tritonserver and
  the stub are taken from that environment's nvidia-pytriton, so the command itself may run in
  an environment with numpy 2 (and without pytriton).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import Blip2EdgeError, MissingExtraError

STUB = "triton_python_backend_stub"


class ServingSetupError(Blip2EdgeError):
    """Triton cannot be started here (a missing piece of the Python environment)."""


@dataclass(frozen=True)
class ModelEnv:
    """The Python environment Triton's Python backend runs the model in, as its python reports."""

    prefix: Path
    python: str  # major.minor
    numpy: str
    pytriton: Path  # the nvidia-pytriton package directory there

    @property
    def dist(self) -> Path:
        return self.pytriton / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.pytriton.parent / "nvidia_pytriton.libs"


PROBE = ("import importlib.util, json, sys\n"
         "spec = importlib.util.find_spec('pytriton')\n"
         "try:\n    import numpy; np_version = numpy.__version__\nexcept ImportError:\n    np_version = ''\n"
         "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'numpy': np_version,\n"
         "    'pytriton': list(spec.submodule_search_locations)[0] if spec else ''}))")


def inspect_env(prefix: Path) -> ModelEnv:
    """Asks the environment's own python (a subprocess: it may not be this interpreter's)."""
    python = prefix / "bin" / "python"
    if not python.exists():
        raise ServingSetupError(f"{prefix}: no bin/python; --python-env must be a Python environment (a venv)")
    try:
        proc = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=120)
        info = json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise ServingSetupError(f"{python}: cannot ask it for its packages ({' '.join(str(exc).split())})") from None
    return ModelEnv(prefix, info["python"], info["numpy"], Path(info["pytriton"]) if info["pytriton"] else Path())


def check_model_env(prefix: Path) -> ModelEnv:
    """The environment, checked: nvidia-pytriton with a tritonserver and a stub for its Python,
    the same Python version as this interpreter (whose libpython the stub loads), numpy<2."""
    env = inspect_env(prefix)
    if env.pytriton == Path():
        raise MissingExtraError("nvidia-pytriton", "serve", f"serving on Triton (in {prefix})")
    if not (env.dist / "bin" / "tritonserver").is_file():
        raise ServingSetupError(f"{env.dist}: this nvidia-pytriton has no bundled tritonserver; install Triton "
                                "itself and serve a 'blip2-edge triton-repo' repository with it")
    own = "%d.%d" % sys.version_info[:2]
    if env.python != own:
        raise ServingSetupError(f"{prefix}: Python {env.python}, but the stub must load this interpreter's "
                                f"libpython ({own}); use an environment of the same Python version")
    if not env.numpy:
        raise ServingSetupError(f"{prefix}: no numpy (the Python backend needs it): pip install 'numpy<2' there")
    if int(env.numpy.split(".")[0]) >= 2:
        raise ServingSetupError(
            f"{prefix}: numpy {env.numpy}; the Python backend bundled with nvidia-pytriton (Triton 2.51) "
            "corrupts input tensors under numpy 2 (pytriton requires numpy<2): run the model in an environment with "
            "numpy<2, e.g. a venv made for 'pip install blip2-edge[serve]', given with --python-env")
    stub = env.dist / "python_backend_stubs" / env.python / STUB
    if not stub.is_file():
        found = sorted(p.name for p in (env.dist / "python_backend_stubs").iterdir())
        raise ServingSetupError(f"nvidia-pytriton has no Python backend stub for Python {env.python} "
                                f"(it has {', '.join(found)}); serve from one of those versions")
    return env


def own_libpython_dir() -> Path:
    """The directory of this interpreter's shared libpython, which the stub must load."""
    lib = Path(sys.base_prefix) / "lib"
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and (lib / name).exists()):
        raise ServingSetupError(f"{sys.base_prefix}: this Python has no shared libpython ({name or 'libpython'} in "
                                f"{lib}); Triton's Python backend embeds one: use a Python built with --enable-shared")
    return lib


def backend_home(env: ModelEnv, home: Path) -> Path:
    """A backend directory for this Python: the bundled python backend with the stub built for
    its version, as links (the stub's own library path follows the real file)."""
    python = home / "backends" / "python"
    python.mkdir(parents=True)
    for f in (env.dist / "backends" / "python").iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / STUB).symlink_to(env.dist / "python_backend_stubs" / env.python / STUB)
    return home / "backends"


def server_env(env: ModelEnv) -> dict:
    """tritonserver's environment: this interpreter's libpython first, then pytriton's libraries;
    the model's Python environment first on PATH (the stub finds its site-packages from it)."""
    out = dict(os.environ)
    tail = [p for p in out.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    out["LD_LIBRARY_PATH"] = os.pathsep.join([str(own_libpython_dir()), *tail, str(env.libs)])
    out["PATH"] = os.pathsep.join([str(env.prefix / "bin"), out.get("PATH", "")])
    return out


def server_command(env: ModelEnv, repository: Path, backends: Path, http_port: int, grpc_port: int,
                   metrics_port: int, address: str, exit_timeout_s: int, log_verbose: bool = False) -> list[str]:
    return [str(env.dist / "bin" / "tritonserver"), f"--model-repository={repository}",
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
