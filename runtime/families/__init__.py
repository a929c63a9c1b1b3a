"""Model families: the one place that knows a BLIP-2 LLM's stages, input layout, decode step,
limits and defaults.

The manifest's `architecture` and `llm_family` select a family with one lookup; everything
else (pipeline, validator, calibration, profiler, TensorRT profiles) asks it. Adding a family
is adding a module here (and its torch wrappers in exporter/families/), not editing consumers.

    family = family_for(manifest.data)      # by architecture + llm_family
    family.stage_specs(manifest.model)      # name -> StageSpec, in run order
    family.layout(query, prompt_ids, ...)   # LLMInputs
    family.new_decoder(...)                 # a runtime.generation.search.StepDecoder with prefill()
"""

from __future__ import annotations

from runtime.errors import ArtifactError
from runtime.families.base import Family, LLMInputs
from runtime.families.instructblip import instructblip_family
from runtime.families.llama import LLAMA
from runtime.families.opt import OPT
from runtime.families.retrieval import RETRIEVAL
from runtime.families.t5 import T5

ARCHITECTURES = ("blip-2", "instructblip", "blip-2-retrieval")
# Architectures that are one family whatever `llm_family` says (they have no LLM; the manifest
# leaves llm_family out). The others take their family from llm_family.
FIXED_FAMILIES = {"blip-2-retrieval": "retrieval"}
# llm_family (or fixed family) -> its BLIP-2 family. The family modules never import this one:
# the registry sits above them, so the import graph stays one-way.
_FAMILIES: dict[str, Family] = {family.name: family for family in (LLAMA, OPT, RETRIEVAL, T5)}
_BY_ARCHITECTURE: dict[tuple[str, str], Family] = {}  # (architecture, llm_family) -> family


def register(family: Family) -> Family:
    """Adds a family defined outside this package (its `name` is its llm_family)."""
    _FAMILIES[family.name] = family
    return family


def known_families() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def get_family(llm_family: str, architecture: str = "blip-2") -> Family:
    """The family for a manifest's (or a checkpoint's) `architecture` and `llm_family` values:
    a BLIP-2 LLM family, or that LLM family inside another architecture (InstructBLIP)."""
    if architecture in FIXED_FAMILIES:  # no LLM: llm_family means nothing there
        return _FAMILIES[FIXED_FAMILIES[architecture]]
    try:
        base = _FAMILIES[llm_family]
    except KeyError:
        llms = [f for f in known_families() if f not in FIXED_FAMILIES.values()]
        raise ArtifactError(f"unknown LLM family '{llm_family}' (known: {', '.join(llms)})") from None
    if architecture == "blip-2":
        return base
    if architecture == "instructblip":
        key = (architecture, llm_family)
        if key not in _BY_ARCHITECTURE:
            _BY_ARCHITECTURE[key] = instructblip_family(base)
        return _BY_ARCHITECTURE[key]
    raise ArtifactError(f"unknown architecture '{architecture}' (known: {', '.join(ARCHITECTURES)})")


def family_for(manifest: dict) -> Family:
    """The family of a manifest; its architecture must be one this runtime knows."""
    arch = manifest.get("architecture")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"manifest: unknown architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    return get_family(FIXED_FAMILIES.get(arch) or manifest.get("llm_family"), arch)


__all__ = ["Family", "LLMInputs", "family_for", "get_family", "known_families", "register"]
