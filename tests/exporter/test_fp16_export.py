"""`export --dtype fp16` for every family exports and validates on this machine: each stage's
graph, as exported (float16 in and out), runs on ONNX Runtime's CPU provider against the PyTorch
float16 reference, validation.json records that path, and an inf or NaN on either side fails the
stage by name instead of passing as a number."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from exporter.comparison import compare
from exporter.export import ExportOptions, export
from exporter.loading import LoadOptions
from exporter.validate import failure_message
from runtime.artifact.manifest import load_manifest

FP16 = LoadOptions(dtype="fp16")

# (checkpoint fixture, ExportOptions beyond the dtype): one tiny random model per family.
FAMILIES = [
    pytest.param("tiny_checkpoint", {}, id="blip2-opt"),
    pytest.param("llama_tiny_checkpoint", {}, id="blip2-llama"),
    pytest.param("llama_tiny_checkpoint", {"kv_cache": "shared"}, id="blip2-llama-shared-cache"),
    pytest.param("instructblip_llama_tiny_checkpoint", {}, id="instructblip-vicuna"),
    pytest.param("retrieval_tiny_checkpoint", {}, id="retrieval"),
]


@pytest.mark.parametrize("checkpoint, extra", FAMILIES)
def test_tiny_fp16_export_validates(request, tmp_path, checkpoint, extra):
    out = tmp_path / "fp16"
    report = export(str(request.getfixturevalue(checkpoint)), out, ExportOptions(load=FP16, **extra),
                    log=lambda s: None)
    saved = json.loads((out / "validation.json").read_text())
    assert report["ok"] and saved["ok"]
    m = load_manifest(out)
    if "kv_cache" in extra:
        assert m.model["kv_cache"] == extra["kv_cache"]
    # Every stage ran in ONNX Runtime against PyTorch (none skipped), all finite and within atol.
    assert sorted(s["stage"] for s in saved["stages"]) == sorted(m.stages)
    for s in saved["stages"]:
        assert s["ok"] and not any(o["nonfinite"] for o in s["outputs"]), s
    path = saved["validated_with"]
    assert path["graphs"] == "fp16" and path["providers"] == ["CPUExecutionProvider"]
    assert path["runtime"].startswith("onnxruntime ") and "float32 between casts" in path["fp16"]
    if m.data["architecture"] == "blip-2-retrieval":
        assert saved["retrieval"]["ok"]
    else:  # greedy tokens against transformers' fp16 generate: reported (not gated, as before)
        assert len(saved["generation"]["cases"]) == 2 and saved["generation"]["gating"] is False
    # The graphs that ran are the float16 ones: every float input and output, declared and in the graph.
    for name, spec in m.stages.items():
        assert spec["precision"] == "fp16"
        graph = onnx.load(str(m.stage_file(name)), load_external_data=False).graph
        declared = {t["name"]: t["dtype"] for t in spec["inputs"] + spec["outputs"]}
        actual = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
        floats = [n for n, d in declared.items() if d.startswith("float")]
        assert floats and all(declared[n] == "float16" and actual[n] == TensorProto.FLOAT16 for n in floats), name


def test_an_inf_or_nan_fails_the_stage_by_name():
    finite = {"logits": np.array([1.0, 2.0], np.float32)}
    ok = compare("decoder", finite, {"logits": np.array([1.0, 2.0], np.float16)}, 2e-2)
    assert ok["ok"] and ok["outputs"][0]["nonfinite"] == ""
    ref_inf = compare("decoder", {"logits": np.array([1.0, np.inf], np.float32)}, finite, 2e-2)
    got_nan = compare("decoder", finite, {"logits": np.array([np.nan, 2.0], np.float16)}, 2e-2)
    both = compare("decoder", {"logits": np.array([np.inf, 2.0])}, {"logits": np.array([np.inf, 2.0])}, 2e-2)
    assert [r["outputs"][0]["nonfinite"] for r in (ref_inf, got_nan, both)] == [
        "reference", "exported", "reference and exported"]
    assert not any(r["ok"] for r in (ref_inf, got_nan, both))
    fp16 = failure_message({"stages": [ref_inf], "validated_with": {"graphs": "fp16"}})
    assert fp16 == ("validation failed: stage 'decoder' output 'logits' has inf/NaN in PyTorch's reference: "
                    "a float16 overflow; export --dtype fp32")
    fp32 = failure_message({"stages": [got_nan], "validated_with": {"graphs": "fp32"}})
    assert fp32 == "validation failed: stage 'decoder' output 'logits' has inf/NaN in the exported graph's output"
