"""serve and triton-repo take the engine choice as caption does (issue 24): --backend and
--precision are recorded in the model's config.pbtxt and the pipeline Triton's Python backend
loads from it runs on them. No Triton needed: the repository is written by the real command and
loaded with the stub's own loader (runtime.serving.pipeline_model.load_pipeline)."""

from __future__ import annotations

import re

import pytest

from runtime.serving.pipeline_model import load_pipeline
from tests.conftest import run_cli
from tests.runtime.test_openvino import needs_openvino


def config_params(config: str) -> dict[str, str]:
    return dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', config))


def written(toy_artifacts, tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, out, *args)
    assert r.returncode == 0, r.stderr
    return config_params((out / "blip2" / "config.pbtxt").read_text()), str(out / "blip2")


def test_the_default_is_auto_as_for_caption(toy_artifacts, tmp_path):
    params, _ = written(toy_artifacts, tmp_path)
    assert params["backend"] == "auto" and params["precision"] == "f32"


@needs_openvino
def test_the_backend_reaches_the_served_pipeline(toy_concat_artifacts, tmp_path):
    params, model_dir = written(toy_concat_artifacts, tmp_path, "--backend", "openvino")
    assert params["backend"] == "openvino"
    pipe = load_pipeline(params, model_dir)
    assert {s: p["engine"] for s, p in pipe.artifact.placement.items()} == dict.fromkeys(pipe.stage_names, "openvino")
    assert {p["precision"] for p in pipe.artifact.placement.values()} == {"f32"}


def test_a_repository_without_a_backend_stays_on_onnx_runtime(toy_artifacts, tmp_path):
    params, model_dir = written(toy_artifacts, tmp_path, "--backend", "onnxruntime")
    del params["backend"], params["precision"]  # as written before they were recorded
    pipe = load_pipeline(params, model_dir)
    assert {p["engine"] for p in pipe.artifact.placement.values()} == {"onnxruntime"}


@pytest.mark.parametrize("args, words", [
    (["--backend", "onnxruntime", "--precision", "bf16"], "needs --backend openvino"),
    (["--precision", "bf16"], "--backend auto chooses each stage's precision itself"),
    (["--ensemble", "--backend", "openvino"], "--backend openvino applies to the Python-backend repository only"),
])
def test_engine_option_errors_are_one_line_and_write_nothing(toy_artifacts, tmp_path, args, words):
    out = tmp_path / "repo"
    r = run_cli("triton-repo", toy_artifacts, out, *args)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()
