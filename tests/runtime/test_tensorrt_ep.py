"""ONNX Runtime's GPU providers without a GPU: the TensorRT EP's explicit profile options from
the manifest, the CUDA arena options, and the check that a session really got the provider it
asked for (real sessions on the CPU stand for one whose GPU provider failed to load)."""

from __future__ import annotations

import pytest

from runtime.artifact.manifest import load_manifest
from runtime.backends.onnxrt import (
    OrtRunner,
    check_provider,
    check_tf32_option,
    cuda_provider,
    profile_option,
    required_provider,
    tensorrt_provider,
)
from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile
from runtime.errors import Blip2EdgeError, install_command
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def parse_profile(option: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in option.split(","):
        name, dims = item.rsplit(":", 1)
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


@pytest.mark.parametrize("stage", ["vision", "qformer", "decoder"])
def test_trt_ep_gets_every_input_of_the_stage_with_min_opt_max(tiny_concat_artifacts, tmp_path, stage):
    """The concat KV cache form: the one the TensorRT provider runs (the shared one is refused)."""
    m = load_manifest(tiny_concat_artifacts)
    ranges = ProfileRanges(batch=Range(1, 2, 4), past=Range(0, 40, 128))
    shapes = stage_profile(m.stages[stage], ranges)
    name, options = tensorrt_provider(tmp_path, shapes, fp16=False, int8=False)
    assert name == "TensorrtExecutionProvider"
    for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        parsed = parse_profile(options[key])
        assert list(parsed) == [t["name"] for t in m.stages[stage]["inputs"]]
        assert parsed == {n: tuple(s[which]) for n, s in shapes.items()}
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    if stage == "decoder":
        # The whole decode range in one engine: past 0 (prefill) up to the maximum.
        heads, hd = m.model["num_heads"], m.model["head_dim"]
        assert parse_profile(options["trt_profile_min_shapes"])["past_key_0"] == (1, heads, 0, hd)
        assert parse_profile(options["trt_profile_max_shapes"])["past_key_0"] == (4, heads, 128, hd)


def test_profile_option_format():
    shapes = {"pixel_values": ((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224)), "ids": ((1, 1), (1, 5), (4, 9))}
    assert profile_option(shapes, 0) == "pixel_values:1x3x224x224,ids:1x1"
    assert profile_option(shapes, 2) == "pixel_values:8x3x224x224,ids:4x9"


def test_cuda_arena_grows_only_by_what_is_asked_and_can_be_capped():
    assert cuda_provider() == ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
    assert cuda_provider(2048)[1]["gpu_mem_limit"] == 2048 << 20


def test_tf32_off_is_the_cuda_providers_use_tf32_option():
    """ONNX Runtime parses it as a bool from "0"/"1"/"true"/"false"; left out, its default (on)
    applies, so an ONNX Runtime older than the option still loads the default settings."""
    assert cuda_provider(tf32=False) == ("CUDAExecutionProvider",
                                         {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"})
    assert "use_tf32" not in cuda_provider(1024)[1] and cuda_provider(1024, tf32=False)[1]["gpu_mem_limit"] == 1 << 30


@pytest.mark.parametrize("version, refused", [("1.17.3", True), ("1.9.0", True), ("1.18.0", False),
                                              ("1.22.0+cu126", False), ("1.30.1", False)])
def test_tf32_off_needs_an_onnxruntime_with_the_option(version, refused):
    check_tf32_option(True, version)  # TF32 on: any version
    if not refused:
        check_tf32_option(False, version)
        return
    with pytest.raises(Blip2EdgeError) as err:
        check_tf32_option(False, version)
    assert "\n" not in str(err.value) and "1.18 or newer" in str(err.value) and version in str(err.value)


def test_required_provider():
    assert required_provider("cpu") is None and required_provider("auto") is None
    assert required_provider("cuda") == "CUDAExecutionProvider"
    assert required_provider("cpu", "onnxruntime-trt") == "TensorrtExecutionProvider"
    assert required_provider("cpu", "tensorrt") == "CUDAExecutionProvider"  # its LLM stages


@pytest.mark.parametrize("wanted, hint", [("TensorrtExecutionProvider", "libnvinfer"),
                                          ("CUDAExecutionProvider", install_command("gpu"))])
def test_a_session_that_fell_back_is_refused_in_one_line(tiny_artifacts, wanted, hint):
    """What ONNX Runtime does when TensorRT's or CUDA's libraries are missing: the session
    comes up on the CPU. A real CPU session stands for it."""
    path = load_manifest(tiny_artifacts).stage_file("vision")
    with pytest.raises(Blip2EdgeError) as err:
        OrtRunner(path, ["CPUExecutionProvider"], require_provider=wanted)
    message = str(err.value)
    assert "\n" not in message and f"asked for {wanted} but ONNX Runtime gave CPUExecutionProvider" in message
    assert hint in message and "vision.onnx" in message
    assert OrtRunner(path, ["CPUExecutionProvider"], require_provider=None).device == "cpu"
    check_provider(["TensorrtExecutionProvider", "CUDAExecutionProvider"], "TensorrtExecutionProvider", path)


def test_gpu_backends_without_a_gpu_fail_in_one_line(tiny_artifacts, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    assert_one_line_error(run_cli("caption", tiny_artifacts, image, "--device", "cuda"), "--device cuda",
                          install_command("gpu"))
    assert_one_line_error(run_cli("caption", tiny_artifacts, image, "--backend", "onnxruntime-trt"),
                          "onnxruntime-trt", install_command("gpu"))


@pytest.mark.parametrize("fixture", ["tiny_concat_artifacts", "t5_tiny_artifacts"])
def test_pipeline_ranges_cover_prefill_and_every_decode_step(request, fixture):
    """The ORT TensorRT EP's profile covers the queries plus a prompt at prefill, a decode step
    at every past length up to the model's position limit, and batches of images x beams."""
    from runtime.backends.tensorrt.profiles import ORT_MAX_BATCH, PROMPT_TOKENS, pipeline_ranges
    from runtime.families import family_for

    m = load_manifest(request.getfixturevalue(fixture))
    limit = family_for(m.data).position_limit(m.model)
    r = pipeline_ranges(m.model, limit)
    queries = m.model["num_query_tokens"]
    assert r.batch.max == ORT_MAX_BATCH and r.sequence.min == 1 and r.past.min == 0
    assert r.sequence.max == min(limit or 512, queries + PROMPT_TOKENS)
    assert r.past.max == (limit or 512)
    for stage in m.stages:  # every dynamic dim of every stage has a range
        assert stage_profile(m.stages[stage], r)
