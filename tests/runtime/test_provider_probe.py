"""ONNX Runtime lists every provider it was built with, whether or not its libraries load; doctor
probes each GPU provider with a one-node session and skips, with the fix, what does not load
(libnvinfer.so.10 off the loader path, TensorRT 11 under a provider built on 10). The `tensorrt`
extra stays on what that provider loads. Real sessions, a real artifact, the real pyproject."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends.onnxrt import PROBE_MODEL, provider_loads
from runtime.backends.tensorrt import versions
from runtime.doctor.environment import FAIL, PASS, SKIP, Environment, environment_checks, unloadable_providers
from runtime.doctor.runs import ArtifactRun
from tests.conftest import REPO

GPU_LISTED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_probe_model_is_a_valid_one_node_graph():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "p", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert model.SerializeToString() == PROBE_MODEL
    onnx.checker.check_model(onnx.load_from_string(PROBE_MODEL))
    out = ort.InferenceSession(PROBE_MODEL, providers=["CPUExecutionProvider"]).run(None, {"x": np.array([-2.0], np.float32)})
    assert out[0].tolist() == [0.0]


def test_a_provider_that_does_not_load_is_told_from_one_that_does():
    """A session asked for [provider, CPU] keeps only the providers that loaded: here the CPU's,
    as on a GPU build whose CUDA or TensorRT libraries are missing."""
    assert provider_loads("CPUExecutionProvider")
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider in ort.get_available_providers():
            continue  # a GPU machine: test_gpu_providers_that_load_are_not_skipped
        assert not provider_loads(provider)
    listed = [p for p in GPU_LISTED if p not in ort.get_available_providers() or p == "CPUExecutionProvider"]
    assert sorted(unloadable_providers(listed)) == sorted(p for p in listed if p != "CPUExecutionProvider")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with its CUDA provider")
def test_gpu_providers_that_load_are_not_skipped():
    assert provider_loads("CUDAExecutionProvider")


def env(**kw) -> Environment:
    base = dict(python="3.10.12", platform="Linux x86_64", onnxruntime="1.22.0", providers=GPU_LISTED,
                tensorrt=None, cuda_python=None, onnxruntime_distributions=[("onnxruntime-gpu", "1.22.0")])
    return Environment(**{**base, **kw})


def test_tensorrt_11_under_a_provider_built_on_10_is_skipped_naming_the_10_x_wheels():
    checks = {c.name: c for c in environment_checks(env(tensorrt="11.4.0.106",
                                                        unloadable_providers=["TensorrtExecutionProvider"]))}
    trt = checks["TensorrtExecutionProvider"]
    assert trt.status == SKIP and "TensorRT 11.4.0.106" in trt.detail and "tensorrt-cu12>=10.3,<11" in trt.detail
    assert checks["CUDAExecutionProvider"].status == PASS
    assert checks["tensorrt"].status == PASS  # the native engines take 11.x


def test_libnvinfer_off_the_loader_path_is_skipped_naming_the_wheel_directory(tmp_path, monkeypatch):
    libs = tmp_path / "tensorrt_libs"
    libs.mkdir()
    (libs / "__init__.py").write_text("raise RuntimeError('the probe must not import this')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checks = {c.name: c for c in environment_checks(env(tensorrt="10.8.0.43",
                                                        unloadable_providers=["TensorrtExecutionProvider"]))}
    trt = checks["TensorrtExecutionProvider"]
    assert trt.status == SKIP and f"export LD_LIBRARY_PATH={libs}:$LD_LIBRARY_PATH" in trt.detail
    assert "libnvinfer.so.10" in trt.detail and "\n" not in trt.detail


def test_doctor_skips_listed_providers_that_do_not_load_instead_of_failing(tiny_concat_artifacts):
    """ONNX Runtime lists both GPU providers, neither loads: each GPU backend is a skip with the
    reason, a backend asked for by name a failure with it (a concat KV cache: the form CUDA runs)."""
    unloadable = env(unloadable_providers=["CUDAExecutionProvider", "TensorrtExecutionProvider"], tensorrt="10.8.0.43")
    checks = {c.name: c for c in ArtifactRun(tiny_concat_artifacts, unloadable, ()).run()}
    assert checks["cpu"].status == PASS
    assert checks["cuda"].status == SKIP and "lists CUDAExecutionProvider but it does not load" in checks["cuda"].detail
    assert checks["onnxruntime-trt"].status == SKIP and "libnvinfer.so.10" in checks["onnxruntime-trt"].detail
    asked = {c.name: c for c in ArtifactRun(tiny_concat_artifacts, unloadable, ("onnxruntime-trt",)).run()}
    assert asked["onnxruntime-trt"].status == FAIL and "libnvinfer.so.10" in asked["onnxruntime-trt"].detail


def test_the_tensorrt_extra_stays_on_what_the_provider_loads_and_the_native_path_takes_10_3_to_11():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
             ["optional-dependencies"]["tensorrt"]]
    spec = next(r.specifier for r in extra if r.name == "tensorrt-cu12")
    assert str(spec) == ",".join(sorted(versions.TENSORRT_EXTRA.removeprefix("tensorrt-cu12").split(",")))
    for v in ("10.3.0", "10.8.0.43", "10.16.1.11"):
        assert v in spec and versions.check_tensorrt_version(v)
    for v in ("10.2.0", "11.0.0.114", "11.4.0.106"):
        assert v not in spec
    versions.check_tensorrt_version("11.4.0.106")  # native engines: still accepted
