"""One inference request -> a checked job for the pipeline, or a client error; a dynamic batch
of jobs -> one result (or error) per job, each what that request would get alone.

Free of Triton: requests come in as {input name: numpy array or None}, so the rules are tested
without a server (tests/runtime/test_serving_jobs.py) and the Python-backend model only converts.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image

from runtime.errors import Blip2EdgeError
from runtime.generation.options import GenerationOptions

log = logging.getLogger(__name__)

# Generation options a request may set, as KServe v2 request parameters (JSON scalars), not as
# input tensors: Triton's dynamic batcher only batches requests with the same set of inputs, so
# options as optional inputs would split the batch whenever two requests set different ones.
# The names and meanings are GenerationOptions' (transformers'); so are the checks.
OPTION_PARAMETERS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
                     "do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "stop_strings")
# stop_strings travels as a string holding a JSON list (KServe v2 parameters are scalars: Triton
# refuses a list); each string is matched against the text at every step, so both are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 64
# A request's prompt is refused above this many UTF-8 bytes, before it is tokenized; the model's
# position limit (OPT) is checked after, per request.
MAX_PROMPT_BYTES = 4096
# Encoded image bytes above this are refused before Pillow sees them (the pixel limit then
# refuses small files that decode to huge images).
MAX_IMAGE_BYTES = 32 << 20
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}
# What one request may ask of the shared process: beams multiply the rows (and the KV cache) of
# every step, and T5 has no position limit to bound max_new_tokens.
SERVER_CAPS = {"num_beams": 8, "max_new_tokens": 512, "min_new_tokens": 512}


class RequestError(Blip2EdgeError):
    """A request is malformed (an input missing, of the wrong shape, or not text): a client error."""


@dataclass(frozen=True)
class Job:
    """One request, checked: its image shrunk to the model's size, the prompt text, and the
    generation options it gets alone (a default max_new_tokens already fitted to its prompt)."""

    image: Image.Image
    prompt: str
    options: GenerationOptions
    kwargs: dict  # the options as the request gave them (what Blip2Pipeline.generate takes)


def _one(inputs: dict, name: str):
    """The single value of input `name` (shape [1] or [1, 1]), or None when it is absent."""
    array = inputs.get(name)
    if array is None:
        return None
    array = np.asarray(array)
    if array.size != 1:
        raise RequestError(f"input '{name}': one value per request expected (shape [1, 1]), got shape "
                           f"{list(array.shape)}; send one image per request, Triton batches requests itself")
    return array.reshape(-1)[0]


def text_input(inputs: dict, name: str) -> str | None:
    value = _one(inputs, name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, (bytes, np.bytes_)):
        raise RequestError(f"input '{name}': BYTES (UTF-8 text) expected, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_BYTES:
        raise RequestError(f"input '{name}': {len(value)} bytes is over the limit of {MAX_PROMPT_BYTES}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"input '{name}': not valid UTF-8 text") from None


def options_from(parameters: dict) -> dict:
    """The generation options among a request's parameters; any other name is refused, so a
    misspelt option is not silently ignored. early_stopping may be a bool or "never" / "true" /
    "false"; the other values reach GenerationOptions as sent (it checks them)."""
    parameters = {k: v for k, v in parameters.items() if not k.startswith("triton_")}  # Triton's own
    unknown = sorted(k for k in parameters if k not in OPTION_PARAMETERS)
    if unknown:
        raise RequestError(f"unknown request parameter(s) {', '.join(unknown)}; generation options: "
                           f"{', '.join(OPTION_PARAMETERS)}")
    kwargs = dict(parameters)
    if "stop_strings" in kwargs:
        kwargs["stop_strings"] = stop_strings(kwargs["stop_strings"])
    stop = kwargs.get("early_stopping")
    if isinstance(stop, str):
        if stop.strip().lower() not in EARLY_STOPPING:
            raise RequestError(f"parameter early_stopping must be true, false or never; got {stop!r}")
        kwargs["early_stopping"] = EARLY_STOPPING[stop.strip().lower()]
    return kwargs


def stop_strings(value) -> tuple[str, ...]:
    """The stop_strings parameter: a JSON list of non-empty strings, sent as a string (a list
    itself where the caller is not Triton); [] means none (not even the model's own)."""
    example = """'["Question:", "."]'"""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"parameter stop_strings must be a JSON list of non-empty strings, sent as a string "
                           f"(e.g. {example}); got {shown}")
    if len(value) > MAX_STOP_STRINGS:
        raise RequestError(f"parameter stop_strings: {len(value)} strings is over the limit of {MAX_STOP_STRINGS}")
    for s in value:
        if len(s) > MAX_STOP_STRING_CHARS:
            raise RequestError(f"parameter stop_strings: a string of {len(s)} characters is over the limit of "
                               f"{MAX_STOP_STRING_CHARS}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("parameter stop_strings: not valid text (a lone surrogate escape)") from None
    return tuple(value)


def image_bytes(inputs: dict) -> bytes:
    value = _one(inputs, "image")
    if value is None:
        raise RequestError("input 'image' is missing: send the encoded image file (BYTES, shape [1, 1])")
    if not isinstance(value, (bytes, np.bytes_)):
        raise RequestError(f"input 'image': BYTES (an encoded image file) expected, got {type(value).__name__}")
    if len(value) > MAX_IMAGE_BYTES:
        raise RequestError(f"input 'image': {len(value)} bytes is over the limit of {MAX_IMAGE_BYTES}")
    return bytes(value)


def parse(pipe, inputs: dict, parameters: dict | None = None) -> Job:
    """Checks one request (its input tensors and its parameters) against `pipe`, a
    Blip2Pipeline. Raises a Blip2EdgeError (ImageError, OptionError, RequestError), whose message
    goes back to the client, for anything wrong. The prompt is the LLM's text as `generate`
    takes it; empty or absent: the manifest's caption prompt."""
    kwargs = options_from(parameters or {})
    options = capped_options(pipe, kwargs)
    text = text_input(inputs, "prompt") or pipe.caption_prompt(None)
    # Each request's own limits, so that one over-long request cannot fail the batch it joins.
    pipe.check_prompts([text])
    options = pipe.fit_prompt(options, text)
    with warnings.catch_warnings():
        # The pixel limit is the check here; Pillow's own warning above 89 Mpx would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = pipe.preprocessing.load(image_bytes(inputs), pipe.max_image_pixels, name="image")
    return Job(image=image, prompt=text, options=options, kwargs=kwargs)


def capped_options(pipe, kwargs: dict) -> GenerationOptions:
    """The request's generation options, checked (GenerationOptionError names the option) and
    within SERVER_CAPS: a value the request sent over a cap is refused, a manifest default over it
    is lowered to it (the client never named it)."""
    options = pipe.options(**kwargs)
    for name, cap in SERVER_CAPS.items():
        if getattr(options, name) <= cap:
            continue
        if name in kwargs:
            raise RequestError(f"parameter {name}={getattr(options, name)} is over this server's limit of {cap}")
        options = replace(options, **{name: cap})
    return options


def group_key(index: int, job: Job):
    """Jobs with equal keys run as one batch. Sampling runs alone: its random draws depend on
    the rows beside it, so a sampled answer would change with the traffic around it."""
    return (job.options, index if job.options.do_sample else None)


def run_batch(pipe, jobs: Sequence[Job | BaseException], generate=None) -> list:
    """Runs the checked jobs of one dynamic batch, grouped by options (one pipeline batch per
    group, mixed prompts within it). Returns, per position, a runtime Result or the exception
    for that job: an error in one group fails that group only, never the others. `generate`
    (default: pipe.generate) takes the jobs' images and prompts and the options."""
    generate = generate or pipe.generate
    out: list = list(jobs)
    groups: dict = {}
    for i, job in enumerate(jobs):
        if isinstance(job, Job):
            groups.setdefault(group_key(i, job), []).append(i)
    for (options, _), members in groups.items():
        try:
            # Fitted per request already (Blip2Pipeline.fit_prompt): pass them as explicit options.
            results = generate([jobs[i].image for i in members], [jobs[i].prompt for i in members],
                               **options.as_kwargs())
        except Exception as exc:  # noqa: BLE001 - reported to these requests, never the server's end
            log.exception("batch of %d failed", len(members))
            results = [exc] * len(members)
        for i, result in zip(members, results):
            out[i] = result
    return out
