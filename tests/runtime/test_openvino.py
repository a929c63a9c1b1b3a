"""The OpenVINO backend (issue 24): per-stage parity with ONNX Runtime on real exported graphs,
token parity through the pipeline (greedy, beam, streaming), the retrieval stages, where each
stage is placed and why, the precision checks and the missing-extra message.

Tolerance, f32 against ONNX Runtime's CPU provider on the same graph: max |diff| <= 1e-4 x the
largest |value| of the output (both run f32 kernels; they differ in summation order and fusions).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from runtime import synthetic
from runtime.backends.openvino import check_precision, cpu_flags, native_precisions, precision_refusal
from runtime.backends.stage_runners import placement_line
from runtime.errors import MissingExtraError, OptionError
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline
from runtime.retriever import Blip2Retriever

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (the openvino extra)")
RELATIVE_TOLERANCE = 1e-4
THIS_CPU_HAS_BF16 = "bf16" in native_precisions(cpu_flags() or frozenset())


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = float(np.abs(want).max()) or 1.0
    diff = float(np.abs(got.astype(np.float64) - want).max())
    assert diff <= RELATIVE_TOLERANCE * scale, f"{what}: max |diff| {diff:.3g} over max |value| {scale:.3g}"


def scenes(n: int = 6):
    return [im for _, im in synthetic.make_scenes(n, seed=3)]


# ---- precision checks: pure functions over a CPU's flags ----------------------------------------

@pytest.mark.parametrize("flags, precision, native", [
    ({"avx512f", "avx512_vnni"}, "bf16", False),
    ({"avx512f", "avx512_bf16"}, "bf16", True),
    ({"amx_bf16", "amx_tile"}, "bf16", True),
    ({"avx512_bf16"}, "f16", False),
    ({"avx512_fp16"}, "f16", True),
    (set(), "f32", True),
])
def test_native_precision_follows_the_cpu_flags(flags, precision, native):
    assert (precision in native_precisions(flags)) is native
    assert (precision_refusal(precision, flags) is None) is native


def test_bf16_without_native_bf16_is_one_line_naming_the_way_out():
    with pytest.raises(OptionError) as exc:
        check_precision("bf16", "CPU", frozenset({"avx512f", "avx512_vnni"}))
    message = str(exc.value)
    assert "\n" not in message and "AVX512-BF16 or AMX-BF16" in message and "--precision f32" in message
    check_precision("bf16", "CPU", frozenset({"amx_bf16"}))  # no error where the CPU has it


def test_precision_needs_the_openvino_backend(toy_artifacts):
    with pytest.raises(OptionError, match="needs --backend openvino"):
        LoadedArtifact.open(toy_artifacts, task="generation", precision="bf16")


def test_missing_openvino_names_the_extra(toy_artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if not installed
    with pytest.raises(MissingExtraError) as exc:
        Blip2Pipeline.from_artifacts(toy_artifacts, backend="openvino")
    assert "openvino]" in str(exc.value) and "\n" not in str(exc.value)


# ---- with OpenVINO ----------------------------------------------------------------------------

@needs_openvino
def test_bf16_on_this_cpu_runs_or_is_refused_by_its_flags(toy_concat_artifacts):
    if THIS_CPU_HAS_BF16:
        art = LoadedArtifact.open(toy_concat_artifacts, task="generation", backend="openvino", precision="bf16")
        assert {p["precision"] for p in art.placement.values()} == {"bf16"}
    else:
        with pytest.raises(OptionError, match="no native bf16"):
            LoadedArtifact.open(toy_concat_artifacts, task="generation", backend="openvino", precision="bf16")


@needs_openvino
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_devices_openvino_does_not_know_are_refused(toy_artifacts, device):
    with pytest.raises(OptionError, match="for --backend openvino"):
        LoadedArtifact.open(toy_artifacts, task="generation", backend="openvino", device=device)


@needs_openvino
@pytest.mark.parametrize("fixture", ["toy_concat_artifacts", "tiny_concat_artifacts"])
def test_each_stage_matches_onnx_runtime_at_f32(fixture, request):
    path = request.getfixturevalue(fixture)
    ort = LoadedArtifact.open(path, task="generation")
    ov = LoadedArtifact.open(path, task="generation", backend="openvino", threads=None)
    assert {s: p["engine"] for s, p in ov.placement.items()} == dict.fromkeys(ov.stage_names, "openvino")
    assert all(p["precision"] == "f32" for p in ov.placement.values())
    m, rng = ort.model, np.random.default_rng(0)
    feeds = {"vision": {"pixel_values": rng.standard_normal((2, 3, m["image_size"], m["image_size"]), np.float32)}}
    image_embeds = ort.runners["vision"].infer(feeds["vision"])["image_embeds"]
    feeds["qformer"] = {"image_embeds": image_embeds}
    # decoder: a prefill of 5 positions, then one step over its cache
    b, s, heads, dim = 2, 5, m.get("num_kv_heads", m["num_heads"]), m["head_dim"]
    empty = np.zeros((b, heads, 0, dim), np.float32)
    prefill = {"inputs_embeds": rng.standard_normal((b, s, m["text_hidden"]), np.float32) * 0.1,
               "attention_mask": np.ones((b, s), np.int64), "position_ids": np.tile(np.arange(s), (b, 1))}
    past_names = [t["name"] for t in ort.manifest.stages["decoder"]["inputs"] if t["name"].startswith("past_")]
    prefill.update(dict.fromkeys(past_names, empty))
    feeds["decoder"] = prefill
    for stage, stage_feeds in feeds.items():
        want, got = ort.runners[stage].infer(stage_feeds), ov.runners[stage].infer(stage_feeds)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert_close(got[name], want[name], f"{stage}.{name}")
    present = ort.runners["decoder"].infer(prefill)
    step = {"inputs_embeds": prefill["inputs_embeds"][:, :1], "attention_mask": np.ones((b, s + 1), np.int64),
            "position_ids": np.full((b, 1), s, np.int64)}
    step.update({n: present[n.replace("past_", "present_")] for n in past_names})
    want, got = ort.runners["decoder"].infer(step), ov.runners["decoder"].infer(step)
    for name in want:
        assert_close(got[name], want[name], f"decoder step {name}")


@needs_openvino
def test_shared_kv_decoder_stays_on_onnx_runtime_and_says_so(toy_artifacts):
    art = LoadedArtifact.open(toy_artifacts, task="generation", backend="openvino")
    assert art.placement["vision"]["engine"] == art.placement["qformer"]["engine"] == "openvino"
    decoder = art.placement["decoder"]
    assert decoder["engine"] == "onnxruntime" and "GroupQueryAttention" in decoder["reason"]
    assert "decoder: onnxruntime" in placement_line(art.placement) and "--kv-cache concat" in placement_line(art.placement)


@needs_openvino
@pytest.mark.parametrize("fixture", ["toy_artifacts", "toy_concat_artifacts"])
def test_greedy_captions_of_the_toy_are_onnx_runtimes(fixture, request):
    path = request.getfixturevalue(fixture)
    images = scenes()
    want = Blip2Pipeline.from_artifacts(path).caption(images)
    got = Blip2Pipeline.from_artifacts(path, backend="openvino").caption(images)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    # the toy is trained: its captions are right, so equal tokens are not equal noise
    assert sum(r.text.startswith("a ") for r in got) == len(images)


@needs_openvino
@pytest.mark.skipif(not THIS_CPU_HAS_BF16, reason="this CPU has no native bf16 (AVX-512 BF16 / AMX)")
def test_bf16_greedy_captions_of_the_toy_are_f32s(toy_concat_artifacts):
    images = scenes()
    want = Blip2Pipeline.from_artifacts(toy_concat_artifacts).caption(images)
    got = Blip2Pipeline.from_artifacts(toy_concat_artifacts, backend="openvino", precision="bf16").caption(images)
    assert [r.tokens for r in got] == [r.tokens for r in want]


@needs_openvino
def test_beam_search_and_streaming_on_openvino(toy_concat_artifacts):
    image = scenes(1)[0]
    ort = Blip2Pipeline.from_artifacts(toy_concat_artifacts)
    ov = Blip2Pipeline.from_artifacts(toy_concat_artifacts, backend="openvino")
    assert ov.artifact.placement["decoder"]["engine"] == "openvino"
    want = ort.caption([image], num_beams=3, max_new_tokens=12)[0]
    got = ov.caption([image], num_beams=3, max_new_tokens=12)[0]
    assert got.tokens == want.tokens
    assert "".join(ov.stream(image, num_beams=3, max_new_tokens=12)) == want.text
    assert "".join(ov.stream(image)) == ort.caption([image])[0].text


@needs_openvino
def test_retrieval_stages_on_openvino(retrieval_tiny_artifacts):
    images, texts = scenes(3), ["a red circle", "a big blue square at the top"]
    ort = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)
    ov = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts, backend="openvino")
    assert {p["engine"] for p in ov.artifact.placement.values()} == {"openvino"}
    assert_close(ov.embed_images(images), ort.embed_images(images), "image embeddings")
    assert_close(ov.embed_texts(texts), ort.embed_texts(texts), "text embeddings")
    assert_close(ov.itm(images[:2], texts), ort.itm(images[:2], texts), "itm")
