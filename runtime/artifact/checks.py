"""Checks of an artifact's files against its manifest, made where they are loaded: the
embedding table's header (dtype, shape, size) before it is mapped, and each graph's declared
inputs and outputs once its session exists."""

from __future__ import annotations

import os

import numpy as np

from runtime.artifact.manifest import Manifest
from runtime.errors import ArtifactError

EMBEDDING_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))  # native byte order only
# ONNX Runtime's type strings -> the manifest's numpy names
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool"}


def _npy_header(f, path) -> tuple[tuple, bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            return fmt.read_array_header_1_0(f)
        if version in ((2, 0), (3, 0)):
            return fmt.read_array_header_2_0(f)
        raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, OSError) as exc:
        raise ArtifactError(f"{path}: not a valid .npy file ({' '.join(str(exc).split())[:200]})") from None


def load_embeddings(manifest: Manifest) -> np.ndarray:
    """The LLM's token embedding table, memory-mapped from the verified handle after its header
    matches the manifest: float16/float32, (vocab_size, text_hidden), C order, the exact size."""
    spec = manifest.data["embeddings"]
    path = manifest.path(spec["file"], "embeddings.file")
    with manifest.open_verified(spec["file"], "embeddings.file") as f:
        shape, fortran, dtype = _npy_header(f, path)
        if dtype not in EMBEDDING_DTYPES or dtype.name != spec["dtype"]:
            raise ArtifactError(f"{path}: embedding table of dtype {dtype.str}; expected {spec['dtype']} "
                                "(embeddings.dtype; float16 or float32 in native byte order)")
        if list(shape) != list(spec["shape"]) or fortran:
            raise ArtifactError(f"{path}: embedding table of shape {list(shape)}{' (Fortran order)' if fortran else ''}; "
                                f"expected {spec['shape']} in C order (embeddings.shape)")
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
        if size != offset + int(np.prod(shape)) * dtype.itemsize:
            described = offset + int(np.prod(shape)) * dtype.itemsize
            raise ArtifactError(f"{path}: {size} bytes, but its header describes {described}; "
                                "the file is truncated or has trailing data")
        # The map keeps its own reference to the file: closing the handle leaves it valid.
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def check_graph_io(where, stage: str, kind: str, declared: list[dict], graph: list[tuple]) -> None:
    """The manifest's tensors of one stage (`kind`: inputs or outputs) against the graph's
    own (name, dtype, shape) list: same names, dtypes, ranks, and equal fixed dims."""
    names = [t["name"] for t in declared]
    if sorted(names) != sorted(name for name, _, _ in graph):
        raise ArtifactError(f"{where}: the graph's {kind} are {', '.join(n for n, _, _ in graph)}; "
                            f"stages.{stage}.{kind} declares {', '.join(names)}")
    actual = {name: (dtype, shape) for name, dtype, shape in graph}
    for i, t in enumerate(declared):
        dtype, shape = actual[t["name"]]
        field = f"stages.{stage}.{kind}[{i}] ({t['name']})"
        if dtype != t["dtype"]:
            raise ArtifactError(f"{where}: {field}: the graph's dtype is {dtype}, the manifest says {t['dtype']}")
        fixed_mismatch = any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, t["shape"]))
        if len(shape) != len(t["shape"]) or fixed_mismatch:
            raise ArtifactError(f"{where}: {field}: the graph's shape is {list(shape)}, the manifest says {t['shape']}")


def check_runner_io(manifest: Manifest, stage: str, runner) -> None:
    """For runners with an ONNX Runtime session or an OpenVINO compiled model (graph_io): its
    graph's inputs/outputs against the manifest."""
    spec = manifest.stages[stage]
    where = getattr(runner, "path", manifest.stage_file(stage))
    graph_io = getattr(runner, "graph_io", None)
    if graph_io is not None:
        for kind, graph in graph_io().items():
            check_graph_io(where, stage, kind, spec[kind], graph)
        return
    session = getattr(runner, "session", None)
    if session is None:
        return  # TensorRT engines are built from the checked graph
    for kind, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        graph = [(a.name, ORT_TYPES.get(a.type, a.type), list(a.shape)) for a in args]
        check_graph_io(where, stage, kind, spec[kind], graph)
