"""The whole-pipeline model Triton's Python backend runs for a blip2-edge model (through
runtime.serving.triton_model): loads the artifact directory once per model instance, and answers
each dynamic batch with one response per request.

A bad request gets its own INVALID_ARG error (HTTP 400, gRPC INVALID_ARGUMENT) with the
runtime's one-line message; the other requests of its batch are answered as usual; a bug in
one group of a batch is that group's INTERNAL error. Nothing a request sends ends the stub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError
from runtime.serving.jobs import RequestError, parse, run_batch

log = logging.getLogger(__name__)
INPUTS = ("image", "prompt")


class Cancelled(Exception):
    """A request its client cancelled before it ran."""


def parameters(model_config: dict) -> dict:
    """The model's config.pbtxt parameters as {key: string}."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def load_pipeline(params: dict, model_dir: str):
    """The pipeline named by the config's parameters: `artifacts` is absolute, or relative to
    the model's directory in the repository (where `triton-repo` puts them)."""
    from runtime.backends.threads import ThreadSettings
    from runtime.pipeline import Blip2Pipeline

    artifacts = Path(model_dir) / params["artifacts"]
    threads = ThreadSettings(intra_op_threads=int(params.get("intra_op_threads") or 0))
    # backend and precision as serve / triton-repo recorded them (a repository without them: ONNX Runtime)
    pipe = Blip2Pipeline.from_artifacts(artifacts, device=params.get("device") or "cpu",
                                        backend=params.get("backend") or "onnxruntime", threads=threads,
                                        precision=params.get("precision") or "f32")
    if params.get("max_image_pixels"):
        pipe.max_image_pixels = int(params["max_image_pixels"])
    return pipe


class Blip2Model:
    """The TritonPythonModel's work; `pb_utils` is the backend's triton_python_backend_utils."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config.get("name", "blip2")
        self.pipe = load_pipeline(parameters(config), args["model_repository"])
        self.pipe.options()  # the manifest's defaults are valid before the first request

    def _inputs(self, request) -> dict:
        out = {}
        for name in INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out

    @staticmethod
    def _parameters(request) -> dict:
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError:
            raise RequestError("request parameters are not valid JSON") from None
        if not isinstance(params, dict):
            raise RequestError("request parameters must be a JSON object")
        return params

    def _response(self, result):
        pb = self.pb
        if isinstance(result, Cancelled):
            return pb.InferenceResponse(error=pb.TritonError(str(result), pb.TritonError.CANCELLED))
        if isinstance(result, Blip2EdgeError):
            return pb.InferenceResponse(error=pb.TritonError(" ".join(str(result).split()), pb.TritonError.INVALID_ARG))
        if isinstance(result, BaseException):
            return pb.InferenceResponse(error=pb.TritonError(
                f"internal error: {type(result).__name__}: {' '.join(str(result).split())[:300]}",
                pb.TritonError.INTERNAL))
        text = np.array([[result.text.encode("utf-8")]], dtype=np.object_)  # (1, 1)
        tokens = np.asarray(result.tokens, dtype=np.int64).reshape(1, -1)  # (1, n)
        return pb.InferenceResponse(output_tensors=[pb.Tensor("text", text), pb.Tensor("tokens", tokens)])

    def execute(self, requests) -> list:
        jobs = []
        for request in requests:
            if getattr(request, "is_cancelled", None) and request.is_cancelled():
                # The client went away (gRPC cancels on disconnect) while it queued: no work for it.
                jobs.append(Cancelled("request cancelled by the client"))
                continue
            try:
                jobs.append(parse(self.pipe, self._inputs(request), self._parameters(request)))
            except Exception as exc:  # noqa: BLE001 - a bad request is answered, never raised
                if not isinstance(exc, Blip2EdgeError):
                    log.exception("%s: request could not be read", self.name)
                jobs.append(exc)
        return [self._response(r) for r in run_batch(self.pipe, jobs)]
