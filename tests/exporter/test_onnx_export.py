"""Streaming large graphs' weights into one external-data file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from exporter.onnx_export import consolidate_external_data, tensor_bytes


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_consolidates_torch_style_per_tensor_files(tmp_path, tiny_artifacts):
    # Lay the qformer graph out as torch's exporter does for >2 GB models: one file per tensor,
    # with no offset/length entries.
    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(str(tiny_artifacts / "qformer.onnx"))
    onnx.save_model(model, str(src / "q.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=256)
    model = onnx.load(str(src / "q.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) > 3
    for t in external:
        keep = [(e.key, e.value) for e in t.external_data if e.key == "location"]
        del t.external_data[:]
        for k, v in keep:
            e = t.external_data.add()
            e.key, e.value = k, v
    expected_bytes = sum(tensor_bytes(t, src) for t in model.graph.initializer)

    out = tmp_path / "out"
    out.mkdir()
    consolidate_external_data(model, src, out / "q.onnx.data")
    onnx.save_model(model, str(out / "q.onnx"))
    final = onnx.load(str(out / "q.onnx"), load_external_data=False)
    locations = {e.value for t in final.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"q.onnx.data"}
    assert sum(tensor_bytes(t, out) for t in final.graph.initializer) == expected_bytes
    offsets = [int(e.value) for t in final.graph.initializer for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets)

    feeds = {"image_embeds": np.random.default_rng(0).standard_normal((2, 17, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run(out / "q.onnx", feeds), run(tiny_artifacts / "qformer.onnx", feeds))
