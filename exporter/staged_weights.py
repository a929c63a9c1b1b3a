"""A transformers model whose weights are read from the checkpoint one stage at a time.

The model is built with every parameter on the meta device (shapes, no memory; buffers are real,
computed by the modules' constructors as usual). `StagedWeights.loaded(module)` reads the
parameters `module` reaches from the checkpoint's safetensors files, for as long as the block
lasts, then puts them back on the meta device. safetensors maps its files, so a stage's weights
stored in the export dtype are file-backed pages rather than copies; a cast (an fp16 checkpoint
exported in fp32) copies that stage's tensors alone. The export's peak is then one stage's
weights and its trace, not the whole model beside it (docs/export.md, "Memory").

Each tensor is cast exactly as `from_pretrained` casts it (the export dtype, or float32 for the
modules the class keeps in float32), so the graphs are byte-identical to a whole-model export
(tests/exporter/test_staged_export.py).
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import Blip2EdgeError
from runtime.host_memory import release_freed_memory

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class NotStageable(Exception):
    """This checkpoint cannot be read stage by stage (the reason, one line); the caller loads it whole."""


def checkpoint_weight_files(model: str, revision: str | None = None, local_files_only: bool = False,
                            token=None) -> list[Path]:
    """The safetensors files of a local checkpoint directory or a hub id (downloaded into the
    Hugging Face cache as from_pretrained would): the index's shards, or the one file."""
    path = Path(model).expanduser()
    if path.is_dir():  # the one file first, as from_pretrained looks
        if (path / SINGLE).is_file():
            return [path / SINGLE]
        if (path / INDEX).is_file():
            return _indexed_shards(path / INDEX, lambda name: path / name)
        raise NotStageable(f"{path}: no {SINGLE} or {INDEX}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    get = lambda name: Path(hf_hub_download(model, name, revision=revision,  # noqa: E731
                                            local_files_only=local_files_only, token=token))
    for files in (lambda: [get(SINGLE)], lambda: _indexed_shards(get(INDEX), get)):  # from_pretrained's order
        try:
            return files()
        except EntryNotFoundError as exc:
            # Not in the cache, offline: the file may still be on the hub. Online, the hub could
            # not be reached (an OSError the caller reports); only a file the hub lacks is absent.
            if isinstance(exc, LocalEntryNotFoundError) and not local_files_only:
                raise
    raise NotStageable(f"'{model}' has no {SINGLE} or {INDEX}")


def _indexed_shards(index: Path, locate) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise NotStageable(f"{index}: unreadable index ({exc})") from None
    return [locate(name) for name in names]


@contextmanager
def parameters_on_meta():
    """Every nn.Parameter registered inside the block lands on the meta device (buffers do not):
    a constructor's `torch.empty` of a weight is dropped before anything writes it, and the
    initialisers that follow run on meta tensors, which costs nothing."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is a tie (tie_weights): keep it the same object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class StagedWeights:
    """The checkpoint's tensors, placed into `hf_model` (built under parameters_on_meta) on demand.

    A parameter's contents are swapped in place (torch.utils.swap_tensors), never the Parameter
    object: tied weights, and stage wrappers that hold one of the model's parameters as their own
    (QFormerStage.query_tokens), see the weights wherever they hold them. `keep_fp32(name)`:
    whether from_pretrained keeps that parameter in float32 in `dtype`."""

    def __init__(self, hf_model, files: list[Path], dtype, keep_fp32):
        from safetensors import safe_open

        self.model = hf_model
        self.dtype = dtype
        self.keep_fp32 = keep_fp32
        self._where: dict[str, Path] = {}  # tensor name -> its file
        stored: dict[str, tuple[list[int], str]] = {}  # tensor name -> (shape, dtype) from the header
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                self._where.update(dict.fromkeys(h.keys(), Path(f)))
                for key in h.keys():
                    piece = h.get_slice(key)
                    stored[key] = (list(piece.get_shape()), piece.get_dtype())
        self._open: dict[Path, object] = {}
        names: dict[int, list[str]] = {}  # id(parameter) -> its names (a tied one has several)
        params = {}
        for name, p in hf_model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
        # id(parameter) -> (the name the checkpoint stores it under, its first name in the model)
        self._source = {key: (next((n for n in aliases if n in self._where), None), aliases[0])
                        for key, aliases in names.items()}
        missing = [first for stored_as, first in self._source.values() if stored_as is None]
        if missing:
            raise NotStageable(f"{len(missing)} parameter(s) the checkpoint stores under other names or not at all "
                               f"(first: {missing[0]})")
        for key, (name, _) in self._source.items():  # what from_pretrained refuses, or would convert
            shape, kind = stored[name]
            if kind not in FLOAT_DTYPES:
                raise NotStageable(f"{name} is stored as {kind}")
            if shape != list(params[key].shape):
                raise Blip2EdgeError(f"{self._where[name]}: {name} has shape {shape}, the config's model "
                                     f"needs {list(params[key].shape)}")

    def _read(self, p):
        import torch

        stored_as, name = self._source[id(p)]
        tensor = self._file(stored_as).get_tensor(stored_as)
        target = torch.float32 if self.keep_fp32(name) else self.dtype
        return tensor if tensor.dtype == target else tensor.to(target)

    def _file(self, key: str):
        from safetensors import safe_open

        path = self._where[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def close(self) -> None:
        """Drops the open files: a file's mapping (and the pages read through it, which count in
        the RSS) goes once no tensor read from it is left."""
        self._open.clear()

    @staticmethod
    def _swap(p, tensor) -> None:
        from torch import nn
        from torch.utils import swap_tensors

        swap_tensors(p, nn.Parameter(tensor, requires_grad=p.requires_grad))

    def load(self, module) -> None:
        """Reads every parameter of `module` still on the meta device (all of them: the model)."""
        for p in module.parameters():
            if p.is_meta:
                self._swap(p, self._read(p))
        buffers = {id(b): n for n, b in self.model.named_buffers(remove_duplicate=False)}
        for b in module.buffers():  # persistent ones the checkpoint stores, as from_pretrained loads them
            name = buffers.get(id(b))
            if name in self._where:
                b.copy_(self._file(name).get_tensor(name).to(b.dtype))

    @contextmanager
    def loaded(self, module):
        """`module`'s parameters read for the block, back on the meta device after it; those it
        found loaded (an outer block's) stay."""
        read = [p for p in module.parameters() if p.is_meta]
        self.load(module)
        try:
            yield module
        finally:
            gc.collect()  # what the block's trace still held of them: swap_tensors refuses a shared tensor
            for p in read:
                self._swap(p, p.detach().to("meta"))
            self.close()
            release_freed_memory()
