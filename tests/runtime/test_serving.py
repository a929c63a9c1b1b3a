"""`blip2-edge serve` for real: tritonserver on loopback ports with the toy model, KServe v2
requests over HTTP and gRPC, answers compared with the pipeline's own; bad requests; a SIGTERM
with requests in flight. Every server is stopped (SIGTERM, then SIGKILL) whatever happens."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from runtime.serving.server import NO_GPU_LINES
from runtime.synthetic import make_scenes
from tests.conftest import run_cli
from tests.runtime.serving_support import (
    REQUEST_TIMEOUT_S,
    STOP_TIMEOUT_S,
    bomb_png,
    doc_block,
    free_ports,
    http_status,
    inputs,
    png_bytes,
    running,
    serve_command,
    serve_python_env,
)

QUESTION = "Question: what colour is the shape? Answer:"


@pytest.fixture(scope="module")
def python_env():
    return serve_python_env()


@pytest.fixture(scope="module")
def pipe(toy_artifacts):
    from runtime.pipeline import Blip2Pipeline

    return Blip2Pipeline.from_artifacts(toy_artifacts)


@pytest.fixture(scope="module")
def images():
    return [png_bytes(im) for _, im in make_scenes(4, seed=11)]


@pytest.fixture(scope="module")
def server(toy_artifacts, python_env, tmp_path_factory):
    ports = free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # A long queue delay, so that concurrent requests meet in one dynamic batch.
    cmd = serve_command(toy_artifacts, ports, python_env, "--max-batch", "8", "--max-queue-delay-ms", "300", "--stream")
    with running(cmd, ports, log) as s:
        yield s


def expected(pipe, image: bytes, prompt=None, **options):
    text = prompt or pipe.caption_prompt(None)
    r = pipe.generate([Image.open(io.BytesIO(image))], [text], **options)[0]
    return r.text, r.tokens


def ask(server, image, protocol="http", prompt=None, **options):
    """One request: the image and prompt as [1, 1] tensors, the generation options as parameters."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    client = server.http() if protocol == "http" else server.grpc()
    try:
        kwargs = {"timeout": REQUEST_TIMEOUT_S} if protocol == "http" else {"client_timeout": REQUEST_TIMEOUT_S}
        r = client.infer("blip2", inputs(module, image, prompt), parameters=options or None, **kwargs)
        return r.as_numpy("text")[0, 0].decode("utf-8"), r.as_numpy("tokens")[0].tolist()
    finally:
        client.close()


def stats(server) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/blip2/stats", timeout=10) as r:
        return json.load(r)["model_stats"][0]


def test_concurrent_mixed_requests_match_the_pipeline_and_are_batched(server, pipe, images):
    """Mixed prompts, questions and generation options, over HTTP and gRPC at once: every answer
    is the one the pipeline gives that request alone, and Triton did batch them."""
    requests = []
    for i, image in enumerate(images):
        # Every request sends `prompt` (empty: caption): Triton batches requests with the same inputs.
        requests += [dict(image=image, prompt=""), dict(image=image, prompt="a photo of"),
                     dict(image=image, prompt=QUESTION), dict(image=image, prompt="", num_beams=2, max_new_tokens=8 + i)]
    before = stats(server)
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(ask, server, protocol="grpc" if i % 3 == 0 else "http", **r)
                   for i, r in enumerate(requests)]
        answers = [f.result(timeout=REQUEST_TIMEOUT_S * 2) for f in futures]
    for request, answer in zip(requests, answers):
        want = expected(pipe, **request)
        assert answer == want, {k: v for k, v in request.items() if k != "image"}
    after = stats(server)
    n_requests = after["inference_count"] - before["inference_count"]
    n_batches = after["execution_count"] - before["execution_count"]
    assert n_requests == len(requests)
    assert n_batches < n_requests, "no two requests shared a batch"


