"""HF BLIP-2 checkpoint -> validated artifact directory, written atomically."""

from __future__ import annotations

import gc
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from exporter.families import export_family
from exporter.loading import LoadOptions, check_local_weights, load_config, load_model, load_model_staged
from exporter.memory_estimate import export_peak, stage_parameters, stored_sizes
from exporter.onnx_export import MIN_OPSET, check_opset, export_stage
from exporter.processor_spec import preprocessing_of, tokenizer_spec
from exporter.validate import ValidationError, check_references, collect_references, failure_message, summary_lines
from runtime.artifact.manifest import FORMAT, SCHEMA_VERSION, Manifest, checksummed, write_manifest
from runtime.artifact.writer import EXTERNAL_DATA_THRESHOLD, atomic_directory, check_target
from runtime.errors import Blip2EdgeError
from runtime.host_memory import check_fits, format_size

DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class ExportOptions:
    opset: int = MIN_OPSET
    atol: float | None = None
    validate: bool = True
    overwrite: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    load: LoadOptions = field(default_factory=LoadOptions)
    # The decoder's KV cache form (ExportFamily.resolve_kv_cache): auto, concat or shared.
    kv_cache: str = "auto"
    # Bytes the run may use at its peak (--max-memory); the machine's available memory in any case.
    max_memory: int | None = None
    # Read each stage's weights from the checkpoint as it is exported (exporter/staged_weights.py)
    # rather than loading the whole model first; the graphs are the same either way.
    staged: bool = True

    def __post_init__(self) -> None:
        check_opset(self.opset)  # torch's and onnxruntime's range, before anything is loaded
        if self.load.dtype not in DEFAULT_ATOL:
            raise Blip2EdgeError(f"--dtype must be one of {', '.join(DEFAULT_ATOL)}, got {self.load.dtype}")

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else DEFAULT_ATOL[self.load.dtype]


def model_dims(config) -> dict:

    return export_family(config).model_dims(config)


