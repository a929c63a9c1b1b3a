"""runtime.serving.server without a server: Triton's log relay, the shell line triton-repo
prints, where a client reaches the server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from runtime.serving import server

# tritonserver 2.51's start-up on a machine without an NVIDIA driver (serve's output, recorded).
CPU_START = b"""W1206 04:47:31.665702 22033 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, \
pinned memory pool will not be available: CUDA driver version is insufficient for CUDA runtime version"
I1206 04:47:31.665762 22033 cuda_memory_manager.cc:117] "CUDA memory pool disabled"
E1206 04:47:31.665812 22033 server.cc:241] "CudaDriverHelper has not been initialized."
I1206 04:47:31.666761 22033 model_lifecycle.cc:472] "loading: blip2:1"
I1206 04:47:31.998994 22033 model_lifecycle.cc:839] "successfully loaded 'blip2'"
Error: Failed to initialize NVML
W1206 04:47:31.999826 22033 metrics.cc:798] "DCGM unable to start: DCGM initialization error"
I1206 04:47:31.999926 22033 metrics.cc:770] "Collecting CPU metrics"
E1206 04:47:32.005511 22033 main.cc:245] "failed to start GRPC service: Unavailable - Socket 'x:1' already in use \xff"
"""


def relayed(data: bytes, verbatim: bool = False) -> str:
    read, write = os.pipe()
    out = io.StringIO()
    with os.fdopen(read, "rb") as pipe:
        relay = threading.Thread(target=server.relay_log, args=(pipe, out, verbatim))
        relay.start()
        with os.fdopen(write, "wb") as w:
            w.write(data)
        relay.join(timeout=10)
    assert not relay.is_alive()
    return out.getvalue()


def test_relay_hides_the_no_gpu_lines_behind_one_note():
    text = relayed(CPU_START)
    lines = text.splitlines()
    assert lines[0] == server.NO_GPU_NOTE.strip()  # where the first of them was
    assert text.count("note:") == 1
    assert not [line for line in lines if any(s in line for s in server.NO_GPU_LINES)]
    # Everything else, in order, failures included; undecodable bytes do not stop it.
    assert [line.split("] ")[-1] for line in lines[1:]] == [
        '"loading: blip2:1"', "\"successfully loaded 'blip2'\"", '"Collecting CPU metrics"',
        "\"failed to start GRPC service: Unavailable - Socket 'x:1' already in use \ufffd\""]


def test_relay_verbatim_under_debug():
    assert relayed(CPU_START, verbatim=True) == CPU_START.decode("utf-8", "replace")


def test_relay_without_the_lines_adds_no_note():
    assert relayed(b"I1 model_lifecycle.cc:839] \"successfully loaded 'blip2'\"\n") == \
        "I1 model_lifecycle.cc:839] \"successfully loaded 'blip2'\"\n"


def test_printed_shell_line_gives_the_environment_serve_uses(tmp_path):
    """shell_line's variables, expanded by a shell with LD_LIBRARY_PATH set or unset, are
    server_env's: the same directories in the same order, and no empty entry (the working
    directory, to the loader) when it was unset."""
    env = server.ModelEnv(prefix=tmp_path / "model env", python="3.11", numpy="1.26.4",
                          pytriton=tmp_path / "site packages" / "pytriton")
    show = [sys.executable, "-c", "import os; print(os.environ['LD_LIBRARY_PATH']); print(os.environ['PATH'])"]
    line = server.shell_line(env, show)
    for library_path in (None, "/opt/a:/opt/b"):
        base = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        if library_path:
            base["LD_LIBRARY_PATH"] = library_path
        proc = subprocess.run(["sh", "-c", line], env=base, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(base)
            want = server.server_env(env)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert proc.stdout.splitlines() == [want["LD_LIBRARY_PATH"], want["PATH"]]
        assert "" not in want["LD_LIBRARY_PATH"].split(":")


def test_client_url():
    assert server.client_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert server.client_url("::", 8000) == "http://[::1]:8000"
    assert server.client_url("fe80::1", 1) == "http://[fe80::1]:1"
    assert server.client_url("localhost", 2) == "http://localhost:2"
