"""The shared KV cache form (exporter --kv-cache shared, runtime/generation/shared_kv_cache.py): buffers
ONNX Runtime's GroupQueryAttention updates in place, each row's tokens at the front of its cache.

What it must keep from the concat form: transformers' tokens (test_parity's and
test_parity_llama's cases run on both forms; test_streaming's stop-string and streaming cross
product runs on the toy, shared by default), growth past the allocated capacity in the middle of
greedy and beam searches, the manifest contract and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime import synthetic
from runtime.artifact.manifest import MANIFEST, load_manifest
from runtime.errors import OptionError
from runtime.generation import shared_kv_cache as shared_kv_decoder
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.runtime.test_parity import PROMPTS_MIXED, hf_generate, images

GROWTH_CASES = [
    pytest.param(dict(max_new_tokens=12), id="greedy"),
    pytest.param(dict(max_new_tokens=12, num_beams=3), id="beam3"),
    pytest.param(dict(max_new_tokens=10, num_beams=2, repetition_penalty=1.4), id="beam2-penalty"),
]


@pytest.mark.parametrize("kw", GROWTH_CASES)
def test_cache_grows_mid_generation_and_keeps_transformers_tokens(monkeypatch, tiny_artifacts, tiny_hf, kw):
    """One position of headroom: the buffers double during the search, rows of
    different lengths (batch 4, mixed prompts) and beam reorders included."""
    monkeypatch.setattr(shared_kv_decoder, "HEADROOM", 1)
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    ims, prompts = images(4), PROMPTS_MIXED
    capacities = []
    original = shared_kv_decoder.SharedKVCacheDecoder.step

    def step(self, token_ids):
        capacities.append(self.capacity)
        return original(self, token_ids)

    monkeypatch.setattr(shared_kv_decoder.SharedKVCacheDecoder, "step", step)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == hf_generate(tiny_hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)
    assert len(set(capacities)) >= 2  # it grew in the middle of the search


def test_shared_and_concat_give_the_same_captions_on_the_toy(toy_artifacts, toy_concat_artifacts):
    concat = toy_concat_artifacts
    ims = [im for _, im in synthetic.make_scenes(12, seed=404)]
    shared_pipe, concat_pipe = Blip2Pipeline.from_artifacts(toy_artifacts), Blip2Pipeline.from_artifacts(concat)
    assert shared_pipe.model["kv_cache"] == "shared" and concat_pipe.model["kv_cache"] == "concat"
    for kw in (dict(), dict(num_beams=3)):
        assert [r.text for r in shared_pipe.caption(ims, **kw)] == [r.text for r in concat_pipe.caption(ims, **kw)]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    images(1)[0].save(path)
    return path


def caption_with_kv_cache(artifacts, tmp_path, image_file, value):
    """`caption` on a copy of `artifacts` whose manifest says model.kv_cache = value."""
    copy = tmp_path / f"edited-{value}"
    shutil.copytree(artifacts, copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["model"]["kv_cache"] = value
    (copy / MANIFEST).write_text(json.dumps(m))
    return run_cli("caption", copy, image_file)


def test_manifest_records_the_form_and_refuses_a_bad_one(tiny_artifacts, tmp_path, image_file):
    assert load_manifest(tiny_artifacts).data["model"]["kv_cache"] == "shared"
    proc = caption_with_kv_cache(tiny_artifacts, tmp_path, image_file, "paged")
    assert proc.returncode == 2
    assert "model.kv_cache" in proc.stderr and "Traceback" not in proc.stderr
    # The form must match the graph's declared inputs: "concat" over a shared graph is refused.
    proc = caption_with_kv_cache(tiny_artifacts, tmp_path, image_file, "concat")
    assert proc.returncode == 2 and "stages.decoder.inputs" in proc.stderr and "Traceback" not in proc.stderr


def test_t5_refuses_the_shared_form(t5_tiny_checkpoint, tmp_path):
    proc = run_cli("export", t5_tiny_checkpoint, tmp_path / "out", "--kv-cache", "shared")
    assert proc.returncode == 2
    assert "--kv-cache shared" in proc.stderr and "t5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_t5_manifest_may_not_carry_the_key(t5_tiny_artifacts, tmp_path, image_file):
    proc = caption_with_kv_cache(t5_tiny_artifacts, tmp_path, image_file, "shared")
    assert proc.returncode == 2 and "model.kv_cache" in proc.stderr and "Traceback" not in proc.stderr


GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("dtype, device, backend, available, refused", [
    (np.float32, "cpu", "onnxruntime", GPU, False),
    (np.float32, "cuda", "onnxruntime", GPU, True),  # the CUDA kernel is fp16/bf16 only
    (np.float32, "auto", "onnxruntime", GPU, True),  # auto picks CUDA where it is
    (np.float32, "auto", "onnxruntime", GPU[2:], False),
    (np.float16, "cuda", "onnxruntime", GPU, False),
    (np.float32, "cpu", "tensorrt", GPU, True),  # the LLM stages run on ONNX Runtime CUDA
    (np.float16, "cpu", "onnxruntime-trt", GPU, True),  # TensorRT does not build the contrib op
])
def test_placement_is_checked_before_any_session(dtype, device, backend, available, refused):
    """The rule over ONNX Runtime's provider lists (this machine has the CPU's only; without a
    provider, building the sessions names what to install: test_tensorrt_ep)."""
    if refused:
        with pytest.raises(OptionError, match="--kv-cache concat"):
            shared_kv_decoder.check_placement("art", dtype, device, backend, available)
    else:
        shared_kv_decoder.check_placement("art", dtype, device, backend, available)


@pytest.mark.parametrize("requested, dtype, head_dim, chosen", [
    ("auto", "fp32", 64, "shared"), ("auto", "fp16", 64, "concat"),
    ("auto", "fp32", 12, "concat"),  # GroupQueryAttention takes heads of a multiple of 8 only
    ("concat", "fp32", 64, "concat"), ("shared", "fp16", 64, "shared"),
])
def test_export_picks_the_form(requested, dtype, head_dim, chosen):
    from exporter.families.opt import FAMILY as OPT
    from exporter.families.t5 import FAMILY as T5

    assert OPT.resolve_kv_cache(requested, dtype, head_dim) == chosen
    assert T5.resolve_kv_cache("auto" if requested == "shared" else requested, dtype, head_dim) is None


def test_shared_form_refuses_heads_the_op_does_not_take(tiny_artifacts):
    """Asked for at export, or written into a manifest: one clear error, not ONNX Runtime's."""
    import copy

    from exporter.families.opt import FAMILY as OPT
    from runtime.artifact.schema import validate

    with pytest.raises(OptionError, match="multiple of 8, this decoder's are 12"):
        OPT.resolve_kv_cache("shared", "fp32", 12)
    m = copy.deepcopy(load_manifest(tiny_artifacts).data)
    m["model"].update(num_heads=8, head_dim=4)  # still num_heads x head_dim = text_hidden
    with pytest.raises(Exception, match=r"model\.kv_cache: expected concat \(GroupQueryAttention takes heads"):
        validate(m)
