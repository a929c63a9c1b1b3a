"""`blip2-edge triton-repo`: a standard model repository that the stock tritonserver binary (the
one nvidia-pytriton bundles) serves with no blip2-edge process around it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from runtime.errors import install_command
from runtime.synthetic import make_scenes
from tests.conftest import REPO, run_cli
from tests.runtime.serving_support import free_ports, inputs, png_bytes, running, serve_python_env


def test_repository_layout(toy_artifacts, tmp_path):
    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, out, "--max-batch", "4", "--max-queue-delay-ms", "2.5",
                "--instances", "2")
    assert r.returncode == 0, r.stderr
    config = (out / "blip2" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config
    assert "dynamic_batching { max_queue_delay_microseconds: 2500 }" in config
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
    assert re.search(r'key: "artifacts" value: \{ string_value: "artifacts" \}', config)
    assert "code_root" not in config  # a fleet repository uses the installed blip2-edge
    assert "runtime.serving.triton_model" in (out / "blip2" / "1" / "model.py").read_text()
    copied = out / "blip2" / "artifacts"
    from runtime.artifact.manifest import load_manifest

    load_manifest(copied, verify=True).ensure_verified()  # complete and every hash matches
    assert sorted(p.name for p in copied.rglob("*") if p.is_file()) == \
        sorted(["manifest.json", *(os.path.basename(f) for f in load_manifest(copied).data["files"])])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]  # no temporary or lock left


def test_existing_output_is_refused_and_left_alone(toy_artifacts, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = run_cli("triton-repo", toy_artifacts, out)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert "already exists; triton-repo writes a new directory" in r.stderr  # it has no --overwrite to suggest
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_bad_artifact_directory_writes_nothing(tmp_path):
    r = run_cli("triton-repo", tmp_path / "missing", tmp_path / "repo")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "repo").exists()


def test_artifacts_serving_cannot_run_are_refused(retrieval_tiny_artifacts, instructblip_t5_tiny_artifacts,
                                                  toy_artifacts, tmp_path):
    """A retrieval model has no Triton model yet; the ensemble's Q-Former step gets no instruction;
    its decoder asked to run on CUDA cannot with an fp32 shared KV cache (ONNX Runtime's kernel is fp16)."""
    for args, words in (([retrieval_tiny_artifacts], "captioning and question answering models only"),
                        ([instructblip_t5_tiny_artifacts, "--ensemble"], "--ensemble does not support InstructBLIP"),
                        ([toy_artifacts, "--ensemble", "--device", "cuda"], "--kv-cache concat"),
                        ([toy_artifacts, "--device", "cuda"], "--kv-cache concat")):
        out = tmp_path / "repo"
        r = run_cli("triton-repo", args[0], out, *args[1:])
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists()


def printed_command(stdout: str) -> str:
    """The shell line triton-repo prints to serve its repository on this machine."""
    lines = stdout.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith("serve it on this machine")]
    return lines[i + 1].strip()


