"""OrtRunner names the graph when ONNX Runtime refuses its inputs (the graph does not match the
manifest that promised them), and leaves its other failures as they are (internal errors)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime.backends.onnxrt import OrtRunner
from runtime.errors import ArtifactError


def _graph(tmp_path, nodes, inputs, outputs, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "stage.onnx"
    onnx.save(model, path)
    return OrtRunner(path, ["CPUExecutionProvider"])


def test_an_index_past_the_table_is_an_artifact_error_naming_the_graph(tmp_path):
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], np.zeros(8, np.float32).tolist())
    runner = _graph(tmp_path, [helper.make_node("Gather", ["table", "ids"], ["out"])],
                    [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [table])
    assert runner.infer({"ids": np.array([[3]], np.int64)})["out"].shape == (1, 1, 2)
    with pytest.raises(ArtifactError, match="stage.onnx: ONNX Runtime refused these inputs"):
        runner.infer({"ids": np.array([[10]], np.int64)})


def test_other_failures_are_not_called_artifact_errors(tmp_path):
    """A shape clash inside the graph (as an allocation failure or a provider error would be) is
    not the artifact's fault as far as the runner can tell: it stays ONNX Runtime's own error."""
    runner = _graph(tmp_path, [helper.make_node("Add", ["a", "b"], ["out"])],
                    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None]),
                     helper.make_tensor_value_info("b", TensorProto.FLOAT, [None])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    with pytest.raises(Exception) as info:
        runner.infer({"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)})
    assert not isinstance(info.value, ArtifactError)
