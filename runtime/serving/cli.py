"""`blip2-edge serve` (the runtime behind Triton) and `blip2-edge triton-repo` (a model repository)."""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from runtime.backends.stage_runners import BACKENDS, PRECISIONS, check_backend
from runtime.cli.generate import _integer
from runtime.errors import Blip2EdgeError, OptionError, install_command


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", help="artifact directories, one model each")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="model name, once per directory in order (default: 'blip2' for one directory, else the "
                        "directory names)")
    p.add_argument("--max-batch", type=_integer, default=8, help="requests per batch at most (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="how long Triton's dynamic batcher waits to fill a batch (default 5)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="run every request alone")
    p.add_argument("--stream", action="store_true",
                   help="also a '<name>_stream' model per directory: decoupled, text pieces as they are generated "
                        "(gRPC streaming)")
    p.add_argument("--instances", type=_integer, default=1, help="model instances per model (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="the pipeline's engines, as caption takes them (default auto: on the CPU with the openvino "
                        "extra in Triton's Python, each stage where it measures fastest; else ONNX Runtime)")
    p.add_argument("--precision", default="f32", choices=PRECISIONS,
                   help="OpenVINO's inference precision under --backend openvino (f32, bf16, f16)")
    p.add_argument("--intra-op-threads", type=_integer, default=0, metavar="N",
                   help="ONNX Runtime threads per stage session (default 0: one per physical core)")
    p.add_argument("--max-image-pixels", type=_integer, metavar="N", default=None,
                   help="refuse images over N pixels before decoding them (default: 8192x8192)")


def _add_server_options(p: argparse.ArgumentParser, printed: bool) -> None:
    """Where tritonserver listens and which Python runs the model: serve's server, or the
    command triton-repo prints to serve its repository on this machine (`printed`)."""
    where = " in the printed command" if printed else ""
    p.add_argument("--http-port", type=_integer, default=8000, help=f"default 8000{where}")
    p.add_argument("--grpc-port", type=_integer, default=8001, help=f"default 8001{where}")
    p.add_argument("--metrics-port", type=_integer, default=8002, help=f"default 8002{where}")
    p.add_argument("--address", default="0.0.0.0", help=f"address to listen on{where} (default 0.0.0.0; 127.0.0.1: "
                                                        "this machine only)")
    p.add_argument("--exit-timeout", type=_integer, default=30, metavar="S",
                   help=f"on SIGTERM, seconds to let in-flight requests finish{where} (default 30)")
    p.add_argument("--python-env", type=Path, default=None, metavar="DIR",
                   help="the Python environment Triton runs the model in (default: this one); it needs "
                        "blip2-edge's runtime dependencies, nvidia-pytriton and numpy<2"
                        + ("; the printed command runs its tritonserver" if printed else ""))


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve artifact directories on Triton Inference Server",
                       description="Serve artifact directories on Triton Inference Server (KServe v2 over HTTP "
                                   "and gRPC, dynamic batching, Prometheus metrics), with the tritonserver that "
                                   f"nvidia-pytriton ships ({install_command('serve')}).")
    _add_model_options(p)
    _add_server_options(p, printed=False)
    p.set_defaults(run=run_serve)

    r = sub.add_parser("triton-repo", help="write a Triton model repository for artifact directories",
                       description="Write a standard Triton model repository (Python backend, dynamic batching) "
                                   "and print the command that serves it on this machine with the tritonserver "
                                   "nvidia-pytriton bundles. Triton's Python needs blip2-edge.")
    _add_model_options(r)
    r.add_argument("out", help="the repository directory to write (must not exist)")
    r.add_argument("--code-root", type=Path, default=None, metavar="DIR",
                   help="put DIR (a blip2-edge checkout on this machine) first on the model's Python path instead "
                        "of using the blip2-edge installed in Triton's Python")
    r.add_argument("--ensemble", action="store_true",
                   help="GPU variant: vision and Q-Former on Triton's ONNX Runtime (or TensorRT) backend, the "
                        "LLM in Python, wired as an ensemble (unverified: no GPU here)")
    r.add_argument("--trt-cache-dir", type=Path, default=None, metavar="DIR",
                   help="with --ensemble: an existing directory on the serving machine where the TensorRT "
                        "accelerator keeps its engine and timing caches, one subdirectory per stage model "
                        "(default: each stage model's trt_cache directory under OUT, by absolute path)")
    _add_server_options(r, printed=True)
    r.set_defaults(run=run_triton_repo)


