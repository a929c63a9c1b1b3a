"""The torch-free runtime: artifact directory in, captions and answers out.

Public API: Blip2Pipeline, Blip2Retriever (ITC/ITM retrieval), LoadedArtifact (what both are built
on), GenerationOptions, ThreadSettings, Result, the error types and ImageWarning (an image processed
as transformers does, but probably not as its owner meant). Imported lazily so that
`runtime.errors` or `runtime.synthetic` do not load ONNX Runtime.
"""

__all__ = ["Blip2Pipeline", "Blip2Retriever", "LoadedArtifact", "GenerationOptions", "ThreadSettings", "Result",
           "Blip2EdgeError", "ArtifactError", "ImageError", "OptionError", "ImageWarning"]

_WHERE = {
    "Blip2Pipeline": "runtime.pipeline",
    "Result": "runtime.pipeline",
    "Blip2Retriever": "runtime.retriever",
    "LoadedArtifact": "runtime.loaded_artifact",
    "GenerationOptions": "runtime.generation.options",
    "ThreadSettings": "runtime.backends.threads",
    "Blip2EdgeError": "runtime.errors",
    "ArtifactError": "runtime.errors",
    "ImageError": "runtime.errors",
    "OptionError": "runtime.errors",
    "ImageWarning": "runtime.preprocess",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
