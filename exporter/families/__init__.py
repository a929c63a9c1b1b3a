"""The exporter's side of each model family: config checks, model dims, torch stage wrappers,
example inputs, generation defaults and stage validation. The runtime side (specs, layout,
decode step) is runtime/families/; both are looked up by the checkpoint's text_config.model_type
(and its own model_type: InstructBLIP wraps the LLM family, exporter/families/instructblip.py).
"""

from __future__ import annotations

from exporter.families import llama, opt, retrieval, t5
from exporter.families.instructblip import instructblip_export
from exporter.families.retrieval import is_retrieval
from runtime.errors import Blip2EdgeError

# text_config.model_type -> its export family. The family modules never import this registry.
_FAMILIES = {"opt": opt.FAMILY, "t5": t5.FAMILY, "llama": llama.FAMILY}


def supported_llms() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def export_family(config, model: str = "the checkpoint"):
    """The export family of a BLIP-2 or InstructBLIP config (by its model_type and its
    text_config's); an unsupported LLM is one line naming the supported. A
    Blip2ForImageTextRetrieval checkpoint is the retrieval family, whatever its (unused) text_config."""
    if is_retrieval(config):
        return retrieval.FAMILY
    llm = config.text_config.model_type
    if llm not in _FAMILIES:
        raise Blip2EdgeError(f"'{model}' uses a '{llm}' language model, which is not supported "
                             f"(supported LLM families: {', '.join(_FAMILIES)})")
    family = _FAMILIES[llm]
    if getattr(config, "model_type", None) == "instructblip":
        return instructblip_export(family)
    return family
