"""What the serving tests share: a Python environment Triton's Python backend can run the model
in, free loopback ports, a `blip2-edge serve` (or bare tritonserver) process that is always
stopped, and KServe v2 requests built with tritonclient."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 120


def serve_python_env() -> Path:
    """The environment the model runs in under Triton: $BLIP2_SERVE_PYTHON_ENV (a venv made from
    .ci/requirements-serve.txt), else this one if it qualifies. Triton 2.51's Python backend,
    bundled with nvidia-pytriton, needs numpy<2 there."""
    pytest.importorskip("tritonclient.http", reason="needs tritonclient (the 'serve' extra)")
    env = os.environ.get("BLIP2_SERVE_PYTHON_ENV")
    if env:
        return Path(env)
    import importlib.util

    if importlib.util.find_spec("pytriton") is None or int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("needs nvidia-pytriton with numpy<2 in the model's environment: set BLIP2_SERVE_PYTHON_ENV "
                    "to a venv made from .ci/requirements-serve.txt")
    return Path(sys.prefix)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_ready(http_port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        if http_status(f"http://127.0.0.1:{http_port}/v2/health/ready") == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"server not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, group: bool = False) -> int:
    """SIGTERM, then SIGKILL if it does not end in time; returns the exit status. `group`: the
    signals go to its process group (a shell line started in a session of its own)."""
    def send(sig):
        if group:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        else:
            proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


class Server:
    def __init__(self, proc: subprocess.Popen, ports: list[int], log: Path):
        self.proc, self.log = proc, log
        self.http_port, self.grpc_port, self.metrics_port = ports

    def http(self):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}", connection_timeout=REQUEST_TIMEOUT_S,
                                                network_timeout=REQUEST_TIMEOUT_S)

    def grpc(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")


@contextmanager
def running(cmd: list[str] | str, ports: list[int], log: Path, env: dict | None = None, cwd: Path = REPO):
    """Starts `cmd` (a server on `ports`; a string: a shell line, run by bash in a session of its
    own), waits until ready, yields a Server, always stops it."""
    shell = isinstance(cmd, str)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", cmd] if shell else cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=shell)
    try:
        wait_ready(ports[0], proc, log)
        yield Server(proc, ports, log)
    finally:
        stop(proc, group=shell)


def serve_command(artifacts: Path, ports: list[int], python_env: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", str(artifacts), "--address", "127.0.0.1",
            "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--python-env", str(python_env), *extra]


# ---- requests ------------------------------------------------------------------------------

def inputs(module, image: bytes | None, prompt: str | None = None):
    """The request's input tensors, each with shape [1, 1] as a client sends them (module:
    tritonclient.http or tritonclient.grpc); generation options go as request parameters."""
    out = []
    for name, value in (("image", image), ("prompt", None if prompt is None else prompt.encode("utf-8"))):
        if value is not None:
            t = module.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            out.append(t)
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small valid PNG whose header declares width x height pixels (10 Gpx by default): what a
    decompression bomb looks like before decoding."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = crc.to_bytes(4, "big")
    return bytes(data)


# ---- the examples in docs/serving.md -------------------------------------------------------

def doc_block(test_name: str) -> str:
    """The code block of docs/serving.md that follows the comment naming `test_name` (the page's
    examples are run as written, so that they cannot go stale)."""
    text = (REPO / "docs" / "serving.md").read_text()
    marker = text.index(f"<!-- tested by tests/runtime/test_serving.py: {test_name} -->")
    start = text.index("```", marker)
    start = text.index("\n", start) + 1
    return text[start:text.index("\n```", start) + 1]
