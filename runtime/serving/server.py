"""The tritonserver binary that nvidia-pytriton ships, made runnable for this Python: the
command and environment `serve` starts it with, and `triton-repo` prints (shell_line, with a
backend directory that lasts in the user's cache), one and the same.

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

import errno
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from runtime.artifact.verified_files import cache_file
from runtime.errors import Blip2EdgeError, MissingExtraError, OptionError, install_command

STUB = "triton_python_backend_stub"
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*\.?$")  # RFC 1123
MAX_EXIT_TIMEOUT_S = 2**31 - 1  # tritonserver reads --exit-timeout-secs as a 32-bit int


class ServingSetupError(Blip2EdgeError):
    """Triton cannot be started here (a missing piece of the Python environment)."""


@dataclass(frozen=True)
class ModelEnv:
    """The Python environment Triton's Python backend runs the model in, as its python reports."""

    prefix: Path
    python: str  # major.minor
    numpy: str
    pytriton: Path  # the nvidia-pytriton package directory there
    blip2_edge: str = ""  # the version of blip2-edge installed there, if any

    @property
    def dist(self) -> Path:
        return self.pytriton / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.pytriton.parent / "nvidia_pytriton.libs"


PROBE = ("import importlib.metadata, importlib.util, json, sys\n"
         "spec = importlib.util.find_spec('pytriton')\n"
         "try:\n    import numpy; np_version = numpy.__version__\nexcept ImportError:\n    np_version = ''\n"
         "try:\n    ours = importlib.metadata.version('blip2-edge')\n"
         "except importlib.metadata.PackageNotFoundError:\n    ours = ''\n"
         "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'numpy': np_version, 'blip2_edge': ours,\n"
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
    return ModelEnv(prefix, info["python"], info["numpy"], Path(info["pytriton"]) if info["pytriton"] else Path(),
                    info.get("blip2_edge") or "")


def numpy_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def check_model_env(prefix: Path) -> ModelEnv:
    """The environment, checked: nvidia-pytriton with a tritonserver and a stub for its Python,
    the same Python version as this interpreter (whose libpython the stub loads), numpy<2."""
    env = inspect_env(prefix)
    if env.pytriton == Path():
        missing = MissingExtraError("nvidia-pytriton", "serve", f"serving on Triton (in {prefix})")
        if numpy_major(env.numpy) >= 2:
            # Installing the extra here would fight over numpy: the model needs an environment of its own.
            raise ServingSetupError(f"{missing}, but not into {prefix}: it has numpy {env.numpy}, and the Python "
                                    "backend bundled with nvidia-pytriton needs numpy<2. Install it into a separate "
                                    "environment and pass that with --python-env DIR")
        raise missing
    if not (env.dist / "bin" / "tritonserver").is_file():
        raise ServingSetupError(f"{env.dist}: this nvidia-pytriton has no bundled tritonserver; install Triton "
                                "itself and serve a 'blip2-edge triton-repo' repository with it")
    own = "%d.%d" % sys.version_info[:2]
    if env.python != own:
        raise ServingSetupError(f"{prefix}: Python {env.python}, but the stub must load this interpreter's "
                                f"libpython ({own}); use an environment of the same Python version")
    if not env.numpy:
        raise ServingSetupError(f"{prefix}: no numpy (the Python backend needs it): pip install 'numpy<2' there")
    if numpy_major(env.numpy) >= 2:
        raise ServingSetupError(
            f"{prefix}: numpy {env.numpy}; the Python backend bundled with nvidia-pytriton (Triton 2.51) "
            "corrupts input tensors under numpy 2 (pytriton requires numpy<2): run the model in an environment with "
            f"numpy<2, e.g. a venv made with '{install_command('serve')}', given with --python-env")
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


def backend_links(env: ModelEnv) -> dict[str, Path]:
    """What the python backend directory holds: the bundled backend's files and the stub built
    for this Python, each as a link to nvidia-pytriton's file (the stub's own library path
    follows the real file)."""
    links = {f.name: f for f in sorted((env.dist / "backends" / "python").iterdir()) if f.is_file()}
    links[STUB] = env.dist / "python_backend_stubs" / env.python / STUB
    return links


def backend_home(env: ModelEnv, home: Path) -> Path:
    """A --backend-directory for this Python under `home` (created): backends/python as
    backend_links says. nvidia-pytriton keeps its stubs apart (python_backend_stubs/<version>),
    so its own backends directory has none: Triton's Python backend would not find it."""
    python = home / "backends" / "python"
    python.mkdir(parents=True)
    for name, target in backend_links(env).items():
        (python / name).symlink_to(target)
    return home / "backends"


def _holds_links(backends: Path, links: dict[str, Path]) -> bool:
    python = backends / "python"
    try:
        names = {p.name for p in python.iterdir()}
        return names == set(links) and all(os.readlink(python / n) == str(t) for n, t in links.items())
    except OSError:
        return False


def lasting_backend_home(env: ModelEnv) -> Path:
    """The --backend-directory printed by `triton-repo` for this machine: backend_home's links,
    kept in the user's cache directory (blip2-edge/triton-backends/, one per nvidia-pytriton
    and Python version), made again when missing or stale, and moved into place whole."""
    root = cache_file().parent / "triton-backends"
    key = hashlib.sha256(str(env.dist.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    home = root / f"python{env.python}-{key}"
    links = backend_links(env)
    if _holds_links(home / "backends", links):
        return home / "backends"
    tmp = root / f".{home.name}.{os.getpid()}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        backend_home(env, tmp)
        shutil.rmtree(home, ignore_errors=True)  # a stale one (its environment moved or changed)
        try:
            os.rename(tmp, home)
        except OSError:  # another process put one there meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ServingSetupError(f"{root}: cannot write Triton's backend directory there ({exc.strerror or exc}); "
                                "set XDG_CACHE_HOME to a writable directory") from None
    if not _holds_links(home / "backends", links):
        raise ServingSetupError(f"{home}: not the backend directory expected; remove it and run again")
    return home / "backends"


def env_additions(env: ModelEnv) -> dict[str, tuple[list[str], list[str]]]:
    """What tritonserver's environment adds, per variable: the directories put before and
    after its current value. This interpreter's libpython first, pytriton's libraries last; the
    model's Python environment first on PATH (the stub finds its site-packages from it)."""
    return {"LD_LIBRARY_PATH": ([str(own_libpython_dir())], [str(env.libs)]),
            "PATH": ([str(env.prefix / "bin")], [])}


def server_env(env: ModelEnv) -> dict:
    """tritonserver's environment: this process's, with env_additions."""
    out = dict(os.environ)
    for var, (before, after) in env_additions(env).items():
        current = [p for p in out.get(var, "").split(os.pathsep) if p]
        out[var] = os.pathsep.join([*before, *current, *after])
    return out


def shell_line(env: ModelEnv, command: list[str]) -> str:
    """`command` as one POSIX shell line that runs it with server_env's additions to the
    environment of the shell it is typed in (an unset variable leaves no empty entry behind,
    which the loader would read as the working directory)."""
    words = []
    for var, (before, after) in env_additions(env).items():
        value = ""
        if before:
            value += shlex.quote(os.pathsep.join(before)) + f'"${{{var}:+{os.pathsep}${var}}}"'
        else:
            value += f'"${{{var}:+${var}{os.pathsep}}}"'
        if after:
            value += shlex.quote((os.pathsep if before else "") + os.pathsep.join(after))
        words.append(f"{var}={value}")
    return " ".join([*words, *map(shlex.quote, command)])


def server_command(env: ModelEnv, repository: Path, backends: Path, http_port: int, grpc_port: int,
                   metrics_port: int, address: str, exit_timeout_s: int, log_verbose: bool = False) -> list[str]:
    return [str(env.dist / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={backends}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}", f"--http-address={address}", f"--grpc-address={address}",
            f"--metrics-address={address}", f"--exit-timeout-secs={exit_timeout_s}",
            "--strict-readiness=true", "--disable-auto-complete-config", f"--log-verbose={int(log_verbose)}"]


# ---- where it listens ------------------------------------------------------------------------

def check_address(address: str) -> None:
    """--address: an IP address or a host name (its form only: nothing is looked up here)."""
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if not HOST_NAME.match(address):
        raise OptionError(f"--address {address!r}: not an IP address or a host name (e.g. 0.0.0.0: every "
                          "interface; 127.0.0.1: this machine only)")


def check_ports_free(address: str, ports: dict[str, int]) -> None:
    """Binds each port on `address` and lets go at once (nothing listens, nothing is accepted):
    the address must be one of this machine's and no other server may hold a port, else one
    line, instead of Triton's whole start-up log ending in its 'already in use'."""
    check_address(address)
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise OptionError(f"--address {address}: cannot resolve it ({getattr(exc, 'strerror', None) or exc})") from None
    family, _, _, _, sockaddr = infos[0]
    for flag, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # A closed connection's TIME_WAIT does not hold the port; a listening socket does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OptionError(f"{flag} {port}: already in use on {address} (another server?); choose a "
                                      "free port") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise OptionError(f"--address {address}: not an address of this machine") from None
                if exc.errno == errno.EACCES:
                    raise OptionError(f"{flag} {port}: not allowed to listen on it here (ports below 1024 need "
                                      "privileges)") from None
                raise OptionError(f"{flag} {port}: cannot listen on {address} ({exc.strerror or exc})") from None


def client_url(address: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on `address`."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


# ---- its log -------------------------------------------------------------------------------

# What tritonserver 2.51 logs at start-up on a machine without an NVIDIA driver: errors and
# warnings by their look, all harmless there (no pinned memory, no CUDA pool, no GPU metrics).
NO_GPU_LINES = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM unable to start",
                "Unable to allocate pinned system memory", "CUDA memory pool disabled")
NO_GPU_NOTE = ("note: no NVIDIA GPU driver here: tritonserver's start-up messages about CUDA, NVML and DCGM are "
               "expected on a CPU machine and hidden (--debug shows them); GPU metrics are off\n")


def relay_log(pipe, out, verbatim: bool = False) -> None:
    """Copies tritonserver's output (a binary pipe) to the text stream `out`, line by line until
    the pipe closes, with NO_GPU_LINES replaced by NO_GPU_NOTE once (all of it when `verbatim`)."""
    noted = False
    while True:
        try:
            raw = pipe.readline()
        except (OSError, ValueError):  # the pipe was closed under us
            return
        if not raw:
            return
        line = raw.decode("utf-8", "replace")
        if not verbatim and any(s in line for s in NO_GPU_LINES):
            if noted:
                continue
            line, noted = NO_GPU_NOTE, True
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):  # our stderr is gone: keep draining, so Triton never blocks on it
            pass


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a killed `serve` leaves no
    server behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
