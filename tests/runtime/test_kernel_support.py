"""8-bit weight-only stages (MatMulNBits) need ONNX Runtime 1.22 where they run: the rule over
every placement, on the stage records that a real `quantize` writes, and its place in loading."""

from __future__ import annotations

import pytest

from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest
from runtime.backends.kernel_support import check_weight_only_kernels, eight_bit_stages, llm_provider, version_tuple
from runtime.errors import Blip2EdgeError

CPU_ONLY = ("CPUExecutionProvider",)
WITH_CUDA = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@pytest.fixture(scope="module")
def quantized(toy_concat_artifacts, tmp_path_factory) -> dict:
    """name -> the manifest's stages of a real quantize of the toy (and the FP32 export itself)."""
    stages = {"fp32": load_manifest(toy_concat_artifacts).stages}
    for name, llm in (("int8", LLMOptions(precision="int8")), ("int4", LLMOptions(precision="int4")),
                      ("int4-float-head", LLMOptions(precision="int4", lm_head="float")),
                      ("int4-same-head", LLMOptions(precision="int4", lm_head="same"))):
        out = tmp_path_factory.mktemp("kernels") / name
        quantize(toy_concat_artifacts, out, QuantizeOptions(num_calib=8, held_out=8, gate=False, llm=llm),
                 log=lambda s: None)
        stages[name] = load_manifest(out).stages
    return stages


def test_eight_bit_stages_are_the_int8_bodies_and_heads(quantized):
    """--llm int8, and --llm int4 with its default INT8 lm_head, hold 8-bit weights; an INT4
    LLM with a float or INT4 head, and the FP32 export, do not."""
    assert eight_bit_stages(quantized["int8"]) == ["decoder"]
    assert eight_bit_stages(quantized["int4"]) == ["decoder"]
    assert eight_bit_stages(quantized["int4-float-head"]) == []
    assert eight_bit_stages(quantized["int4-same-head"]) == []
    assert eight_bit_stages(quantized["fp32"]) == []


@pytest.mark.parametrize("device, backend, available, provider", [
    ("cpu", "onnxruntime", WITH_CUDA, "CPUExecutionProvider"),
    ("cuda", "onnxruntime", WITH_CUDA, "CUDAExecutionProvider"),
    ("auto", "onnxruntime", WITH_CUDA, "CUDAExecutionProvider"),
    ("auto", "onnxruntime", CPU_ONLY, "CPUExecutionProvider"),
    ("cpu", "tensorrt", WITH_CUDA, "CUDAExecutionProvider"),  # its LLM stages always run on ORT CUDA
    ("cuda", "onnxruntime-trt", WITH_CUDA, "CUDAExecutionProvider"),  # TensorRT does not build MatMulNBits
])
def test_where_the_llm_runs(device, backend, available, provider):
    assert llm_provider(device, backend, available) == provider


@pytest.mark.parametrize("version, expected", [("1.22.0", (1, 22)), ("1.21.1+cu118", (1, 21)),
                                               ("1.23.0.dev20250501", (1, 23)), ("1.9.0", (1, 9)),
                                               ("2.0", (2, 0)), ("unknown", (0, 0))])
def test_versions_compare_as_numbers(version, expected):
    assert version_tuple(version) == expected


@pytest.mark.parametrize("device, backend, available, where, fix", [
    ("cuda", "onnxruntime", WITH_CUDA, "no CUDA kernel", "pip install 'onnxruntime-gpu>=1.22'"),
    ("auto", "onnxruntime", WITH_CUDA, "no CUDA kernel", "pip install 'onnxruntime-gpu>=1.22'"),
    ("cpu", "tensorrt", WITH_CUDA, "no CUDA kernel", "pip install 'onnxruntime-gpu>=1.22'"),
    ("cuda", "onnxruntime-trt", WITH_CUDA, "no CUDA kernel", "pip install 'onnxruntime-gpu>=1.22'"),
    ("cpu", "onnxruntime", WITH_CUDA, "no CPU kernel", "pip install 'onnxruntime>=1.22'"),
    ("auto", "onnxruntime", CPU_ONLY, "no CPU kernel", "pip install 'onnxruntime>=1.22'"),
])
@pytest.mark.parametrize("artifact", ["int8", "int4"])
@pytest.mark.parametrize("version", ["1.18.1", "1.21.1", "1.21.1+cu118"])
def test_older_onnxruntime_is_refused_in_one_line_naming_the_version(quantized, artifact, version, device, backend,
                                                                      available, where, fix):
    with pytest.raises(Blip2EdgeError) as err:
        check_weight_only_kernels("out/q/manifest.json", quantized[artifact], device, backend, version, available)
    message = str(err.value)
    assert "\n" not in message and message.startswith("out/q/manifest.json: stage decoder holds 8-bit")
    assert f"ONNX Runtime {version} has {where} for" in message and "(8-bit arrived in 1.22)" in message
    assert fix in message and "--llm int4 --lm-head float" in message


@pytest.mark.parametrize("device, backend, available", [("cuda", "onnxruntime", WITH_CUDA),
                                                        ("cpu", "onnxruntime", CPU_ONLY),
                                                        ("cpu", "tensorrt", WITH_CUDA),
                                                        ("cuda", "onnxruntime-trt", WITH_CUDA)])
def test_what_the_installed_version_can_run_passes(quantized, device, backend, available):
    for version in ("1.22.0", "1.22.0+cu126", "1.32.0"):
        for artifact in quantized:
            check_weight_only_kernels("m", quantized[artifact], device, backend, version, available)
    for artifact in ("fp32", "int4-float-head", "int4-same-head"):  # no 8-bit weights: any version
        check_weight_only_kernels("m", quantized[artifact], device, backend, "1.18.1", available)


def test_loading_checks_the_installed_version(toy_concat_artifacts, tmp_path, monkeypatch):
    """LoadedArtifact applies the rule to this install before any session is built: an INT8
    decoder under an ONNX Runtime that calls itself 1.21.1 is refused in one line."""
    import onnxruntime

    from runtime.pipeline import Blip2Pipeline

    out = tmp_path / "q"
    quantize(toy_concat_artifacts, out, QuantizeOptions(num_calib=8, held_out=8, gate=False,
                                                        llm=LLMOptions(precision="int8")), log=lambda s: None)
    Blip2Pipeline.from_artifacts(out)  # this install (1.22 or newer) runs it
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(Blip2EdgeError, match=r"ONNX Runtime 1\.21\.1 has no CPU kernel"):
        Blip2Pipeline.from_artifacts(out)
