"""The external-data files an ONNX graph names, read from its protobuf without the onnx package.

ONNX Runtime opens a tensor's `external_data` location relative to the graph's directory.
Versions from 1.32 refuse locations outside it, but the runtime supports older ones (Jetson
wheels lag behind), so we check those locations ourselves, before ONNX Runtime sees the graph.
The runtime may not import onnx, and a full parse is not needed: this walks the protobuf wire
format through the few messages that can hold a tensor, skipping everything else (raw weights
included) by length, so a large graph costs a walk over its message headers only.
"""

from __future__ import annotations

import mmap
import os

from runtime.errors import ArtifactError

# message -> {field number: message it holds}; field numbers from onnx.proto.
_MESSAGES = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # node, initializer, sparse_initializer
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # values, indices
    "tensor": {13: "entry"},  # external_data: StringStringEntryProto
}
_KEY, _VALUE = 1, 2  # StringStringEntryProto
_MAX_NESTING = 64


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _length_delimited(buf, start: int, end: int):
    """Yields (field number, start, end) of each length-delimited field of one message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a field runs past its message")
            yield field, pos, pos + length
            pos += length
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("a field runs past its message")


def _locations(buf, size: int) -> list[str]:
    found: list[str] = []
    stack = [("model", 0, size, 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise _Malformed(f"messages nested deeper than {_MAX_NESTING}")
        if kind == "entry":
            fields = {f: bytes(buf[s:e]) for f, s, e in _length_delimited(buf, start, end)}
            if fields.get(_KEY) == b"location":
                try:
                    found.append(fields.get(_VALUE, b"").decode("utf-8"))
                except UnicodeDecodeError:
                    raise _Malformed("an external-data location is not UTF-8") from None
            continue
        children = _MESSAGES[kind]
        for field, s, e in _length_delimited(buf, start, end):
            if field in children:
                stack.append((children[field], s, e, depth + 1))
    return list(dict.fromkeys(found))


def external_data_locations(fd: int, name: str | os.PathLike) -> list[str]:
    """The distinct `location` values of every tensor's external data in the ONNX graph open
    on `fd` (as written, relative to the graph's directory). `name` is used in errors."""
    size = os.fstat(fd).st_size
    if size == 0:
        return []
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
        try:
            return _locations(buf, size)
        except _Malformed as exc:
            raise ArtifactError(f"{name}: not a valid ONNX graph ({exc})") from None