def test_the_printed_command_serves_the_repository(toy_artifacts, tmp_path):
    """The command triton-repo prints, run exactly as printed by a shell started elsewhere (the
    bundled tritonserver, its backend directory, the environment it needs), loads the
    repository and answers as the pipeline does; SIGTERM stops it. Loopback only.
    --code-root: this checkout's runtime, since the model environment may have another
    blip2-edge installed (or none)."""
    python_env = serve_python_env()
    from runtime.pipeline import Blip2Pipeline

    out = tmp_path / "repo"
    ports = free_ports(3)
    r = run_cli("triton-repo", toy_artifacts, out, "--name", "toy", "--code-root", REPO, "--python-env", python_env,
                "--address", "127.0.0.1", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                "--exit-timeout", 10)
    assert r.returncode == 0, r.stderr
    line = printed_command(r.stdout)
    assert "tritonserver --model-repository=" in line and "--backend-directory=" in line
    assert "--http-address=127.0.0.1" in line and "--grpc-address=127.0.0.1" in line
    import tritonclient.http as httpclient

    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    image = png_bytes(make_scenes(1, seed=5)[0][1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running(line, ports, tmp_path / "tritonserver.log", cwd=elsewhere) as s:
        client = s.http()
        try:
            res = client.infer("toy", inputs(httpclient, image, "a photo of"), parameters={"num_beams": 2},
                               timeout=120)
        finally:
            client.close()
    assert s.proc.returncode == 0, (tmp_path / "tritonserver.log").read_text()[-2000:]
    want = pipe.generate([Image.open(io.BytesIO(image))], ["a photo of"], num_beams=2)[0]
    assert res.as_numpy("text")[0, 0].decode() == want.text
    assert res.as_numpy("tokens")[0].tolist() == want.tokens


def test_printed_command_says_what_it_needs(toy_artifacts, tmp_path):
    """Without --code-root, a model environment without blip2-edge is named; the ensemble (no
    ONNX Runtime backend in the bundled tritonserver) gets no command, and says why."""
    python_env = serve_python_env()
    from runtime.serving import server

    r = run_cli("triton-repo", toy_artifacts, tmp_path / "repo", "--python-env", python_env)
    assert r.returncode == 0, r.stderr
    printed_command(r.stdout)
    if not server.inspect_env(python_env).blip2_edge:
        assert f"first install blip2-edge in {python_env}" in r.stdout
    r = run_cli("triton-repo", toy_artifacts, tmp_path / "ens", "--ensemble")
    assert r.returncode == 0, r.stderr
    assert "not served here: the ensemble needs Triton's ONNX Runtime backend" in r.stdout
    assert "serve it on this machine" not in r.stdout and "docs/serving.md, Fleets" in r.stdout


def test_lasting_backend_directory_is_made_again_when_stale(tmp_path, monkeypatch):
    """The printed command's backend directory: links to the bundled backend and the stub for
    this Python; a changed or removed one is made again, whole."""
    python_env = serve_python_env()
    from runtime.serving import server

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = server.check_model_env(python_env)
    backends = server.lasting_backend_home(env)
    assert str(backends).startswith(str(tmp_path / "cache" / "blip2-edge" / "triton-backends"))
    stub = backends / "python" / server.STUB
    assert stub.resolve() == (env.dist / "python_backend_stubs" / env.python / server.STUB).resolve()
    assert (backends / "python" / "libtriton_python.so").resolve().is_file()
    stub.unlink()
    stub.symlink_to(tmp_path)  # stale: points elsewhere
    assert server.lasting_backend_home(env) == backends
    assert stub.resolve() == (env.dist / "python_backend_stubs" / env.python / server.STUB).resolve()
    assert [p.name for p in backends.parent.parent.iterdir()] == [backends.parent.name]  # nothing partial left


@pytest.mark.parametrize("args, words", [
    (["--code-root", "/nonexistent"], "--code-root /nonexistent: no such directory"),
    (["--code-root", "HERE"], "not a blip2-edge checkout"),
    (["--ensemble", "--stream"], "--stream applies to the Python-backend repository only"),
    (["--device", "gpu"], "--device 'gpu': use one of cpu, cuda, auto"),
    (["--address", "bad host!"], "not an IP address or a host name"),
    (["--http-port", "70000"], "--http-port must be in [1, 65535]"),
    (["--exit-timeout", "-1"], "--exit-timeout must be in"),
    (["--python-env", "/nonexistent"], "no bin/python"),
])
def test_triton_repo_option_errors_are_one_line_and_write_nothing(toy_artifacts, tmp_path, args, words):
    out = tmp_path / "repo"
    args = [str(tmp_path) if a == "HERE" else a for a in args]
    r = run_cli("triton-repo", toy_artifacts, out, *args)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_ensemble_variant_is_written(toy_artifacts, tmp_path):
    """The GPU ensemble (unverified here: no GPU): its configs wire preprocess -> vision ->
    qformer -> llm with the stage graphs beside their configs."""
    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, out, "--ensemble")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["blip2", "blip2_llm", "blip2_preprocess", "blip2_qformer", "blip2_vision"]
    ensemble = (out / "blip2" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble
    assert [m for m in re.findall(r'model_name: "(\w+)"', ensemble)] == \
        ["blip2_preprocess", "blip2_vision", "blip2_qformer", "blip2_llm"]
    for stage in ("vision", "qformer"):
        config = (out / f"blip2_{stage}" / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config and "KIND_GPU" in config
        assert (out / f"blip2_{stage}" / "1" / f"{stage}.onnx").is_file()


@pytest.fixture(scope="module")
def precisions(tmp_path_factory, toy_artifacts, toy_concat_artifacts, tiny_checkpoint) -> dict:
    """Artifact directories of each precision the ensemble meets: the FP32 toy, an FP16 export,
    INT8 QDQ for the GPU (`quantize --target gpu`) and for the CPU (the default target)."""
    from calibration.quantize import QuantizeOptions, quantize
    from calibration.visual import VisualOptions
    from exporter.export import ExportOptions, export
    from exporter.loading import LoadOptions

    root = tmp_path_factory.mktemp("precisions")
    dirs = {"fp32": toy_artifacts, "fp16": root / "fp16", "int8-gpu": root / "int8-gpu", "int8-cpu": root / "int8-cpu"}
    export(str(tiny_checkpoint), dirs["fp16"], ExportOptions(load=LoadOptions(dtype="fp16")), log=lambda s: None)
    for name, source, target in (("int8-gpu", toy_concat_artifacts, "gpu"), ("int8-cpu", toy_artifacts, "cpu")):
        quantize(source, dirs[name], QuantizeOptions(num_calib=8, held_out=8, gate=False,
                                                     visual=VisualOptions(target=target)), log=lambda s: None)
    return dirs


def parsed_configs(repo) -> dict:
    """model name -> its config.pbtxt parsed by Triton's own ModelConfig protobuf (a field Triton
    does not know, or a malformed file, fails here)."""
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return {p.parent.name: text_format.Parse(p.read_text(), model_config.ModelConfig())
            for p in sorted(repo.glob("*/config.pbtxt"))}


@pytest.mark.parametrize("kind, precision", [("fp32", "FP32"), ("fp16", "FP16"), ("int8-gpu", "INT8")])
def test_ensemble_tensorrt_accelerator_follows_the_manifest(precisions, tmp_path, kind, precision):
    """Each visual stage's TensorRT accelerator: the artifact's precision (never FP16 for an FP32
    graph), engine and timing caches in the stage model's own directory (absolute: ONNX Runtime
    resolves a relative one against tritonserver's working directory), and one optimization
    profile over Triton's batch sizes with the manifest's other dims."""
    from runtime.artifact.manifest import load_manifest

    out = tmp_path / "repo"
    r = run_cli("triton-repo", precisions[kind], out, "--ensemble", "--max-batch", "4", "--instances", "2")
    assert r.returncode == 0, r.stderr
    configs = parsed_configs(out)
    assert {c.max_batch_size for c in configs.values()} == {4}  # the ensemble's is no larger than its steps'
    m = load_manifest(precisions[kind])
    for stage in ("vision", "qformer"):
        config = configs[f"blip2_{stage}"]
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        params = dict(accelerator.parameters)
        assert accelerator.name == "tensorrt" and params["precision_mode"] == precision
        cache = out.absolute() / f"blip2_{stage}" / "trt_cache"
        assert cache.is_dir() and params["trt_engine_cache_path"] == params["trt_timing_cache_path"] == str(cache)
        assert params["trt_engine_cache_enable"] == params["trt_timing_cache_enable"] == "1"
        (spec,) = m.stages[stage]["inputs"]
        fixed = "x".join(str(d) for d in spec["shape"][1:])
        assert params["trt_profile_min_shapes"] == f"{spec['name']}:1x{fixed}"
        assert params["trt_profile_opt_shapes"] == params["trt_profile_max_shapes"] == f"{spec['name']}:4x{fixed}"
        data_type = pytest.importorskip("tritonclient.grpc.model_config_pb2").DataType.Name
        assert [data_type(i.data_type) for i in config.input] == ["TYPE_FP16" if precision == "FP16" else "TYPE_FP32"]
        assert config.instance_group[0].count == 2
    if precision != "FP16":
        assert "FP16" not in (out / "blip2_vision" / "config.pbtxt").read_text()


def test_ensemble_caches_elsewhere_and_batching_off(precisions, tmp_path):
    """--trt-cache-dir: one subdirectory per stage model there; --no-dynamic-batching: every model
    takes one request (an ensemble larger than its steps is refused by Triton), profile of 1."""
    out = tmp_path / "repo"
    r = run_cli("triton-repo", precisions["fp32"], out, "--ensemble", "--no-dynamic-batching",
                "--trt-cache-dir", tmp_path / "cache", "--name", "toy")
    assert r.returncode == 0, r.stderr
    configs = parsed_configs(out)
    assert {c.max_batch_size for c in configs.values()} == {1}
    for stage in ("vision", "qformer"):
        config = configs[f"toy_{stage}"]
        assert not config.HasField("dynamic_batching")
        params = dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
        assert params["trt_engine_cache_path"] == str((tmp_path / "cache" / f"toy_{stage}").absolute())
        assert params["trt_profile_max_shapes"].split(":")[1].startswith("1x")
        assert not (out / f"toy_{stage}" / "trt_cache").exists()


def test_ensemble_refuses_what_tensorrt_cannot_read(precisions, tmp_path):
    """An artifact quantized for the CPU (uint8 activations, INT32 biases) cannot be built by the
    ensemble's TensorRT accelerator: refused in one line naming the command, nothing written."""
    out = tmp_path / "repo"
    r = run_cli("triton-repo", precisions["int8-cpu"], out, "--ensemble")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "uint8 activations" in r.stderr and "blip2-edge quantize SRC OUT --target gpu" in r.stderr
    assert not out.exists()
    r = run_cli("triton-repo", precisions["fp32"], out, "--trt-cache-dir", tmp_path)  # no TensorRT to cache for
    assert r.returncode == 2 and "--ensemble only" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_serve_without_pytriton_names_the_extra(toy_artifacts, tmp_path):
    """A model environment without nvidia-pytriton: serve says which extra to install, in one
    line, before any server starts."""
    bare = tmp_path / "bare-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    r = run_cli("serve", toy_artifacts, "--python-env", bare)
    assert r.returncode == 2, r.stderr
    assert install_command("serve") in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--http-port", "9000", "--grpc-port", "9000"], "must differ"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue-delay-ms", "-1"], "--max-queue-delay-ms"),
    (["--name", "a/b"], "model name"),
    (["--name", "x", "--name", "y"], "--name given 2 times"),
    (["--address", "bad host!"], "--address 'bad host!': not an IP address or a host name"),
    (["--address", ""], "not an IP address or a host name"),
    (["--address", "203.0.113.7"], "--address 203.0.113.7: not an address of this machine"),  # TEST-NET-3
    (["--device", "gpu"], "--device 'gpu'"),
    (["--exit-timeout", "3e9"], "--exit-timeout must be in [0, 2147483647]"),
    (["--intra-op-threads", "-1"], "--intra-op-threads"),
])
def test_serve_option_errors_are_one_line(toy_artifacts, args, words):
    r = run_cli("serve", toy_artifacts, *args)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_serve_port_in_use_is_one_line_before_triton_starts(toy_artifacts):
    """A port another server listens on: one line naming the flag and the port, before Triton
    (or even the model environment) is tried; nothing of Triton's log."""
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--http-port", "--grpc-port", "--metrics-port"):
            others = [p for p in free_ports(3) if p != port][:2]
            ports = dict(zip([f for f in ("--http-port", "--grpc-port", "--metrics-port") if f != flag], others))
            ports[flag] = port
            t0 = time.monotonic()
            r = run_cli("serve", toy_artifacts, "--address", "127.0.0.1", *[str(x) for kv in ports.items() for x in kv])
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert r.stderr == f"error: {flag} {port}: already in use on 127.0.0.1 (another server?); choose a free port\n"
            assert time.monotonic() - t0 < 60


