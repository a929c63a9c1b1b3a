"""`export --dtype fp16` for every family exports and validates on this machine: each stage's
graph, as exported (float16 in and out), runs on ONNX Runtime's CPU provider against the PyTorch
float16 reference, validation.json records that path, and an inf or NaN on either side fails the
stage by name instead of passing as a number. Flan-T5 keeps its feed-forward output projection
(`wo`) in float32, as transformers does."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from exporter.comparison import compare
from exporter.export import ExportOptions, export
from exporter.families.t5 import FAMILY as T5
from exporter.families.t5 import _clamp_fp16
from exporter.loading import LoadOptions, load_model
from exporter.validate import failure_message
from runtime.artifact.manifest import load_manifest
from tests.conftest import exported
from tests.exporter.test_memory_estimate import initializer_bytes

FP16 = LoadOptions(dtype="fp16")

# (checkpoint fixture, ExportOptions beyond the dtype): one tiny random model per family.
FAMILIES = [
    pytest.param("tiny_checkpoint", {}, id="blip2-opt"),
    pytest.param("llama_tiny_checkpoint", {}, id="blip2-llama"),
    pytest.param("llama_tiny_checkpoint", {"kv_cache": "shared"}, id="blip2-llama-shared-cache"),
    pytest.param("t5_tiny_checkpoint", {}, id="blip2-flan-t5"),
    pytest.param("instructblip_t5_tiny_checkpoint", {}, id="instructblip-flan-t5"),
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


@pytest.fixture(scope="module")
def t5_fp16(tmp_path_factory, t5_tiny_checkpoint):
    return exported(tmp_path_factory, t5_tiny_checkpoint, "t5-fp16", load=FP16)


WO_MATMUL = re.compile(r"/wo(_\d+)?/MatMul$")


@pytest.mark.parametrize("checkpoint", ["t5_tiny_checkpoint", "instructblip_t5_tiny_checkpoint"])
def test_fp16_loading_keeps_t5_wo_in_float32(request, checkpoint):
    """As transformers' T5 declares (_keep_in_fp32_modules), under BLIP-2 too (whose class does not
    pass it on: exporter.loading.keeps_fp32), and only wo: every other LLM weight is float16."""
    from transformers import T5ForConditionalGeneration

    assert T5.keep_in_fp32 == tuple(T5ForConditionalGeneration._keep_in_fp32_modules)
    model, _ = load_model(str(request.getfixturevalue(checkpoint)), FP16)
    dtypes = {n: p.dtype for n, p in model.language_model.named_parameters()}
    wo = {n for n in dtypes if ".DenseReluDense.wo." in n}
    assert len(wo) == model.config.text_config.num_layers + model.config.text_config.num_decoder_layers
    assert {n for n, d in dtypes.items() if d == torch.float32} == wo
    assert all(d == torch.float16 for n, d in dtypes.items() if n not in wo)


def test_fp16_t5_graphs_compute_wo_in_float32(t5_fp16, t5_tiny_checkpoint, t5_tiny_artifacts):
    """Each wo MatMul of the encoder and decoder graphs reads a float32 weight and a float32 cast of
    its input; every other weight MatMul is float16; T5Block's clamp is where the hidden states
    are still float16 (the first block: after self-attention, and in the decoder after
    cross-attention; from the first wo on they are float32); the weight estimate counts wo at 4
    bytes."""
    from transformers import AutoConfig

    from exporter.memory_estimate import estimate, stage_parameters

    m = load_manifest(t5_fp16)
    layers = {"encoder": m.model["num_encoder_layers"], "decoder": m.model["num_layers"]}
    for stage, n_layers in layers.items():
        graph = onnx.load(str(m.stage_file(stage)), load_external_data=False).graph
        weights = {t.name: t.data_type for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        wo = [n for n in matmuls if WO_MATMUL.search(n.name)]
        assert len(wo) == n_layers, stage
        for n in wo:
            cast = producer[n.input[0]]
            assert weights[n.input[1]] == TensorProto.FLOAT, n.name
            assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT, n.name
        others = [n for n in matmuls if n not in wo]
        assert others and all(weights[n.input[1]] == TensorProto.FLOAT16 for n in others), stage
        assert sum(n.op_type == "Clip" for n in graph.node) == {"encoder": 1, "decoder": 2}[stage]
        fp32 = onnx.load(str(t5_tiny_artifacts / f"{stage}.onnx"), load_external_data=False).graph
        assert not any(n.op_type == "Clip" for n in fp32.node)
    est = estimate(stage_parameters(AutoConfig.from_pretrained(t5_tiny_checkpoint)), "fp16")["stages"]
    for stage in ("encoder", "cross_kv", "decoder"):
        real = initializer_bytes(m.stage_file(stage))
        assert abs(est[stage] - real) <= 0.02 * real, (stage, est[stage], real)


def transformers_t5_clamp(hidden):
    """T5Block.forward's clamp in transformers 4.57 (models/t5/modeling_t5.py), as written there."""
    if hidden.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden).any(),
            torch.finfo(hidden.dtype).max - 1000,
            torch.finfo(hidden.dtype).max,
        )
        hidden = torch.clamp(hidden, min=-clamp_value, max=clamp_value)
    return hidden


class Clamp(torch.nn.Module):
    def forward(self, hidden):
        return _clamp_fp16(hidden * 1)


def test_t5_clamp_is_transformers_and_the_graph_computes_it(tmp_path):
    """With an inf anywhere every value is clamped to +-(max - 1000) (64512 in float16), else to
    +-max; NaN stays NaN: in torch, and in the exported graph on ONNX Runtime and in onnx's
    reference evaluator (float16 arithmetic)."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    inf = float("inf")
    cases = [[1.0, -2.0, 64480.0, 64512.0, 65504.0, -65504.0, inf, -inf],
             [1.0, -2.0, 64480.0, 64512.0, 65504.0, -65504.0, 3.0, 0.0],
             [float("nan"), 65504.0, inf, 0.5, 0.5, 0.5, 0.5, 0.5]]
    path = tmp_path / "clamp.onnx"
    torch.onnx.export(Clamp(), (torch.zeros(8, dtype=torch.float16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(str(path))
    for case in cases:
        x = torch.tensor(case, dtype=torch.float16)
        want = transformers_t5_clamp(x).numpy()
        for got in (_clamp_fp16(x).numpy(), session.run(None, {"x": x.numpy()})[0],
                    reference.run(None, {"x": x.numpy()})[0]):
            np.testing.assert_array_equal(got, want)
    assert float(transformers_t5_clamp(torch.tensor(cases[0], dtype=torch.float16))[-1]) == -64512.0
    x32 = torch.tensor(cases[0], dtype=torch.float32)
    assert _clamp_fp16(x32) is x32  # float32 states pass unchanged, as in transformers
