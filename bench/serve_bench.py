"""`blip2-edge serve` under load, on loopback: closed-loop clients, Triton's dynamic batching on
and off, every response checked against the pipeline's own answer.

    flock /tmp/blip2-heavy.lock python bench/serve_bench.py --python-env /path/to/serve-venv

Each client sends one request (an encoded image and a prompt, shape [1, 1]; generation options
as request parameters), waits for the answer, and sends the next: requests/s, p50 and p99
latency per concurrency level. The requests cycle through distinct images x prompts; each
answer must equal the pipeline's answer for that request run alone (0 wrong), and every
request must be answered (0 lost).

Decode is memory-bound: at batch 1 every decode step reads all of the decoder's weights for one
token. The decode floor printed is weights / measured read bandwidth per step; a batch of B
reads them once for B tokens, so batching can multiply decode throughput until compute, or the
vision stage (compute-bound, no gain from batching), dominates.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, ensure_fp32_artifacts, graph_weight_bytes, machine, read_bandwidth  # noqa: E402
from runtime import synthetic  # noqa: E402

PROMPTS = ("", "a photo of")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(art: Path, python_env: Path, dynamic: bool, max_batch: int, delay_ms: float, log: Path):
    ports = free_ports(3)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(art), "--address", "127.0.0.1",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--python-env", str(python_env), "--max-batch", str(max_batch), "--max-queue-delay-ms", str(delay_ms)]
    if not dynamic:
        cmd.append("--no-dynamic-batching")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, ports[0]
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready in 300 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_level(port: int, cases: list, concurrency: int, n_requests: int, options: dict) -> dict:
    """Closed loop: `concurrency` clients share `n_requests` requests."""
    import numpy as np
    import tritonclient.http as httpclient

    lock = threading.Lock()
    state = {"next": 0}
    latencies, wrong, lost = [], [], []

    def client():
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=600, network_timeout=600)
        try:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= n_requests:
                    return
                image, prompt, want = cases[i % len(cases)]
                inputs = []
                for name, value in (("image", image), ("prompt", prompt.encode())):
                    t = httpclient.InferInput(name, [1, 1], "BYTES")
                    t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
                    inputs.append(t)
                t0 = time.perf_counter()
                try:
                    r = c.infer("blip2", inputs, parameters=options, timeout=600)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    lost.append(f"{type(exc).__name__}: {exc}")
                    continue
                latency = time.perf_counter() - t0
                got = (r.as_numpy("text")[0, 0].decode(), r.as_numpy("tokens")[0].tolist())
                with lock:
                    latencies.append(latency)
                    if got != want:
                        wrong.append((i, got, want))
        finally:
            c.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p99": q[98], "n": n_requests,
            "wrong": len(wrong), "lost": len(lost), "errors": lost[:3], "mismatch": wrong[:2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--python-env", type=Path, default=Path(os.environ.get("BLIP2_SERVE_PYTHON_ENV", sys.prefix)),
                    help="the model's Python environment (numpy<2, nvidia-pytriton)")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests", default="6,12,32,64", help="requests per level")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]

    from runtime.pipeline import Blip2Pipeline

    _, art = ensure_fp32_artifacts(args.model)
    n = args.new_tokens
    options = {"max_new_tokens": n, "min_new_tokens": n}  # EOS forbidden: the same work per request
    pipe = Blip2Pipeline.from_artifacts(art)
    cases = []
    for _, im in synthetic.make_scenes(args.images, seed=7, image_size=224):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        for prompt in PROMPTS:
            r = pipe.generate([im], [prompt or pipe.caption_prompt(None)], **options)[0]
            cases.append((buf.getvalue(), prompt, (r.text, r.tokens)))
    weights = graph_weight_bytes(pipe.manifest.stage_file("decoder"))
    del pipe
    bandwidth = read_bandwidth()
    print(f"# serve_bench: {args.model} model, CPU, {machine()}")
    print(f"# {n} new tokens per request, {len(cases)} distinct requests (images x prompts), loopback HTTP; "
          f"dynamic batching: --max-batch {args.max_batch} --max-queue-delay-ms {args.max_queue_delay_ms}")
    print(f"# decoder weights {weights / 1e6:.0f} MB, read bandwidth {bandwidth / 1e9:.1f} GB/s: decode floor "
          f"{weights / bandwidth * 1e3:.1f} ms per step at batch 1, {n * weights / bandwidth:.2f} s per request")
    results = {}
    for dynamic in (False, True):
        log = REPO / "bench" / "out" / f"serve_bench_{'on' if dynamic else 'off'}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, port = start_server(art, args.python_env, dynamic, args.max_batch, args.max_queue_delay_ms, log)
        try:
            run_level(port, cases, 2, 4, options)  # warm-up (sessions, first batches)
            for c, count in zip(levels, counts):
                results[dynamic, c] = run_level(port, cases, c, count, options)
                r = results[dynamic, c]
                print(f"  batching {'on ' if dynamic else 'off'} c={c:<3} {r['rps']:6.2f} req/s  p50 {r['p50']:6.2f} s"
                      f"  p99 {r['p99']:6.2f} s  ({r['n']} requests, {r['wrong']} wrong, {r['lost']} lost)",
                      flush=True)
                for e in r["errors"] + r["mismatch"]:
                    print(f"    {e}")
        finally:
            stop_server(proc)
    print("\n| clients | off req/s | off p50 s | off p99 s | on req/s | on p50 s | on p99 s | on/off req/s | wrong | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        off, on = results[False, c], results[True, c]
        print(f"| {c} | {off['rps']:.2f} | {off['p50']:.2f} | {off['p99']:.2f} | {on['rps']:.2f} | {on['p50']:.2f} | "
              f"{on['p99']:.2f} | {on['rps'] / off['rps']:.2f}x | {off['wrong'] + on['wrong']} | "
              f"{off['lost'] + on['lost']} |")
    bad = sum(r["wrong"] + r["lost"] for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