BAD_REQUESTS = {
    "not an image": (dict(image=b"this is not an image"), "not an image"),
    "truncated image": ("truncated", "cannot decode"),
    "decompression bomb": (dict(image=bomb_png(9000, 9000)), "over the limit"),  # the runtime's 8192x8192
    "10 Gpx decompression bomb": (dict(image=bomb_png(100_000, 100_000)), "refused"),  # Pillow's own limit
    "missing image": (dict(image=None, prompt="a photo of"), "image"),
    "oversize prompt": (dict(prompt="a" * 5000), "over the limit"),
    "prompt over the positions": (dict(prompt="red square " * 300), "prompt too long"),
    "num_beams 0": (dict(num_beams=0), "num_beams"),
    "top_p 2": (dict(top_p=2.0), "top_p"),
    "sampling with beams": (dict(do_sample=True, num_beams=2), "num_beams"),
    "early_stopping maybe": (dict(early_stopping="maybe"), "early_stopping"),
    "max_new_tokens not an integer": (dict(max_new_tokens=5.5), "max_new_tokens"),
    "unknown option": (dict(max_tokens=5), "unknown request parameter"),
    "max_new_tokens over the positions": (dict(max_new_tokens=100_000), "max_new_tokens"),
    "stop_strings not a JSON list": (dict(stop_strings="Question:"), "stop_strings must be a json list"),
    "stop_strings with an empty string": (dict(stop_strings='["a", ""]'), "stop_strings must be a json list"),
    "stop_strings of numbers": (dict(stop_strings="[1, 2]"), "stop_strings must be a json list"),
    "too many stop_strings": (dict(stop_strings=json.dumps(["x"] * 17)), "over the limit of 16"),
    "a stop string too long": (dict(stop_strings=json.dumps(["x" * 65])), "over the limit of 64"),
}


