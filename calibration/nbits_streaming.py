"""Weight-only quantization of a graph too large to load: one MatMul weight at a time.

`quantize_decoder` loads the whole graph with onnx.load and hands it to ONNX Runtime's
MatMulNBitsQuantizer, which holds the float weights and their quantized copies together: about
2x the graph, 27 GB for a 7B fp16 decoder. Here the graph's structure is read without its
weights; each MatMul weight is read alone from the external data file (a memory map), put in a
graph of that one node, and quantized by the same MatMulNBitsQuantizer with the same settings,
so the node and initializers it gives are the ones the whole-graph pass gives
(tests/calibration/test_nbits_streaming.py compares them). Every tensor is appended to the
output's external data file as it is produced. The peak is the structure plus one weight and its
quantized form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends.onnxrt import import_onnxruntime
from runtime.errors import ArtifactError

# Tensors of at least this many bytes go to the external data file; smaller ones stay in the
# graph (onnx's own default threshold for convert_model_to_external_data).
INLINE_LIMIT = 1024
# Large tensors start on a multiple of this in the data file, so ONNX Runtime can map them
# (the allocation granularity onnx's own aligned external data uses).
ALIGN = 65536


def _tensor_array(tensor, base: Path) -> np.ndarray:
    """A tensor's values: its inline data, or a read-only memory map of its bytes in the external
    data file (the location confined to `base`, the graph's directory)."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    path = (base / info["location"]).resolve()
    if base.resolve() not in path.parents:
        raise ArtifactError(f"{base}: tensor {tensor.name} points outside its directory ({info['location']})")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    offset = int(info.get("offset", 0))
    if "length" in info and int(info["length"]) != count * dtype.itemsize:
        raise ArtifactError(f"{base}: tensor {tensor.name} has {info['length']} bytes, its shape needs "
                            f"{count * dtype.itemsize}")
    if not path.is_file() or path.stat().st_size < offset + count * dtype.itemsize:
        raise ArtifactError(f"{base}: tensor {tensor.name} lies past the end of {info['location']} (truncated?)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims) or (1,))


class _DataFile:
    """Appends tensors to one external data file and points each TensorProto at its bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def store(self, tensor, values: np.ndarray | None = None):
        """The TensorProto to keep for `tensor`: a new one pointing at its bytes (from `values`,
        else its own raw_data), appended to the data file, or for a small tensor an inline one.
        A new message, not `tensor` changed: clearing a field gives no memory back to the
        protobuf arena `tensor` lives in."""
        from onnx import TensorProto, numpy_helper

        if values is None:
            if tensor.data_location == TensorProto.EXTERNAL:
                raise ArtifactError(f"{tensor.name}: external tensor stored without its values")
            if not tensor.HasField("raw_data"):
                values = numpy_helper.to_array(tensor)  # typed fields (float_data, ...)
        if values is not None and values.dtype.byteorder == ">":
            raise ArtifactError(f"{tensor.name}: big-endian tensor data")
        data = tensor.raw_data if values is None else np.ascontiguousarray(values).tobytes()
        kept = TensorProto(name=tensor.name, dims=list(tensor.dims), data_type=tensor.data_type)
        if len(data) < INLINE_LIMIT:
            kept.raw_data = data
            return kept
        if len(data) >= 1 << 20 and self.offset % ALIGN:
            pad = ALIGN - self.offset % ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(data)
        kept.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = kept.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return kept

    def close(self) -> None:
        self.file.close()


def has_subgraphs(model) -> bool:
    """Whether a node carries a graph (If, Loop, Scan): the streaming pass neither quantizes nor
    looks inside them, where the whole-graph pass does."""
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)


def _detached(message, kind):
    copy = kind()
    copy.CopyFrom(message)
    return copy


def _one_node_model(model, node, weight, values: np.ndarray):
    """A model of `node` alone, its weight an inline initializer holding `values`."""
    from onnx import TensorProto, helper, numpy_helper

    init = numpy_helper.from_array(np.asarray(values), weight.name)
    a = helper.make_tensor_value_info(node.input[0], TensorProto.UNDEFINED, None)
    y = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)
    graph = helper.make_graph([node], "one_matmul", [a], [y], [init])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def quantize_matmuls_streaming(src: Path, dst: Path, bits_of, quantizer_options: dict) -> None:
    """Writes `src` with each MatMul whose weight is an initializer replaced by MatMulNBits of
    `bits_of(node)` bits (None: left float), reading one weight at a time; `dst` gets its graph
    and `dst.name + '.data'`. `quantizer_options`: MatMulNBitsQuantizer's (block_size, ...)."""
    import onnx

    MatMulNBitsQuantizer = import_onnxruntime("quantization.matmul_nbits_quantizer").MatMulNBitsQuantizer

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    base = src.parent
    if has_subgraphs(model):
        raise ArtifactError(f"{src}: a graph with subgraphs (If/Loop/Scan) cannot be quantized one weight at a time")
    inits = {t.name: t for t in graph.initializer}
    out = _DataFile(dst.with_name(dst.name + ".data"))
    nodes, produced, domains = [], [], {}
    try:
        for node in graph.node:
            bits = bits_of(node) if node.op_type == "MatMul" and node.input[1] in inits else None
            weight = inits.get(node.input[1]) if bits else None
            if weight is None or len(weight.dims) != 2:
                nodes.append(node)
                continue
            one = _one_node_model(model, node, weight, _tensor_array(weight, base))
            q = MatMulNBitsQuantizer(one, bits=bits, **quantizer_options)
            q.process()
            result = q.model.model
            # Copies, not references: a message taken out of `result` keeps its whole arena alive
            # (protobuf's upb backend), with the float weight and the quantizer's copies in it.
            nodes.extend(_detached(n, onnx.NodeProto) for n in result.graph.node)
            produced += [out.store(t) for t in result.graph.initializer]
            domains.update({o.domain: o.version for o in result.opset_import})
            del one, q, result
        read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        # The float tensors still read, copied one at a time.
        kept = [out.store(t, _tensor_array(t, base) if t.data_location == onnx.TensorProto.EXTERNAL else None)
                for t in graph.initializer if t.name in read]
    finally:
        out.close()
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + produced)
    gone = set(inits) - {t.name for t in kept}  # weights now quantized: never graph inputs (IR < 4 lists them)
    inputs = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(inputs)
    have = {o.domain for o in model.opset_import}
    for domain, version in domains.items():
        if domain not in have:
            model.opset_import.add(domain=domain, version=version)
    onnx.save_model(model, str(dst))
