"""`blip2-edge triton-repo`: a standard model repository that the stock tritonserver binary (the
one nvidia-pytriton bundles) serves with no blip2-edge process around it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

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


def test_served_by_the_bundled_tritonserver(toy_artifacts, tmp_path):
    """The repository alone, under `tritonserver --model-repository OUT` (with the bundled
    Python backend), answers as the pipeline does. --code-root: this checkout's runtime, since
    the test's model environment may have another blip2-edge installed."""
    python_env = serve_python_env()
    from runtime.pipeline import Blip2Pipeline
    from runtime.serving import server

    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, out, "--name", "toy", "--code-root", REPO)
    assert r.returncode == 0, r.stderr
    ports = free_ports(3)
    env = server.check_model_env(python_env)
    cmd = server.server_command(env, out, server.backend_home(env, tmp_path / "home"), *ports, "127.0.0.1", 10)
    import tritonclient.http as httpclient

    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    image = png_bytes(make_scenes(1, seed=5)[0][1])
    with running(cmd, ports, tmp_path / "tritonserver.log", env=server.server_env(env)) as s:
        client = s.http()
        try:
            res = client.infer("toy", inputs(httpclient, image, "a photo of"), parameters={"num_beams": 2},
                               timeout=120)
        finally:
            client.close()
    want = pipe.generate([Image.open(io.BytesIO(image))], ["a photo of"], num_beams=2)[0]
    assert res.as_numpy("text")[0, 0].decode() == want.text
    assert res.as_numpy("tokens")[0].tolist() == want.tokens


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


def test_serve_without_pytriton_names_the_extra(toy_artifacts, tmp_path):
    """A model environment without nvidia-pytriton: serve says which extra to install, in one
    line, before any server starts."""
    bare = tmp_path / "bare-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    r = run_cli("serve", toy_artifacts, "--python-env", bare)
    assert r.returncode == 2, r.stderr
    assert "blip2-edge[serve]" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--http-port", "9000", "--grpc-port", "9000"], "must differ"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue-delay-ms", "-1"], "--max-queue-delay-ms"),
    (["--name", "a/b"], "model name"),
    (["--name", "x", "--name", "y"], "--name given 2 times"),
])
def test_serve_option_errors_are_one_line(toy_artifacts, args, words):
    r = run_cli("serve", toy_artifacts, *args)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


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