def _bad(name, images):
    request, words = BAD_REQUESTS[name]
    if request == "truncated":
        full = images[0]
        return dict(image=full[:len(full) // 2]), words
    request = dict(request)
    request.setdefault("image", images[0])
    return request, words


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_client_error_and_the_server_stays_up(server, images, name):
    from tritonclient.utils import InferenceServerException

    request, words = _bad(name, images)
    image = request.pop("image")
    with pytest.raises(InferenceServerException) as info:
        ask(server, image, **request)
    assert info.value.status() == "400", info.value
    assert words in str(info.value).lower(), info.value
    assert http_status(f"http://127.0.0.1:{server.http_port}/v2/health/ready") == 200


@pytest.mark.parametrize("name", ["image", "prompt"])
def test_wrong_dtype_is_refused_by_triton(server, images, name):
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    request = [t for t in inputs(httpclient, images[0], "a photo of") if t.name() != name]
    wrong = httpclient.InferInput(name, [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[5]], dtype=np.int32))
    client = server.http()
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("blip2", request + [wrong])
    finally:
        client.close()
    assert info.value.status() == "400" and name in str(info.value)


def test_bad_requests_in_a_batch_do_not_fail_the_good_ones(server, pipe, images):
    from tritonclient.utils import InferenceServerException

    good = [dict(image=im, prompt="a photo of") for im in images] + [dict(image=images[0], prompt="", num_beams=2)]
    bad = [_bad(n, images)[0] for n in ("not an image", "decompression bomb", "num_beams 0", "oversize prompt")]
    mixed = [r for pair in zip(good, bad) for r in pair] + good[len(bad):]

    def one(request):
        request = dict(request)
        request.setdefault("prompt", "")  # the same inputs in every request, so that they can share a batch
        try:
            return ask(server, request.pop("image"), **request)
        except InferenceServerException as exc:
            return exc

    before = stats(server)
    with ThreadPoolExecutor(len(mixed)) as pool:
        answers = list(pool.map(one, mixed, timeout=REQUEST_TIMEOUT_S * 2))
    for request, answer in zip(mixed, answers):
        if any(request is b for b in bad):
            assert isinstance(answer, InferenceServerException) and answer.status() == "400", answer
        else:
            assert answer == expected(pipe, **request)
    after = stats(server)
    assert after["execution_count"] - before["execution_count"] < len(mixed), "no two requests shared a batch"


def stream(server, image, prompt, **options):
    """The text pieces of one gRPC streaming request to blip2_stream, or the error it got."""
    import queue

    import tritonclient.grpc as grpcclient

    responses = queue.Queue()
    client = server.grpc()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    pieces = []
    try:
        client.async_stream_infer("blip2_stream", inputs(grpcclient, image, prompt), parameters=options or None,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=REQUEST_TIMEOUT_S)
            if error is not None:
                return error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return pieces
            pieces.append(result.as_numpy("text")[0, 0].decode("utf-8"))
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("prompt, options", [("", {"max_new_tokens": 12}), ("a photo of", {"num_beams": 2})])
def test_grpc_streaming_pieces_join_to_the_pipelines_text(server, pipe, images, prompt, options):
    pieces = stream(server, images[2], prompt, **options)
    assert isinstance(pieces, list), pieces
    assert "".join(pieces) == expected(pipe, images[2], prompt, **options)[0]
    assert len(pieces) >= 1


def test_grpc_streaming_bad_request_is_an_error_response(server, images):
    error = stream(server, b"not an image", "")
    assert not isinstance(error, list) and "not an image" in str(error)
    error = stream(server, images[0], "", num_beams=0)
    assert not isinstance(error, list) and "num_beams must be an integer >= 1" in str(error)


def test_stop_strings_parameter_ends_the_text_as_the_pipeline_does(server, pipe, images):
    """stop_strings, a JSON list sent as a string: over HTTP, gRPC and the stream, each answer is
    the pipeline's with the same stop strings (cut before the first), and "[]" turns off the
    model's own (OPT's newline) as the pipeline's empty list does."""
    full = expected(pipe, images[1])[0]
    stop = full.split()[2]  # a word the caption reaches
    for protocol in ("http", "grpc"):
        answer = ask(server, images[1], protocol=protocol, stop_strings=json.dumps([stop, "never said"]))
        assert answer == expected(pipe, images[1], stop_strings=[stop, "never said"])
        assert stop not in answer[0] and len(answer[0]) < len(full)
    pieces = stream(server, images[1], "", stop_strings=json.dumps([stop]))
    assert isinstance(pieces, list) and "".join(pieces) == expected(pipe, images[1], "", stop_strings=[stop])[0]
    assert ask(server, images[1], stop_strings="[]") == expected(pipe, images[1], stop_strings=[])


def test_malformed_json_body_is_tritons_500(server):
    """docs/serving.md: Triton's own HTTP front end answers a body that is not JSON with a 500
    before any model sees it; the server stays up."""
    url = f"http://127.0.0.1:{server.http_port}/v2/models/blip2/infer"
    for body in (b"{bad", b'{"inputs": 5}'):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 500
        assert "parse" in json.load(info.value)["error"].lower()
    assert http_status(f"http://127.0.0.1:{server.http_port}/v2/health/ready") == 200


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory):
    """Where the documented examples run: imgs/ written by the documented make-images command."""
    work = tmp_path_factory.mktemp("docs")
    r = run_cli("make-images", "imgs", "-n", "2", cwd=work)
    assert r.returncode == 0 and r.stdout.startswith("imgs/scene-000.png\t"), r.stderr
    return work


