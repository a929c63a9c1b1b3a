"""The exporter's side of each model family: config checks, model dims, torch stage wrappers,
example inputs, generation defaults and stage validation. The runtime side (specs, layout,
decode step) is runtime/families/; both are looked up by the checkpoint's text_config.model_type
(and its own model_type: InstructBLIP wraps the LLM family, exporter/families/instructblip.py).
"""

from __future__ import annotations

from importlib import import_module

from runtime.errors import Blip2EdgeError

# text_config.model_type -> module of this package
_MODULES = {"opt": "exporter.families.opt", "t5": "exporter.families.t5", "llama": "exporter.families.llama"}


def supported_llms() -> tuple[str, ...]:
    return tuple(_MODULES)


def export_family(config, model: str = "the checkpoint"):
    """The export family of a BLIP-2 or InstructBLIP config (by its model_type and its
    text_config's); an unsupported LLM is one line naming the supported. A
    Blip2ForImageTextRetrieval checkpoint is the retrieval family, whatever its (unused) text_config."""
    from exporter.families.retrieval import is_retrieval

    if is_retrieval(config):
        return import_module("exporter.families.retrieval").FAMILY
    llm = config.text_config.model_type
    if llm not in _MODULES:
        raise Blip2EdgeError(f"'{model}' uses a '{llm}' language model, which is not supported "
                             f"(supported LLM families: {', '.join(_MODULES)})")
    family = import_module(_MODULES[llm]).FAMILY
    if getattr(config, "model_type", None) == "instructblip":
        from exporter.families.instructblip import instructblip_export

        return instructblip_export(family)
    return family
