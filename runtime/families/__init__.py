"""Model families: the one place that knows a BLIP-2 LLM's stages, input layout, decode step,
limits and defaults.

The manifest's `architecture` and `llm_family` select a family with one lookup; everything
else (pipeline, validator, calibration, profiler, TensorRT profiles) asks it. Adding a family
is adding a module here (and its torch wrappers in exporter/families/), not editing consumers.

    family = family_for(manifest.data)
    family.stage_specs(manifest.model)      # name -> StageSpec, in run order
    family.layout(query, prompt_ids, ...)   # LLMInputs
    family.new_decoder(...)                 # a runtime.search.StepDecoder with prefill()
"""

from __future__ import annotations

from runtime.errors import ArtifactError
from runtime.families.base import Family, LLMInputs

ARCHITECTURES = ("blip-2",)
_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def known_families() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_FAMILIES))


def get_family(llm_family: str) -> Family:
    """The family for a manifest's (or a checkpoint's text_config's) `llm_family` value."""
    _load_builtin()
    try:
        return _FAMILIES[llm_family]
    except KeyError:
        raise ArtifactError(
            f"unknown LLM family '{llm_family}' (known: {', '.join(known_families())})"
        ) from None


def family_for(manifest: dict) -> Family:
    """The family of a manifest; its architecture must be one this runtime knows."""
    arch = manifest.get("architecture")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"manifest: unknown architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    return get_family(manifest.get("llm_family"))


def _load_builtin() -> None:
    # Always all (imports are cached): one family module imported directly must not hide the others.
    from runtime.families import opt, t5  # noqa: F401  (each registers itself)
    from runtime.families import llama  # noqa: F401


__all__ = ["Family", "LLMInputs", "family_for", "get_family", "known_families", "register"]