def test_serve_in_a_numpy2_environment_points_at_python_env(toy_artifacts, tmp_path):
    """The command's own environment has numpy 2 and no nvidia-pytriton (what a first try
    meets): installing the extra there is the wrong advice; the line says to use a separate
    environment through --python-env. The environment: a bare venv that sees this interpreter's
    packages (numpy 2 here) and no nvidia-pytriton."""
    import importlib.util
    import sysconfig

    import numpy as np

    if int(np.__version__.split(".")[0]) < 2 or importlib.util.find_spec("pytriton") is not None:
        pytest.skip("needs numpy 2 and no nvidia-pytriton in the test's interpreter")
    env = tmp_path / "numpy2-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "layers.pth").write_text(f"{sysconfig.get_path('purelib')}\n")
    r = run_cli("serve", toy_artifacts, "--python-env", env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "nvidia-pytriton" in r.stderr and f"numpy {np.__version__}" in r.stderr and "--python-env DIR" in r.stderr


def test_several_directories_are_several_models(toy_artifacts, tmp_path):
    from runtime.serving.repository import model_names

    assert model_names([tmp_path / "fp32"]) == ["blip2"]
    assert model_names([tmp_path / "fp32", tmp_path / "int8"]) == ["fp32", "int8"]
    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, toy_artifacts, out, "--name", "fp32", "--name", "int8")
    assert r.returncode == 0, r.stderr
    for name in ("fp32", "int8"):
        assert f'name: "{name}"' in (out / name / "config.pbtxt").read_text()
        assert (out / name / "artifacts" / "manifest.json").is_file()
    r = run_cli("triton-repo", toy_artifacts, toy_artifacts, tmp_path / "repo2")
    assert r.returncode == 2 and "named alike" in r.stderr
