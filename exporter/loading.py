"""Loading a BLIP-2 or InstructBLIP checkpoint (hub id or local directory) safely, with clear errors.

safetensors only unless the user allows pickle; `trust_remote_code` only when asked.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import try_to_load_from_cache

from exporter.families import export_family
from runtime.errors import Blip2EdgeError

# config.model_type -> (model class, processor class) in transformers
SUPPORTED_ARCHITECTURES = {"blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
                           "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor")}
# A "blip-2" config whose architectures name Blip2ForImageTextRetrieval (exporter/families/retrieval.py).
RETRIEVAL_CLASSES = ("Blip2ForImageTextRetrieval", "Blip2Processor")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class LoadOptions:
    revision: str | None = None
    local_files_only: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    dtype: str = "fp32"  # fp32 | fp16


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def check_local_weights(path: Path, allow_pickle: bool) -> None:
    """A local directory must hold safetensors weights unless pickle is allowed."""
    if not (path / "config.json").is_file():
        raise Blip2EdgeError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        if allow_pickle:
            return
        raise Blip2EdgeError(
            f"{path}: weights are pickle files, which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    raise Blip2EdgeError(f"{path}: no weight files (*.safetensors) found")


def check_safetensors(files: list[Path]) -> None:
    """Reads each file's safetensors header (not the weights): a truncated, empty or corrupt
    file is refused naming it, before transformers fails on it deep inside from_pretrained."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="np"):
                pass
        except (SafetensorError, OSError) as exc:
            raise Blip2EdgeError(f"{f}: not a valid safetensors file ({_one_line(exc)})") from None


WAYS_OUT = ("give a local checkpoint directory, a hub id already in the Hugging Face cache with "
            "--local-files-only, or `toy` (the embedded model)")


def _offline(opts: LoadOptions) -> bool:
    return opts.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_hub_reachable(model: str, revision: str | None = None, timeout: float = 3.0) -> None:
    """One connection to the hub before transformers tries: offline, its retries and backoff take
    ~25 s and print every failure twice; this fails in one line, naming what it tried (and, when
    the checkpoint is in the local cache, how to export it from there)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
            raise Blip2EdgeError(f"'{model}': cannot reach {host}:{port} ({reason}); it is in the local Hugging Face "
                                 "cache: add --local-files-only to export it from there") from None
        raise Blip2EdgeError(f"'{model}': cannot reach {host}:{port} to download it ({reason}); {WAYS_OUT}") from None


def load_config(model: str, opts: LoadOptions):
    from transformers import AutoConfig

    if not Path(model).expanduser().exists():
        if not _offline(opts):
            check_hub_reachable(model, opts.revision)
    try:
        config = AutoConfig.from_pretrained(
            model, revision=opts.revision, local_files_only=opts.local_files_only,
            trust_remote_code=opts.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        if _offline(opts) and not Path(model).expanduser().exists():  # no connection was attempted: say so
            raise Blip2EdgeError(f"'{model}' is not in the local Hugging Face cache, and --local-files-only (or "
                                 f"HF_HUB_OFFLINE) allows no download; {WAYS_OUT}") from None
        raise Blip2EdgeError(f"cannot load the config of '{model}': {_one_line(exc)}") from None
    check_supported(config, model, opts.dtype)
    return config


def check_supported(config, model: str, dtype: str = "fp32") -> None:
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise Blip2EdgeError(
            f"'{model}' is a '{arch}' model, not BLIP-2 or InstructBLIP "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    family = export_family(config, model)
    family.check(config, model, dtype)
    if family.runtime.task == "generation" and config.image_token_index is None:
        raise Blip2EdgeError(
            f"'{model}': config has no image_token_index; checkpoints from before transformers 4.47 need "
            "updating (re-save with a current Blip2Processor)"
        )


def keeps_fp32(model_class, family):
    """The class that loads `family`'s checkpoints in float16: `model_class` itself when its
    `_keep_in_fp32_modules` already names the LLM's (family.keep_in_fp32), else a subclass that
    adds them. transformers' InstructBLIP classes merge their LLM's list when built; its BLIP-2
    classes do not (4.57: Blip2ForConditionalGeneration keeps the query tokens and Q-Former only),
    so a BLIP-2 Flan-T5 loaded in float16 would run T5's `wo` in float16, which T5 itself declares
    must stay float32 (and which overflows float16 in the XL/XXL checkpoints). from_pretrained
    then reads those weights as float32 from the checkpoint, as it does for T5 alone."""
    keep = list(model_class._keep_in_fp32_modules or [])
    missing = [m for m in family.keep_in_fp32 if m not in keep]
    if not missing:
        return model_class
    return type(model_class.__name__, (model_class,), {
        "__module__": model_class.__module__, "__qualname__": model_class.__qualname__,
        "_keep_in_fp32_modules": keep + missing})


def kept_in_fp32(parameter: str, modules) -> bool:
    """Whether `parameter` (a dotted name) is in one of `modules`, matched as from_pretrained
    matches `_keep_in_fp32_modules`: a whole name component ("wo" in "...DenseReluDense.wo.weight")."""
    return any(re.search(rf"(^|\.){re.escape(m)}($|\.)", parameter) for m in modules)


def keep_in_fp32_rule(hf_model):
    """name -> whether from_pretrained keeps that parameter in float32 in a float16 load: the
    model's `_keep_in_fp32_modules` (and `_strict`, transformers >= 4.56), as built (keeps_fp32's
    class and InstructBLIP's merged LLM list)."""
    modules = [*(getattr(hf_model, "_keep_in_fp32_modules", None) or ()),
               *(getattr(hf_model, "_keep_in_fp32_modules_strict", None) or ())]
    return lambda name: kept_in_fp32(name, modules)