def _batching(args):
    from runtime.serving.model_config import BatchingSettings

    return BatchingSettings(max_batch=args.max_batch, max_queue_delay_ms=args.max_queue_delay_ms,
                            instances=args.instances, dynamic=not args.no_dynamic_batching)


def _check_model_options(args) -> list[str]:
    """The model options' own checks (no file is read); returns the model names."""
    from runtime.backends.onnxrt import DEVICES
    from runtime.preprocess import check_max_pixels
    from runtime.serving.repository import model_names

    if args.device not in DEVICES:
        raise OptionError(f"--device {args.device!r}: use one of {', '.join(DEVICES)}")
    if args.max_image_pixels is not None:
        check_max_pixels(args.max_image_pixels, "--max-image-pixels")
    if args.intra_op_threads < 0:
        raise OptionError(f"--intra-op-threads must be >= 0, got {args.intra_op_threads}")
    check_backend(args.backend, args.precision)
    if getattr(args, "ensemble", False) and args.backend not in ("auto", "onnxruntime"):
        raise OptionError(f"--backend {args.backend} applies to the Python-backend repository only: --ensemble runs "
                          "the visual stages on Triton's ONNX Runtime backend")
    return model_names(args.artifacts, args.name)


def _check_server_options(args) -> dict[str, int]:
    """Ports, address and exit timeout by their form (serve then binds the ports); returns the
    ports by flag."""
    from runtime.serving import server

    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise OptionError(f"{flag} must be in [1, 65535], got {port}")
    if len(set(ports.values())) != 3:
        raise OptionError("--http-port, --grpc-port and --metrics-port must differ")
    if not 0 <= args.exit_timeout <= server.MAX_EXIT_TIMEOUT_S:
        raise OptionError(f"--exit-timeout must be in [0, {server.MAX_EXIT_TIMEOUT_S}], got {args.exit_timeout}")
    server.check_address(args.address)
    return ports


def _models(args):
    from runtime.generation.shared_kv_cache import check_artifact_placement
    from runtime.serving.repository import load_checked

    names = _check_model_options(args)
    manifests = load_checked(args.artifacts)
    for m in manifests:  # before anything is written; the serving machine may not be this one
        check_artifact_placement(m, args.device)
    return manifests, names


def _code_root(path: Path | None) -> str | None:
    """--code-root: an existing blip2-edge checkout (the directory that holds `runtime/`)."""
    if path is None:
        return None
    root = path.absolute()
    if not root.is_dir():
        raise OptionError(f"--code-root {path}: no such directory")
    if not (root / "runtime" / "serving" / "triton_model.py").is_file():
        raise OptionError(f"--code-root {path}: not a blip2-edge checkout (no runtime/serving/triton_model.py in it)")
    return str(root)


def _local_server(args):
    """((model environment, its lasting backend directory), "") when the tritonserver bundled
    there can serve the repository on this machine, else (None, why not). A --python-env that
    was given and cannot is an error."""
    from runtime.serving import server

    if args.ensemble:
        return None, "the ensemble needs Triton's ONNX Runtime backend, which nvidia-pytriton's tritonserver lacks"
    try:
        env = server.check_model_env((args.python_env or Path(sys.prefix)).absolute())
    except Blip2EdgeError as exc:
        if args.python_env is not None:
            raise
        return None, f"{exc}"
    return (env, server.lasting_backend_home(env)), ""


