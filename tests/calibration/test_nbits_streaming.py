"""Weight-only quantization one weight at a time (calibration/nbits_streaming.py, what a graph
over 2 GB gets) gives the graph the whole-graph pass gives: the same nodes, the same quantized
initializers byte for byte, the same outputs; its tensors in one external data file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.llm import LLMOptions, quantize_decoder
from runtime.artifact.manifest import load_manifest
from runtime.errors import ArtifactError
from runtime.stages import SEQLENS_K, TOTAL_SEQUENCE_LENGTH

CASES = [("tiny_artifacts", "decoder"), ("tiny_concat_artifacts", "decoder"), ("llama_tiny_artifacts", "decoder"),
         ("t5_tiny_artifacts", "decoder"), ("t5_tiny_artifacts", "encoder"), ("t5_tiny_artifacts", "cross_kv")]


def _nodes(model) -> list:
    def attrs(n):
        return sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)

    return sorted((n.op_type, n.domain, tuple(n.input), tuple(n.output), repr(attrs(n))) for n in model.graph.node)


def _initializers(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feeds(session, model_dims: dict, rng) -> dict:
    sizes = {"batch": 2, "sequence": 3, "past_sequence": 4, "total_sequence": 7, "encoder_sequence": 5,
             "cache_capacity": 8}
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else model_dims.get(d, sizes.get(d, 2)) for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = np.ones(shape, np.int64)
        elif i.name == TOTAL_SEQUENCE_LENGTH:  # the shared cache's prefill of `sequence` tokens
            feeds[i.name] = np.array(sizes["sequence"], np.int32)
        elif i.name == SEQLENS_K:
            feeds[i.name] = np.full(shape, sizes["sequence"] - 1, np.int32)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("lm_head", ["int8", "float"])
@pytest.mark.parametrize("fixture, stage", CASES)
def test_streaming_equals_the_whole_graph_pass(request, tmp_path, fixture, stage, lm_head):
    src = load_manifest(request.getfixturevalue(fixture))
    graph = src.stage_file(stage)
    opts = LLMOptions(precision="int4", lm_head=lm_head)
    has_head = stage == "decoder"
    whole, streamed = tmp_path / "whole.onnx", tmp_path / "streamed.onnx"
    a = quantize_decoder(graph, whole, opts, has_lm_head=has_head, streaming=False)
    b = quantize_decoder(graph, streamed, opts, has_lm_head=has_head, streaming=True)
    assert {**a, "external_data": None} == {**b, "external_data": None} and b["external_data"]
    ma, mb = onnx.load(str(whole)), onnx.load(str(streamed))
    assert _nodes(ma) == _nodes(mb)
    assert "MatMulNBits" in {n.op_type for n in mb.graph.node}
    ia, ib = _initializers(ma), _initializers(mb)
    assert sorted(ia) == sorted(ib)
    for name in ia:
        assert ia[name].dtype == ib[name].dtype and np.array_equal(ia[name], ib[name]), name
    # Everything but the smallest tensors lives in the one data file, aligned for mapping.
    structure = onnx.load(str(streamed), load_external_data=False)
    external = [t for t in structure.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == \
        {"streamed.onnx.data"}
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (whole, streamed)]
    feeds = _feeds(sessions[0], src.model, np.random.default_rng(0))
    for x, y in zip(*(s.run(None, feeds) for s in sessions)):
        assert np.array_equal(x, y)


def test_an_external_tensor_pointing_outside_its_directory_is_refused(tmp_path, tiny_artifacts):
    """The source graph is untrusted input: a tensor whose data file lies outside its directory
    is an artifact error, never read."""
    model = onnx.load(str(load_manifest(tiny_artifacts).stage_file("decoder")))
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, location="g.onnx.data")
    structure = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    for t in structure.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    onnx.save_model(structure, str(tmp_path / "g.onnx"))
    with pytest.raises(ArtifactError, match="outside its directory"):
        quantize_decoder(tmp_path / "g.onnx", tmp_path / "q.onnx", LLMOptions(precision="int4"), streaming=True)
