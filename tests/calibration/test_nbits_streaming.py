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


def _one_matmul(tmp_path, extra_outputs=(), nodes=()):
    from onnx import TensorProto, helper

    w = np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]), *extra_outputs]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), *nodes], "g", [x], outputs,
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "src.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src),
                    save_as_external_data=True, location="src.onnx.data", size_threshold=0)
    return src, w


def test_an_initializer_that_is_also_a_graph_output_stays(tmp_path):
    """Quantizing a weight away must not drop it where the graph outputs it too."""
    from onnx import TensorProto, helper

    src, w = _one_matmul(tmp_path, [helper.make_tensor_value_info("w", TensorProto.FLOAT, [256, 64])])
    info = quantize_decoder(src, tmp_path / "q.onnx", LLMOptions(precision="int4"), has_lm_head=False)
    assert info["external_data"]  # the source keeps its weights outside: the streamed pass
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    y, w_out = session.run(["y", "w"], {"x": np.ones((2, 256), np.float32)})
    assert np.array_equal(w_out, w) and y.shape == (2, 64)


def test_a_graph_with_subgraphs_is_not_streamed(tmp_path):
    """If/Loop/Scan bodies are looked into by the whole-graph pass only: streaming refuses them,
    and the automatic choice takes the whole-graph pass."""
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z_branch"])], "b", [],
                               [helper.make_tensor_value_info("z_branch", TensorProto.FLOAT, [2, 64])])
    cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True)))
    branchy = helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)
    src, _ = _one_matmul(tmp_path, [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64])], [cond, branchy])
    with pytest.raises(ArtifactError, match="subgraphs"):
        quantize_decoder(src, tmp_path / "s.onnx", LLMOptions(precision="int4"), has_lm_head=False, streaming=True)
    quantize_decoder(src, tmp_path / "q.onnx", LLMOptions(precision="int4"), has_lm_head=False)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