def run_triton_repo(args) -> int:
    from runtime.artifact.writer import atomic_directory
    from runtime.serving import server
    from runtime.serving.repository import write_fleet_repo

    # Every option first, then the environment, then the artifacts (hashed), then the writing.
    _check_server_options(args)
    batching = _batching(args)
    if args.trt_cache_dir is not None and not args.ensemble:
        raise OptionError("--trt-cache-dir applies to --ensemble only (the other repository runs no TensorRT)")
    if args.stream and args.ensemble:
        raise OptionError("--stream applies to the Python-backend repository only, not to --ensemble")
    root = _code_root(args.code_root)
    out = Path(args.out)
    if os.path.lexists(out):
        raise Blip2EdgeError(f"{out}: already exists; triton-repo writes a new directory (remove it or name another)")
    _check_model_options(args)
    local, why_not = _local_server(args)
    manifests, names = _models(args)
    if args.ensemble:
        from runtime.serving.ensemble import write_ensemble_repo

        writer = write_ensemble_repo
        extra = {"trt_cache": args.trt_cache_dir and str(args.trt_cache_dir.absolute()), "out": out}
    else:
        writer = write_fleet_repo
        extra = {"stream": args.stream, "backend": args.backend, "precision": args.precision}
    with atomic_directory(out, overwrite=False) as tmp:
        writer(tmp, manifests, names, batching, device=args.device, max_image_pixels=args.max_image_pixels,
               intra_op_threads=args.intra_op_threads, root=root, **extra)
    print(f"{out}: Triton model repository with {', '.join(names)}")
    if local:
        env, backends = local
        cmd = server.server_command(env, out.absolute(), backends, args.http_port, args.grpc_port, args.metrics_port,
                                    args.address, args.exit_timeout)
        print(f"serve it on this machine (the tritonserver of nvidia-pytriton in {env.prefix}) with:")
        print(f"  {server.shell_line(env, cmd)}")
        if not (root or env.blip2_edge):
            print(f"  (first install blip2-edge in {env.prefix}, which has none, or write the repository with "
                  "--code-root CHECKOUT)")
    else:
        print(f"not served here: {' '.join(why_not.split())}")
    print("on other machines: Triton's container with the repository mounted (docs/serving.md, Fleets)")
    return 0


def _announce_when_ready(url: str, names: list[str], proc: subprocess.Popen) -> None:
    """Prints one line once Triton reports every model ready (a thread; quiet if it never is)."""
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    print(f"ready: {', '.join(names)} at {url} (KServe v2; gRPC and metrics ports as given)",
                          file=sys.stderr, flush=True)
                    return
        except (OSError, ValueError, http.client.HTTPException):
            pass
        time.sleep(0.5)


def run_serve(args) -> int:
    from runtime.serving import server
    from runtime.serving.repository import write_serving_repo

    # The cheap checks first (options, then the ports), then the environment, then the artifacts.
    ports = _check_server_options(args)
    batching = _batching(args)
    _check_model_options(args)
    server.check_ports_free(args.address, ports)
    model_env = server.check_model_env((args.python_env or Path(sys.prefix)).absolute())
    env = server.server_env(model_env)
    manifests, names = _models(args)
    debug = bool(getattr(args, "debug", False))
    with tempfile.TemporaryDirectory(prefix="blip2-serve-") as work:
        repo = Path(work) / "models"
        repo.mkdir()
        write_serving_repo(repo, manifests, names, batching, device=args.device,
                           max_image_pixels=args.max_image_pixels, intra_op_threads=args.intra_op_threads,
                           stream=args.stream, backend=args.backend, precision=args.precision)
        cmd = server.server_command(model_env, repo, server.backend_home(model_env, Path(work) / "home"), args.http_port,
                                    args.grpc_port, args.metrics_port, args.address, args.exit_timeout,
                                    log_verbose=debug)
        server.check_ports_free(args.address, ports)  # again: hashing the artifacts may have taken a while
        # Its own session: a terminal's Ctrl-C reaches this process only, which forwards one SIGTERM
        # (a second signal, forwarded too, makes Triton stop at once). Its output reaches our
        # stderr through server.relay_log, which hides the GPU messages of a machine without one.
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=server.die_with_parent, start_new_session=True)
        relay = threading.Thread(target=server.relay_log, args=(proc.stdout, sys.stderr, debug), daemon=True)
        relay.start()
        stopping = []

        def forward(signum, frame):
            # Triton drains on SIGTERM: new requests are refused, in-flight ones finish (up to
            # --exit-timeout), models unload. A second signal is forwarded too.
            stopping.append(signum)
            proc.send_signal(signal.SIGTERM)

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            threading.Thread(target=_announce_when_ready,
                             args=(server.client_url(args.address, args.http_port), names, proc), daemon=True).start()
            status = proc.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if proc.poll() is None:  # an exception here: never leave the server behind
                proc.kill()
                proc.wait()
            # Its last lines before ours. A model's stub may hold the pipe a little longer: the
            # relay (a daemon thread) then ends with this process.
            relay.join(timeout=5)
    if status != 0:
        what = "after SIGTERM" if stopping else "while serving"
        raise Blip2EdgeError(f"tritonserver exited with status {status} {what} (its log above says why)")
    print("stopped: in-flight requests drained", file=sys.stderr)
    return 0