class _DropSlowProcessorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using a slow image processor")


@contextmanager
def _slow_image_processor_chosen():
    """The slow BlipImageProcessor is the project's choice: runtime/preprocess.py reproduces it
    exactly (the fast one resizes torch tensors, with other rounding). transformers' notice about
    it is dropped; `use_fast=False` cannot say so, since the processor passes it on to
    AutoTokenizer too, which would then load a slow tokenizer with no tokenizer.json."""
    notice = _DropSlowProcessorNotice()
    logger = logging.getLogger("transformers.processing_utils")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _checked(model: str, opts: LoadOptions):
    """(config, family, model class, processor class, hub arguments) of `model`, after every
    check a load makes before reading weights."""
    import transformers

    path = Path(model).expanduser()
    if not path.exists() and (path.is_absolute() or model.startswith((".", "~"))):
        raise Blip2EdgeError(f"{model}: no such directory")
    if path.exists():
        if not path.is_dir():
            raise Blip2EdgeError(f"{path}: not a directory; give a hub id or a checkpoint directory")
        check_local_weights(path, opts.allow_pickle)
    config = load_config(model, opts)
    if path.is_dir():
        check_safetensors(sorted(path.glob("*.safetensors")))
    common = dict(revision=opts.revision, local_files_only=opts.local_files_only, trust_remote_code=opts.trust_remote_code)
    family = export_family(config, model)
    names = RETRIEVAL_CLASSES if family.runtime.task == "retrieval" else SUPPORTED_ARCHITECTURES[config.model_type]
    model_class, processor_class = (getattr(transformers, name) for name in names)
    if opts.dtype == "fp16":
        model_class = keeps_fp32(model_class, family)
    return config, family, model_class, processor_class, common


