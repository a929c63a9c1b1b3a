"""Streaming text over gRPC: a decoupled Triton model (`<name>_stream`, `serve --stream`) that
sends each request's text in pieces (`text`, one response each) as the decoder settles them
(Blip2Pipeline.stream), then an empty final response; the pieces joined are the main model's
`text`.

Decoupled models answer through a response sender, one request at a time here (the pipeline's
stream is one image); dynamic batching stays with the main model. A bad request gets one error
response, as in the main model. KServe v2 streaming is gRPC only (`stream_infer`).
"""

from __future__ import annotations

import json

import numpy as np

from runtime.serving.jobs import parse
from runtime.serving.pipeline_model import Blip2Model, Cancelled, load_pipeline, parameters


class StreamModel(Blip2Model):
    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config.get("name", "blip2_stream")
        self.pipe = load_pipeline(parameters(config), args["model_repository"])

    def _piece(self, text: str):
        return self.pb.InferenceResponse(
            output_tensors=[self.pb.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_))])

    def _answer(self, request, sender) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            job = parse(self.pipe, self._inputs(request), self._parameters(request))
            # The pipeline's stream shows settled text only: the pieces joined are the text the
            # main model answers. Its prompt goes through the caption-prefix template, "{}" for
            # the families here, so it is the request's prompt unchanged.
            steps = self.pipe.stream(job.image, prompt=job.prompt, **job.kwargs)
            try:
                for piece in steps:
                    if request.is_cancelled():  # the client went away: stop decoding for it
                        sender.send(self._response(Cancelled("request cancelled by the client")), flags=final)
                        return
                    sender.send(self._piece(piece))
            finally:
                steps.close()
        except Exception as exc:  # noqa: BLE001 - a bad request is answered, never raised
            sender.send(self._response(exc), flags=final)
            return
        sender.send(flags=final)

    def execute(self, requests):
        for request in requests:
            self._answer(request, request.get_response_sender())
        return None  # decoupled: every response went through the senders
