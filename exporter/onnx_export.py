"""torch module -> one ONNX file (plus one external-data file when it is large).

Large graphs never pass through memory whole: torch writes its weights as separate files, and
they are streamed into a single `<graph>.onnx.data` next to the graph.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path

from runtime.artifact.writer import EXTERNAL_DATA_THRESHOLD
from runtime.backends.onnxrt import import_onnxruntime
from runtime.errors import OptionError
from runtime.stages import StageSpec

_ALIGN = 4096  # page-aligned tensors can be memory-mapped by ONNX Runtime
MIN_OPSET = 17  # LayerNormalization is one op from opset 17 on


def torchscript_max_opset() -> int:
    """The highest opset torch.onnx's TorchScript exporter (the one we use) writes. Past it,
    torch warns and writes a graph anyway up to some point, then fails with its whole IR."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", MIN_OPSET))


@functools.lru_cache(maxsize=None)
def loads_in_onnxruntime(opset: int) -> bool:
    """Whether this onnxruntime loads a one-node graph of `opset` (it has no API that says)."""
    from onnx import TensorProto, helper

    ort = import_onnxruntime()

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph types for an unknown opset
        return False
    return True


def supported_opsets() -> range:
    """Opsets torch writes and the installed onnxruntime runs (validation runs the graphs there)."""
    high = torchscript_max_opset()
    while high > MIN_OPSET and not loads_in_onnxruntime(high):
        high -= 1
    return range(MIN_OPSET, high + 1)


def check_opset(opset: int) -> None:
    """Refuses an opset outside `supported_opsets()` before anything is loaded or exported."""
    import torch

    ok = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise OptionError(
            f"--opset {opset} is not supported: use {ok.start} to {ok[-1]} ({MIN_OPSET}: first with LayerNormalization; "
            f"{ok[-1]}: the highest torch {torch.__version__.split('+')[0]}'s TorchScript ONNX exporter writes that "
            "this onnxruntime runs)")


def _external_info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _external_span(tensor, base_dir: Path) -> tuple[int, int]:
    """(offset, length) of an external tensor; torch's per-tensor files omit both (whole file)."""
    info = _external_info(tensor)
    offset = int(info.get("offset", 0))
    if "length" in info:
        return offset, int(info["length"])
    return offset, (base_dir / info["location"]).stat().st_size - offset


def tensor_bytes(tensor, base_dir: Path) -> int:
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL:
        return _external_span(tensor, base_dir)[1]
    return len(tensor.raw_data)


def consolidate_external_data(model, source_dir: Path, data_path: Path) -> None:
    """Moves every initializer's bytes (inline or in torch's per-tensor files) into one data
    file, one tensor at a time, and points the graph at it (location relative to the graph)."""
    from onnx import TensorProto

    with open(data_path, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                offset, length = _external_span(t, source_dir)
                with open(source_dir / _external_info(t)["location"], "rb") as src:
                    src.seek(offset)
                    start = out.tell()
                    remaining = length
                    while remaining:
                        chunk = src.read(min(remaining, 64 << 20))
                        out.write(chunk)
                        remaining -= len(chunk)
            elif t.HasField("raw_data") and len(t.raw_data) > 1024:
                start = out.tell()
                length = len(t.raw_data)
                out.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue  # small inline tensors stay in the graph
            del t.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(start)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = TensorProto.EXTERNAL
            pad = -out.tell() % _ALIGN
            out.write(b"\0" * pad)


def contrib_opsets(module) -> dict | None:
    """ONNX Runtime's contrib-op domain for modules that emit its ops (the shared KV cache's
    GroupQueryAttention: exporter.families.gqa), else nothing (torch warns of an unused domain)."""
    from exporter.families.gqa import CONTRIB_OPSETS

    return CONTRIB_OPSETS if getattr(module, "uses_contrib_ops", False) else None


def export_stage(module, spec: StageSpec, example_inputs: tuple, path: Path, opset: int,
                 external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Exports `module` to `path` with the spec's names and dynamic axes.

    Uses torch.onnx's TorchScript exporter: the dynamo exporter does not yet take our explicit
    dynamic-axes contract for a KV cache of dynamic past length (0 at prefill) without
    rewriting shapes. Returns the files written, relative to `path.parent`.
    """
    import onnx
    import torch

    # torch.onnx.export restores the module's training flag recursively afterwards: a wrapper left
    # in training mode would switch the whole HF model's dropout on.
    module.eval()
    scratch = path.parent / f".{path.stem}.scratch"
    scratch.mkdir()
    try:
        raw = scratch / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example_inputs, str(raw), dynamo=False, opset_version=opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
                custom_opsets=contrib_opsets(module),
            )
        model = onnx.load(str(raw), load_external_data=False)  # the graph only, not the weights
        files = [path.name]
        if sum(tensor_bytes(t, scratch) for t in model.graph.initializer) > external_threshold:
            data = path.with_name(f"{path.name}.data")
            consolidate_external_data(model, scratch, data)
            files.append(data.name)
            onnx.save_model(model, str(path))
        else:
            onnx.load_external_data_for_model(model, str(scratch))
            onnx.save_model(model, str(path))
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