def tool_versions(opset: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"opset": opset}
    for pkg in ("blip2-edge", "torch", "transformers", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_artifacts(hf_model, processor, source: dict, tmp: Path, opts: ExportOptions, log: Callable,
                    weights=None) -> dict:
    """Writes graphs, embedding table and tokenizer/processor files into `tmp`; returns the manifest
    (with its `files` list), which the caller writes last, once the directory has passed validation.
    `weights`: the StagedWeights of a model built on the meta device, each stage's read for its
    export alone; None for a model loaded whole."""
    holding = weights.loaded if weights is not None else nullcontext

    family = export_family(hf_model.config)
    dims = family.model_dims(hf_model.config)
    kv_cache = family.resolve_kv_cache(opts.kv_cache, opts.load.dtype, dims.get("head_dim"))
    if kv_cache is not None:
        dims["kv_cache"] = kv_cache
    float_dtype = {"fp32": "float32", "fp16": "float16"}[opts.load.dtype]
    specs = family.runtime.stage_specs(dims)
    modules = family.modules(hf_model, kv_cache)
    examples = family.example_inputs(hf_model, dims)
    files, stages = [], {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        with holding(modules[name]):
            written = export_stage(modules[name], spec, examples[name], tmp / spec.file, opts.opset,
                                   opts.external_data_threshold)
        files += written
        stages[name] = {**spec.to_manifest(float_dtype, dims), "precision": opts.load.dtype,
                        "external_data": written[1:]}
        log(f"  exported {name:<8} -> {', '.join(written)}  ({time.perf_counter() - t0:.1f}s)")

    with holding(hf_model.get_input_embeddings()):  # the embedding table (embed_tokens.npy)
        sections, written = family.manifest_sections(hf_model, processor, float_dtype, tmp)
    files += written
    processor.save_pretrained(tmp)
    if hf_model.generation_config is not None:  # retrieval models have none
        hf_model.generation_config.save_pretrained(tmp)
    files += sorted(p.name for p in tmp.iterdir() if p.suffix == ".json" and p.name != "manifest.json")
    extra_sections, extra_files = family.architecture_sections(processor, tmp)
    files += extra_files

    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "source": source,
        **family.manifest_header(hf_model),
        "model": dims,
        "stages": stages,
        **sections,
        "preprocessing": preprocessing_of(processor.image_processor).to_manifest(),
        "tokenizer": tokenizer_spec(processor.tokenizer),
        **extra_sections,
        "quantization": None,
        "tools": tool_versions(opts.opset),
        "files": sorted(set(files)),
    }
    return manifest


def _config_before_loading(model: str, load: LoadOptions):
    """The checkpoint's config, read before any weight (its directory checked as load_model
    checks it); None for a path that does not exist, which load_model then names."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_local_weights(path, load.allow_pickle)
    elif path.exists() or path.is_absolute() or model.startswith((".", "~")):
        return None
    return load_config(model, load)


def _exports_in(config, model: str, dtype: str) -> bool:
    """Whether the family exports this config in `dtype` (a refusal is not an option to offer)."""
    try:
        export_family(config, model).check(config, model, dtype)
    except Blip2EdgeError:
        return False
    return True


def check_memory(model: str, opts: ExportOptions, log: Callable[[str], None]) -> None:
    """The expected peak of this export (exporter/memory_estimate.py) against the memory
    available and --max-memory, before anything is loaded or written: a refusal is one line that
    names what would fit (--no-validate, --dtype fp16)."""
    config = _config_before_loading(model, opts.load)
    if config is None:
        return
    params = stage_parameters(config)
    stored = stored_sizes(model)
    # A local checkpoint with no safetensors header read (pickle weights) is loaded whole.
    staged = opts.staged and (stored is not None or not Path(model).expanduser().is_dir())
    dtype = opts.load.dtype
    peak = export_peak(config, dtype, opts.validate, params, stored, staged)
    others = {}
    if opts.validate:
        others["--no-validate"] = export_peak(config, dtype, False, params, stored, staged)["peak"]
    if dtype == "fp32" and _exports_in(config, model, "fp16"):
        others["--dtype fp16"] = export_peak(config, "fp16", opts.validate, params, stored, staged)["peak"]
    log(check_fits("export", peak["peak"], opts.max_memory, alternatives=others,
                   note=f" (+ {format_size(peak['mapped'])} of checkpoint mapped from disk, which can be dropped)"))


def export(model: str, out_dir: str | os.PathLike, opts: ExportOptions | None = None,
           log: Callable[[str], None] = print) -> dict:
    """Exports `model` (hub id or directory) into `out_dir`; returns the validation report
    (empty when validation is off). Nothing appears at `out_dir` unless everything succeeded,
    and nothing at all is written when the expected peak memory does not fit (check_memory)."""

    opts = opts or ExportOptions()
    out = Path(out_dir)
    report: dict = {}
    check_target(out, opts.overwrite)  # before the estimate reads the config; again under the lock
    check_memory(model, opts, log)
    # OUT_DIR is checked and locked before the (slow) model load, and checked again at the rename.
    with atomic_directory(out, opts.overwrite) as tmp:
        t0 = time.perf_counter()
        if opts.staged:
            hf_model, processor, weights = load_model_staged(model, opts.load, log)
        else:
            (hf_model, processor), weights = load_model(model, opts.load), None
        how = "the whole model" if weights is None else "its structure; each stage's weights read as it is exported"
        log(f"loaded {model} ({opts.load.dtype}): {how} ({time.perf_counter() - t0:.1f}s)")
        local = Path(model).is_dir()
        source = {"model": str(Path(model).resolve()) if local else model, "revision": opts.load.revision,
                  "commit_hash": getattr(hf_model.config, "_commit_hash", None)}
        # Validation reads the manifest from memory: on disk it is written last, so a directory
        # left by a killed or failed run is never loadable.
        pending = Manifest(tmp, checksummed(tmp, write_artifacts(hf_model, processor, source, tmp, opts, log, weights)))
        if opts.validate:
            if weights is not None:  # transformers' generate and every stage's reference need all of it
                weights.load(hf_model)
            # PyTorch's references first, then the graphs with the model freed: the two never
            # hold the weights side by side (exporter/deferred_runs.py).
            references = collect_references(hf_model, processor, pending, opts.tolerance, check_generation=True)
            del hf_model, weights
            gc.collect()
            log(f"  computed PyTorch's references, freed the model ({time.perf_counter() - t0:.1f}s)")
            report = check_references(references, pending)
            if opts.load.dtype != "fp32" and "generation" in report:
                # Half-precision kernels differ between PyTorch and ORT: token agreement is reported, not gated.
                report["generation"]["gating"] = False
                report["ok"] = all(s["ok"] for s in report["stages"])
            (tmp / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
            log("validation against PyTorch:")
            for line in summary_lines(report):
                log(line)
            if not report["ok"]:
                raise ValidationError(failure_message(report))
        write_manifest(tmp, pending.data)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return report