def _finish(hf_model, processor, config, family):
    """The processor set up as the family lays prompts out; the model in eval mode."""
    # Retrieval without image_token_index takes text ids alone (the model adds the queries' mask).
    retrieval = family.runtime.task == "retrieval"
    if processor.num_query_tokens is None and not (retrieval and config.image_token_index is None):
        processor.num_query_tokens = config.num_query_tokens
    # Batched prompts are padded as the family lays them out (OPT: left, after the query tokens;
    # T5: right, its tokenizer's own side; retrieval: BERT's right).
    processor.tokenizer.padding_side = family.runtime.padding_side
    hf_model.eval()
    return hf_model, processor


def _load_processor(processor_class, model: str, common: dict):
    with _slow_image_processor_chosen():
        return processor_class.from_pretrained(model, **common)


def _torch_dtype(opts: LoadOptions):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[opts.dtype]


@contextmanager
def _load_errors(model: str):
    """What transformers and safetensors raise for a checkpoint the user gave, as one line."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError) as exc:
        raise Blip2EdgeError(f"cannot load '{model}': {_one_line(exc)}") from None
    except SafetensorError as exc:  # a corrupt file in the hub cache (local directories are checked before)
        raise Blip2EdgeError(f"cannot load '{model}': corrupt safetensors weights ({_one_line(exc)})") from None


def load_model(model: str, opts: LoadOptions):
    """Returns (model in eval mode, processor). Raises Blip2EdgeError for every user-side problem."""
    config, family, model_class, processor_class, common = _checked(model, opts)
    with _load_errors(model):
        hf_model = model_class.from_pretrained(
            model, config=config, dtype=_torch_dtype(opts), use_safetensors=None if opts.allow_pickle else True,
            low_cpu_mem_usage=True, attn_implementation="eager", **common,
        )
        processor = _load_processor(processor_class, model, common)
    return _finish(hf_model, processor, config, family)


def in_dtype(config, dtype):
    """A copy of `config` whose sub-configs all say `dtype`, as from_pretrained sets them: a
    checkpoint can record another dtype for its LLM (blip2-opt-2.7b's text_config says float16
    under a float32 top level), and the model class builds each part in its sub-config's."""
    import copy

    config = copy.deepcopy(config)
    for sub in (config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))):
        if sub is not None:
            sub.dtype = dtype
    return config


def load_model_staged(model: str, opts: LoadOptions, log=print):
    """(model, processor, weights): the model built with its parameters on the meta device, and
    the StagedWeights that read each stage's from the checkpoint when asked
    (exporter/staged_weights.py). A checkpoint that cannot be read that way (pickle weights, or
    names from_pretrained would rename) is loaded whole, saying why; weights is then None."""
    from transformers import GenerationConfig

    from exporter.staged_weights import NotStageable, StagedWeights, checkpoint_weight_files, parameters_on_meta

    config, family, model_class, processor_class, common = _checked(model, opts)
    try:
        with _load_errors(model):
            if getattr(config, "quantization_config", None) is not None:
                raise NotStageable("a quantized checkpoint")
            files = checkpoint_weight_files(model, opts.revision, opts.local_files_only)
            with parameters_on_meta():
                hf_model = model_class._from_config(in_dtype(config, _torch_dtype(opts)), dtype=_torch_dtype(opts),
                                                    attn_implementation="eager")
            fp32 = keep_in_fp32_rule(hf_model) if opts.dtype == "fp16" else (lambda name: False)
            weights = StagedWeights(hf_model, files, _torch_dtype(opts), fp32)
    except NotStageable as exc:
        log(f"  loading the whole model: cannot read it stage by stage ({exc})")
        hf_model, processor = load_model(model, opts)
        return hf_model, processor, None
    with _load_errors(model):
        if hf_model.can_generate():  # from_pretrained reads the checkpoint's generation_config.json
            try:
                hf_model.generation_config = GenerationConfig.from_pretrained(
                    model, revision=opts.revision, local_files_only=opts.local_files_only)
            except OSError:
                pass  # none: the config's own, as _from_config made it
        processor = _load_processor(processor_class, model, common)
    hf_model, processor = _finish(hf_model, processor, config, family)
    return hf_model, processor, weights