def _binary_infer(url: str, image: bytes, parameters: dict) -> dict:
    """What the documented curl line sends, built here: the JSON header, then the BYTES element
    (its length, 4 bytes little-endian, then the image), POSTed with its header length."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": parameters}, separators=(",", ":")).encode()
    body = header + len(image).to_bytes(4, "little") + image
    request = urllib.request.Request(url, data=body, headers={"Inference-Header-Content-Length": str(len(header)),
                                                              "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
        return json.load(r)


def test_documented_curl_request(server, pipe, doc_dir):
    """docs/serving.md's curl example, run as written (only the port differs) from a folder
    holding imgs/: its answer is the pipeline's (curl missing: the same bytes through urllib)."""
    block = doc_block("test_documented_curl_request")
    image = (doc_dir / "imgs" / "scene-000.png").read_bytes()
    if shutil.which("curl"):
        proc = subprocess.run(["bash", "-c", block.replace("localhost:8000", f"127.0.0.1:{server.http_port}")],
                              cwd=doc_dir, capture_output=True, timeout=REQUEST_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
    else:
        answer = _binary_infer(f"http://127.0.0.1:{server.http_port}/v2/models/blip2/infer", image,
                               {"max_new_tokens": 20})
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert (outputs["text"][0], outputs["tokens"]) == expected(pipe, image, max_new_tokens=20)


def test_documented_grpc_streaming_client(server, pipe, doc_dir):
    """docs/serving.md's streaming client, run as written (only the port differs): the pieces it
    prints are the pipeline's text."""
    code = doc_block("test_documented_grpc_streaming_client").replace("localhost:8001",
                                                                      f"127.0.0.1:{server.grpc_port}")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=doc_dir, capture_output=True, text=True,
                              timeout=REQUEST_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired as exc:
        # Before the client was closed in a `with` block, grpcio hung now and then in its __del__ at
        # interpreter exit, after the whole text: the server's log tells that from a server-side hang.
        log = "\n".join(server.log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"the client did not end; printed {exc.stdout!r}; server log tail:\n{log}") from None
    assert proc.returncode == 0, proc.stderr
    image = (doc_dir / "imgs" / "scene-000.png").read_bytes()
    assert proc.stdout == expected(pipe, image, max_new_tokens=20)[0] + "\n"


def test_gpu_start_up_messages_are_explained_not_shown(server):
    """Triton's CUDA/NVML/DCGM lines of a machine without a GPU driver never reach serve's output;
    one note says why (where the machine has no NVIDIA driver, Triton prints them)."""
    log = server.log.read_text()
    assert "ready: blip2 at http://127.0.0.1:" in log  # the log is serve's whole output
    assert not [line for line in log.splitlines() if any(s in line for s in NO_GPU_LINES)]
    if not os.path.exists("/proc/driver/nvidia/version"):
        assert log.count("note: no NVIDIA GPU driver here") == 1


def test_metrics_endpoint_counts_requests(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(l for l in text.splitlines() if l.startswith("nv_inference_request_success{") and 'model="blip2"' in l)
    assert float(line.split()[-1]) > 0


def test_sigterm_drains_requests_in_flight(toy_artifacts, python_env, images, pipe, tmp_path):
    """SIGTERM with requests running and queued: each is answered correctly or refused with an
    error (none hangs, none is answered wrongly), the process exits 0, and the port closes."""
    from tritonclient.utils import InferenceServerException

    ports = free_ports(3)
    cmd = serve_command(toy_artifacts, ports, python_env, "--max-batch", "2", "--max-queue-delay-ms", "0")
    requests = [dict(image=images[i % len(images)], max_new_tokens=12) for i in range(8)]

    def one(request):
        request = dict(request)
        try:
            return ask(server, request.pop("image"), **request)
        except InferenceServerException as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a refused connection is a clean refusal too
            return exc

    with running(cmd, ports, tmp_path / "serve.log") as server:
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(one, r) for r in requests]
            deadline = time.monotonic() + 60
            while stats(server)["inference_count"] == 0 and not any(f.done() for f in futures) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            server.proc.terminate()
            answers = [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]
        status = server.proc.wait(timeout=STOP_TIMEOUT_S)
        assert status == 0, server.log.read_text()[-2000:]
        assert "stopped: in-flight requests drained" in server.log.read_text()
    answered = 0
    for request, answer in zip(requests, answers):
        if isinstance(answer, Exception):
            continue  # refused: the client was told
        assert answer == expected(pipe, **request)
        answered += 1
    assert answered >= 1, answers  # the requests already running were finished, not dropped
    assert http_status(f"http://127.0.0.1:{ports[0]}/v2/health/live") == 0  # nothing listens any more


def test_serve_refuses_a_numpy2_environment_in_one_line(toy_artifacts, tmp_path):
    """A model environment with numpy 2 (which Triton 2.51's Python backend cannot use): one line
    saying why, exit 2, before any server starts. The environment: a bare venv that sees this
    interpreter's packages (numpy 2) first and the serving environment's nvidia-pytriton after."""
    import sysconfig

    serve_env = serve_python_env()
    env = tmp_path / "numpy2-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    serve_site = Path(sysconfig.get_path("purelib", vars={"base": str(serve_env), "platbase": str(serve_env)}))
    here = Path(sysconfig.get_path("purelib"))
    (site / "layers.pth").write_text(f"{here}\n{serve_site}\n")
    ports = free_ports(3)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(toy_artifacts), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--python-env", str(env)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "numpy<2" in proc.stderr and "Traceback" not in proc.stderr
