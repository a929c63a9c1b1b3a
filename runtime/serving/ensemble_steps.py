"""The Python steps of the GPU ensemble (`triton-repo --ensemble`, written by
runtime.serving.ensemble): what Triton's Python backend runs for the `preprocess` and `llm`
roles, between Triton's own ONNX Runtime models of the visual stages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.artifact.manifest import load_manifest
from runtime.errors import Blip2EdgeError
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocessing, load_image
from runtime.serving.jobs import Job, capped_options, image_bytes, options_from, run_batch, text_input
from runtime.serving.pipeline_model import Blip2Model, load_pipeline, parameters


class PreprocessModel(Blip2Model):
    """image BYTES -> pixel values, with the runtime's checks (size and pixel limits)."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        params = parameters(json.loads(args["model_config"]))
        manifest = load_manifest(Path(args["model_repository"]) / params["artifacts"], verify=False)
        self.preprocessing = Preprocessing.from_manifest(manifest.data["preprocessing"])
        self.dtype = manifest.input_dtype("vision")
        self.output = manifest.stages["vision"]["inputs"][0]["name"]
        self.max_pixels = int(params.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)

    def execute(self, requests) -> list:
        responses = []
        for request in requests:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = load_image(image_bytes(self._inputs(request)), self.max_pixels, name="image")
                pixels = self.preprocessing(image)[None].astype(self.dtype)  # (1, 3, H, W)
                responses.append(self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(self.output, pixels)]))
            except Blip2EdgeError as exc:
                responses.append(self._response(exc))
        return responses


class LLMModel(Blip2Model):
    """query embeddings + prompt -> text and tokens: the pipeline after its Q-Former, with the
    same per-request checks and option grouping as the whole-pipeline model."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config.get("name", "blip2_llm")
        self.pipe = load_pipeline(parameters(config), args["model_repository"])

    def _generate(self, queries, prompts, **options):
        """A job's "image" here is its query embeddings (Q, D): the pipeline's LLM half alone."""
        return self.pipe.generate_from_queries(np.stack([np.asarray(q) for q in queries]), prompts, **options)

    def _job(self, request) -> Job:
        tensor = self.pb.get_input_tensor_by_name(request, "query_embeds")
        query = tensor.as_numpy()[0].astype(self.pipe.float_dtype)
        kwargs = options_from(self._parameters(request))
        text = text_input({"prompt": self.pb.get_input_tensor_by_name(request, "prompt").as_numpy()}, "prompt") \
            or self.pipe.caption_prompt(None)
        options = self.pipe.fit_prompt(capped_options(self.pipe, kwargs), text)
        return Job(image=query, prompt=text, options=options, kwargs=kwargs)

    def execute(self, requests) -> list:
        jobs = []
        for request in requests:
            try:
                jobs.append(self._job(request))
            except Exception as exc:  # noqa: BLE001 - answered, never raised
                jobs.append(exc)
        return [self._response(r) for r in run_batch(self.pipe, jobs, self._generate)]


ROLES = {"preprocess": PreprocessModel, "llm": LLMModel}
