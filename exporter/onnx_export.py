"""torch module -> one ONNX file (plus one external-data file when it is large)."""

from __future__ import annotations

import warnings
from pathlib import Path

from runtime.stages import StageSpec

# protobuf cannot hold a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


def initializer_bytes(model) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            for entry in t.external_data:
                if entry.key == "length":
                    total += int(entry.value)
    return total


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
    raw = scratch / path.name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example_inputs, str(raw), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    model = onnx.load(str(raw), load_external_data=True)
    files = [path.name]
    if initializer_bytes(model) > external_threshold:
        data = f"{path.name}.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        files.append(data)
    else:
        onnx.save_model(model, str(path))
    del model
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return files
