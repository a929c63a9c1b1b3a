"""manifest.json is validated before anything is allocated: a small explicit validator.

The rules (runtime/artifact/rules.py) each know the field path they check and raise the first
violation as one line that names that path and says what was expected. Per family
(`llm_family`) the FAMILIES table declares the model keys, the stages and their tensor specs
(from runtime.stages, which the exporter writes from) and any consistency checks: adding a
family (Flan-T5's encoder stage) is an entry in the table, not an edit of the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from runtime.artifact.rules import (
    FLOAT_DTYPES,
    MAX_IDS,
    MAX_IMAGE_SIDE,
    RESAMPLES,
    TENSOR_DTYPES,
    Bool,
    Const,
    Context,
    Dim,
    Files,
    Int,
    Invalid,
    ListOf,
    Nullable,
    Num,
    Obj,
    RelPath,
    Rule,
    Str,
    Template,
)
from runtime.errors import ArtifactError
from runtime.families import ARCHITECTURES as RUNTIME_ARCHITECTURES
from runtime.families import FIXED_FAMILIES, get_family
from runtime.stages import DYNAMIC_DIMS, KV_CACHE_FORMS, SHARED_HEAD_MULTIPLE, StageSpec, kv_cache_form


def _vocab(ctx: Context) -> int:
    return ctx.root["model"]["vocab_size"] - 1


TOKEN_ID = Int(0, _vocab)
TENSOR = Obj({"name": Str(pattern=re.compile(r"[A-Za-z0-9_.:/-]{1,256}")), "dtype": Str(choices=TENSOR_DTYPES),
              "shape": ListOf(Dim(), max_len=8)})
COSINE = Num(bound=1.0 + 1e-6)
# A quantized visual stage's cosine to FP32 as quantize measured it, and the gates it passed:
# what --backend auto judges other engines against (runtime/backends/auto.py: stage_gate).
STAGE_FIDELITY = Obj({"cosine_mean": COSINE, "cosine_worst_1pct": COSINE, "gate_cosine_mean": COSINE,
                      "gate_cosine_worst_1pct": COSINE})
STAGE = Obj(required={"file": RelPath(), "inputs": ListOf(TENSOR, 1), "outputs": ListOf(TENSOR, 1),
                      "precision": Str(nonempty=True, max_len=64)},
            optional={"external_data": ListOf(RelPath(), max_len=1024),
                      "quantization": Nullable(Obj(optional={"trt_calibration_table": RelPath(),
                                                             "fidelity": STAGE_FIDELITY}))})

# Keys every family has; family tables add theirs (LLM_SECTIONS for the families with an LLM).
COMMON = {
    "embeddings": Obj({"file": RelPath(), "dtype": Str(choices=FLOAT_DTYPES), "shape": ListOf(Int(1), 2, 2)}),
    "preprocessing": Obj(required={"size": ListOf(Int(1, MAX_IMAGE_SIDE), 2, 2), "resample": Str(choices=RESAMPLES),
                                   "rescale_factor": Num(positive=True), "mean": ListOf(Num(), 3, 3),
                                   "std": ListOf(Num(positive=True), 3, 3)},
                         optional={"convert_rgb": Const(True), "channels": Const("first")}),
    "tokenizer": Obj(required={"file": RelPath(), "prefix_ids": ListOf(TOKEN_ID, max_len=MAX_IDS),
                               "suffix_ids": ListOf(TOKEN_ID, max_len=MAX_IDS)},
                     optional={"clean_up_tokenization_spaces": Bool()}),
    "prompts": Obj({"caption": Str(), "caption_prefix": Template(), "vqa": Template()}),
    "generation": Obj(required={"eos_token_ids": ListOf(TOKEN_ID, max_len=MAX_IDS), "pad_token_id": TOKEN_ID,
                                "stop_strings": ListOf(Str(nonempty=True), max_len=MAX_IDS)},
                      optional={"max_new_tokens": Int(1, 1 << 20), "decoder_start_token_id": TOKEN_ID}),
    "files": Files(),
}
LLM_SECTIONS = ("embeddings", "prompts", "generation")  # of COMMON: only the families with an LLM have these
OPTIONAL = {"source": Nullable(Obj()), "tools": Nullable(Obj()), "quantization": Nullable(Obj())}


# ---- families --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySchema:
    """What the validator knows of one llm_family: its model dims (with bounds), its stages'
    specs from those dims (the runtime family's own, runtime.families), and checks across fields."""

    model: dict[str, Rule]
    stage_specs: Callable[[dict], dict[str, StageSpec]]
    checks: tuple[Callable[[dict], None], ...] = field(default=())
    sections: tuple[str, ...] = LLM_SECTIONS  # which of LLM_SECTIONS its manifests carry
    optional_model: dict[str, Rule] = field(default_factory=dict)  # model keys older artifacts lack


def _heads_times_dim(m: dict) -> None:
    model = m["model"]
    if model["num_heads"] * model["head_dim"] != model["text_hidden"]:
        raise Invalid("model.head_dim", f"text_hidden / num_heads = {model['text_hidden']} / {model['num_heads']}",
                      model["head_dim"])


def _check_llm_sections(m: dict) -> None:
    """The LLM families' image placeholder and embedding table against their model dims
    (image_token_id, vocab_size and text_hidden are required model keys, checked present by then)."""
    model = m["model"]
    TOKEN_ID.check(model["image_token_id"], "model.image_token_id", Context(m))
    want = [model["vocab_size"], model["text_hidden"]]
    if m["embeddings"]["shape"] != want:
        raise Invalid("embeddings.shape", f"[model.vocab_size, model.text_hidden] = {want}", m["embeddings"]["shape"])


VISION_DIMS = {"image_size": Int(1, MAX_IMAGE_SIDE), "num_patches": Int(1, 1 << 20), "vision_hidden": Int(1, 1 << 16),
               "num_query_tokens": Int(1, 4096), "text_hidden": Int(1, 1 << 16), "image_token_id": Int(0, 1 << 22)}
LLM_DIMS = {"num_layers": Int(1, 1024), "num_heads": Int(1, 1024), "head_dim": Int(1, 4096),
            "vocab_size": Int(1, 1 << 22)}

# The model keys each llm_family's manifest carries; its stages come from runtime.families.
MODEL_KEYS: dict[str, dict[str, Rule]] = {
    "opt": {**VISION_DIMS, **LLM_DIMS, "max_position_embeddings": Int(1, 1 << 20)},
    # T5's relative position buckets have no limit; its encoder may have its own depth.
    "t5": {**VISION_DIMS, **LLM_DIMS, "num_encoder_layers": Int(1, 1024)},
    # LLaMA caches its key/value heads only (grouped-query attention); rotary positions.
    "llama": {**VISION_DIMS, **LLM_DIMS, "num_kv_heads": Int(1, 1024), "max_position_embeddings": Int(1, 1 << 20)},
}


def _kv_heads_group_heads(m: dict) -> None:
    model = m["model"]
    if model["num_heads"] % model["num_kv_heads"]:
        raise Invalid("model.num_kv_heads", f"a divisor of model.num_heads ({model['num_heads']})", model["num_kv_heads"])


def _shared_cache_heads(m: dict) -> None:
    model = m["model"]
    if kv_cache_form(model) == "shared" and model["head_dim"] % SHARED_HEAD_MULTIPLE:
        raise Invalid("model.kv_cache", f"concat (GroupQueryAttention takes heads of a multiple of "
                                        f"{SHARED_HEAD_MULTIPLE}; model.head_dim is {model['head_dim']})", "shared")


# Checks a family adds to those every LLM family has.
EXTRA_CHECKS = {"opt": (_shared_cache_heads,), "llama": (_kv_heads_group_heads, _shared_cache_heads)}
# The decoder-only families' KV cache form (runtime.stages.KV_CACHE_FORMS); absent: "concat".
OPTIONAL_MODEL_KEYS = {name: {"kv_cache": Str(choices=KV_CACHE_FORMS)} for name in ("opt", "llama")}
FAMILIES: dict[str, FamilySchema] = {
    name: FamilySchema(model=keys, stage_specs=lambda model, name=name: get_family(name).stage_specs(model),
                       checks=(_heads_times_dim, _check_llm_sections, *EXTRA_CHECKS.get(name, ())),
                       optional_model=OPTIONAL_MODEL_KEYS.get(name, {}))
    for name, keys in MODEL_KEYS.items()
}

# Retrieval (ITC/ITM, no LLM): the Q-Former's own dims; vocab_size is its BERT vocabulary, text
# ids beyond max_text_tokens have no position embedding.
RETRIEVAL_DIMS = {**{k: VISION_DIMS[k] for k in ("image_size", "num_patches", "vision_hidden", "num_query_tokens")},
                  "qformer_hidden": Int(1, 1 << 16), "embed_dim": Int(1, 1 << 16), "vocab_size": Int(1, 1 << 22),
                  "max_text_tokens": Int(2, 1 << 16)}
FAMILIES["retrieval"] = FamilySchema(model=RETRIEVAL_DIMS, stage_specs=lambda model: get_family("retrieval").stage_specs(model),
                                     sections=())
# The `architecture` values this runtime runs.
ARCHITECTURES: set[str] = set(RUNTIME_ARCHITECTURES)


def _qformer_vocab(ctx: Context) -> int:
    return ctx.root["model"]["qformer_vocab_size"] - 1


QFORMER_TOKEN_ID = Int(0, _qformer_vocab)
# What an architecture adds to its llm_family's manifest: model keys, and top-level sections.
ARCHITECTURE_MODEL_KEYS: dict[str, dict[str, Rule]] = {
    "blip-2": {},
    "blip-2-retrieval": {},
    # InstructBLIP's Q-Former embeds the instruction: its BERT vocabulary and learned positions.
    "instructblip": {"qformer_vocab_size": Int(1, 1 << 22), "qformer_max_positions": Int(1, 1 << 16)},
}
ARCHITECTURE_SECTIONS: dict[str, dict[str, Rule]] = {
    "blip-2": {},
    "blip-2-retrieval": {},
    "instructblip": {"qformer_tokenizer": Obj(required={
        "file": RelPath(), "prefix_ids": ListOf(QFORMER_TOKEN_ID, max_len=MAX_IDS),
        "suffix_ids": ListOf(QFORMER_TOKEN_ID, max_len=MAX_IDS), "pad_token_id": QFORMER_TOKEN_ID,
        "padding_side": Str(choices=("left", "right"))})},
}


# ---- checks across fields --------------------------------------------------------------------


def _check_tensors(field: str, declared: list, specs, model: dict) -> None:
    names = [t.name for t in specs]
    if [t["name"] for t in declared] != names:
        raise Invalid(f"{field}", f"tensors named {', '.join(names)}", [t["name"] for t in declared])
    for i, (t, spec) in enumerate(zip(declared, specs)):
        where = f"{field}[{i}]"
        if spec.dtype == "float" and t["dtype"] not in FLOAT_DTYPES or spec.dtype != "float" and t["dtype"] != spec.dtype:
            raise Invalid(f"{where}.dtype", " or ".join(FLOAT_DTYPES) if spec.dtype == "float" else spec.dtype,
                          t["dtype"])
        if len(t["shape"]) != len(spec.shape):
            raise Invalid(f"{where}.shape", f"{len(spec.shape)} dims {spec.shape}", t["shape"])
        for j, (dim, want) in enumerate(zip(t["shape"], spec.shape)):
            if isinstance(want, str) and want in DYNAMIC_DIMS:
                expected, label = want, f'"{want}" (a dynamic dim)'
            elif isinstance(want, str):
                expected, label = model[want], f"{model[want]} (model.{want})"
            else:
                expected, label = want, str(want)
            if dim != expected or type(dim) is not type(expected):
                raise Invalid(f"{where}.shape[{j}]", label, dim)


def _check_stages(m: dict, specs: dict[str, StageSpec]) -> None:
    stages = m["stages"]
    for name, spec in specs.items():
        _check_tensors(f"stages.{name}.inputs", stages[name]["inputs"], spec.inputs, m["model"])
        _check_tensors(f"stages.{name}.outputs", stages[name]["outputs"], spec.outputs, m["model"])


def _check_shared(m: dict) -> None:
    """Checks across sections every family shares (image_size is a required model key, checked
    present by then)."""
    model = m["model"]
    side = model["image_size"]
    if m["preprocessing"]["size"] != [side, side]:
        raise Invalid("preprocessing.size", f"[{side}, {side}] (model.image_size)", m["preprocessing"]["size"])


def validate(m) -> list[tuple[str, str]]:
    """Checks a parsed manifest (format and schema version already checked); returns the
    (field, relative path) of every file the runtime loads. Raises Invalid on the first error."""
    if not isinstance(m, dict):
        raise Invalid("(top level)", "an object", m)
    ctx = Context(m)
    Obj({"architecture": Str(choices=ARCHITECTURES)}).check(m, "", ctx)
    arch = m["architecture"]
    fixed = FIXED_FAMILIES.get(arch)
    if fixed is None:
        llm = [name for name in FAMILIES if name not in FIXED_FAMILIES.values()]
        Obj({"llm_family": Str(choices=llm)}).check(m, "", ctx)
    elif m.get("llm_family") is not None:
        raise Invalid("llm_family", f"null or absent (architecture {arch!r} has no LLM)", m["llm_family"])
    family = FAMILIES[fixed or m["llm_family"]]
    stage_specs = family.stage_specs
    if arch != "blip-2" and not fixed:  # another architecture around the LLM family: its own stages (InstructBLIP's Q-Former)
        try:
            stage_specs = get_family(m["llm_family"], arch).stage_specs
        except ArtifactError:  # an architecture without that LLM family (none today: InstructBLIP runs all three)
            raise Invalid("llm_family", f"an LLM family that architecture '{arch}' runs", m["llm_family"]) from None
    model_keys = {**family.model, **ARCHITECTURE_MODEL_KEYS[arch]}
    Obj({"model": Obj(model_keys, family.optional_model), "stages": Obj()}).check(m, "", ctx)
    # Another family's model key would be read by shared code without this family's bounds
    # (num_kv_heads by the KV cache shapes): refused, as other architectures' sections are.
    known = {k for f in FAMILIES.values() for k in (*f.model, *f.optional_model)} | \
        {k for a in ARCHITECTURE_MODEL_KEYS.values() for k in a}
    for key in sorted(set(m["model"]) & known - set(model_keys) - set(family.optional_model)):
        raise Invalid(f"model.{key}", f"absent (not a model key of this {arch} artifact)", show_value=False)
    specs = stage_specs(m["model"])
    for name in m["stages"]:
        if name not in specs:
            what = f"architecture {m['architecture']!r}" if fixed else f"llm_family {m['llm_family']!r}"
            raise Invalid(f"stages.{name}", f"only the stages of {what}: {', '.join(specs)}", show_value=False)
    for name in specs:
        if name not in m["stages"]:
            raise Invalid(f"stages.{name}", "a value (required stage is missing)", show_value=False)
        STAGE.check(m["stages"][name], f"stages.{name}", ctx)
    sections = {k: r for k, r in COMMON.items() if k not in LLM_SECTIONS or k in family.sections}
    Obj({**sections, **ARCHITECTURE_SECTIONS[arch]}, OPTIONAL).check(m, "", ctx)
    # Another architecture's section would be read by code that checks only for its presence
    # (a BLIP-2 manifest naming a Q-Former tokenizer that is never verified): refused.
    for other in {k for sec in ARCHITECTURE_SECTIONS.values() for k in sec} - set(ARCHITECTURE_SECTIONS[arch]):
        if other in m:
            raise Invalid(other, f"absent (architecture {arch!r} has no {other})", show_value=False)
    for check in family.checks:  # the model's own dims first: the stage shapes are read against them
        check(m)
    _check_shared(m)
    _check_stages(m, specs)
    return ctx.paths


def check_rule(rule: Rule, value, field: str, where) -> None:
    """One rule on one value, a broken rule raised as an ArtifactError naming `where`."""
    try:
        rule.check(value, field, Context({}))
    except Invalid as exc:
        raise ArtifactError(f"{where}: {exc}") from None


def check_manifest(m, where) -> list[tuple[str, str]]:
    """validate(), with a broken rule raised as an ArtifactError that names the manifest."""
    try:
        return validate(m)
    except Invalid as exc:
        raise ArtifactError(f"{where}: {exc}") from None
