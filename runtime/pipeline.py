"""Blip2Pipeline: images and prompts in, text out, from an artifact directory, without PyTorch.

    pipe = Blip2Pipeline.from_artifacts("out/toy")
    pipe.caption(["cat.jpg"])[0].text
    pipe.ask(["cat.jpg"], "what colour is it?")[0].text
    for piece in pipe.stream("cat.jpg"): print(piece, end="")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Iterator, Sequence, Union

import numpy as np
from PIL import Image

from runtime.artifact.checks import check_runner_io, load_embeddings
from runtime.backends.onnxrt import ThreadSettings, gpu_providers, providers_for, required_provider, stage_runner
from runtime.errors import ArtifactError, ImageError, OptionError
from runtime.families import LLMInputs, family_for
from runtime.artifact.manifest import Manifest, load_manifest
from runtime.generation.options import GenerationOptionError, GenerationOptions, PromptTooLongError
from runtime.preprocess import (DEFAULT_MAX_IMAGE_PIXELS, Preprocessing, image_from_array, load_image,
                                warn_if_wide)
from runtime.generation.search import beam_search, greedy_or_sample, run
from runtime.stages import IMAGE_EMBEDS, PIXEL_VALUES, QUERY_EMBEDS
from runtime.generation.stopping import StopStrings, clip, stable_prefix
from runtime.tokenizer import TextTokenizer

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # arrays: (H, W, 3) or (H, W) uint8
# onnxruntime: ORT on the CPU or CUDA (by `device`); onnxruntime-trt: ORT with its TensorRT
# execution provider; tensorrt: native engines from `blip2-edge build-engines` for the visual
# stages, the decoder on ORT CUDA.
BACKENDS = ("onnxruntime", "onnxruntime-trt", "tensorrt")
VISUAL_STAGES = ("vision", "qformer")


@dataclass
class Result:
    """One image's answer: the text, the generated token ids, and the batch's stage timings
    in seconds: image_decode, preprocess, vision, qformer, prompt (tokenize + embed), the family's
    prefill stages (Flan-T5: encoder), prefill, decode (the search after prefill), detokenize,
    total; `decode_steps` lists each decoder run. `Blip2Pipeline.timed_stages` lists the stages
    of one pipeline in order; STAGES here are those every family has."""

    STAGES = ("image_decode", "preprocess", "vision", "qformer", "prompt", "prefill", "decode", "detokenize")

    text: str
    tokens: list[int]
    timings: dict = field(default_factory=dict)


def _image_batch(images) -> Sequence[ImageInput]:
    """The `images` argument of caption/ask/generate must be a sequence of images: a single
    image (a path string, a PIL image, an array) is refused rather than iterated over."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        raise ImageError(f"images must be a list of images, got a single {type(images).__name__}; "
                         "pass [image] for one image")
    return images


def _as_image(item: ImageInput, index: int, preprocessing: Preprocessing,
              max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One input -> a PIL image, or an ImageError naming it. A file is resized to the model's
    input size as soon as it is decoded, so a batch holds small images, never full-size ones
    (preprocessing the small image gives the same pixel values)."""
    name = f"image {index}"
    if isinstance(item, Image.Image):
        if item.width == 0 or item.height == 0:
            raise ImageError(f"{name}: empty {item.width}x{item.height} image")
        warn_if_wide(item, name)
        return item
    if isinstance(item, np.ndarray):
        image = image_from_array(item, name)
        warn_if_wide(image, name)
        return image
    if isinstance(item, (str, os.PathLike)):
        return preprocessing.resize(load_image(item, max_pixels))
    raise ImageError(f"{name}: a {type(item).__name__}; expected a file path, a PIL image or a uint8 numpy array")


class Blip2Pipeline:
    # Image files over this many pixels are refused from their header, before decoding.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(self, manifest: Manifest, device: str = "cpu", backend: str = "onnxruntime",
                 defaults: GenerationOptions | None = None, io_binding: bool | None = None,
                 threads: ThreadSettings | None = None):
        if backend not in BACKENDS:
            raise OptionError(f"unknown backend '{backend}'; valid: {', '.join(BACKENDS)}")
        self.manifest = manifest
        manifest.ensure_verified()  # validated, confined, listed and hashed before anything is allocated
        m = manifest.data
        self.model = m["model"]
        self.family = family_for(m)
        if self.family.task != "generation":
            raise ArtifactError(f"{manifest.where}: a {m['architecture']} artifact has no language model to caption "
                                "or answer with; use Blip2Retriever or `blip2-edge match`")
        self.stage_names = self.family.stage_names(self.model)
        self.timed_stages = (*Result.STAGES[:5], *self.family.prefill_stages, *Result.STAGES[5:])
        self.threads = threads or ThreadSettings()
        unknown = sorted({stage for stage, _ in self.threads.stage_spin} - set(self.stage_names))
        if unknown:  # a misspelt stage would otherwise be ignored silently
            raise OptionError(f"stage_spin names no stage of this model: {', '.join(unknown)}; "
                              f"stages: {', '.join(self.stage_names)}")
        self.float_dtype = np.dtype(m["stages"]["decoder"]["inputs"][0]["dtype"])
        self.family.check_placement(manifest.where, self.model, self.float_dtype, device, backend)
        self.runners = self._runners(manifest, device, backend, self.stage_names, self.threads)
        for stage, runner in self.runners.items():
            check_runner_io(manifest, stage, runner)
        # On a GPU the KV cache stays on the device between steps (I/O binding).
        self.io_binding = self.runners["decoder"].device == "cuda" if io_binding is None else io_binding
        self.embed_table = load_embeddings(manifest)  # dtype and shape checked against the manifest
        self.preprocessing = Preprocessing.from_manifest(m["preprocessing"])
        self.tokenizer = TextTokenizer(manifest.path(m["tokenizer"]["file"], "tokenizer.file"), m["tokenizer"])
        # InstructBLIP's Q-Former reads the prompt too, in its own (BERT) vocabulary.
        q = m.get("qformer_tokenizer")
        self.qformer_tokenizer = TextTokenizer(manifest.path(q["file"], "qformer_tokenizer.file"), q) if q else None
        manifest.recheck()  # files loaded by path (graphs, tokenizer) are still the ones hashed
        self.prompts = m["prompts"]
        gen = self.generation = m["generation"]
        base = defaults or GenerationOptions(max_new_tokens=gen.get("max_new_tokens", 30))
        self.defaults = base.updated(
            stop_strings=base.stop_strings if base.stop_strings is not None else tuple(gen["stop_strings"]),
            eos_token_ids=base.eos_token_ids if base.eos_token_ids is not None else tuple(gen["eos_token_ids"]),
        )
        self.pad_id = int(gen["pad_token_id"])

    @staticmethod
    def _runners(manifest: Manifest, device: str, backend: str, stage_names: tuple[str, ...],
                 threads: ThreadSettings) -> dict:
        if backend == "onnxruntime":
            providers = providers_for(device)
            # --device cuda must really run on CUDA (a missing cuDNN makes ONNX Runtime fall back).
            return {s: stage_runner(manifest.stage_file(s), providers, s, threads, required_provider(device))
                    for s in stage_names}
        from runtime.backends.tensorrt.engines import require_tensorrt_readable

        require_tensorrt_readable(manifest, VISUAL_STAGES)
        if backend == "onnxruntime-trt":
            int8 = any((manifest.stages[s].get("quantization") or {}).get("format") == "QDQ" for s in stage_names)
            fp16 = manifest.stages["decoder"]["precision"] == "fp16"
            from runtime.backends.tensorrt.profiles import pipeline_ranges

            # One provider list per stage: each has its own explicit TensorRT profile shapes.
            model = manifest.data["model"]
            ranges = pipeline_ranges(model, family_for(manifest.data).position_limit(model))
            return {s: stage_runner(manifest.stage_file(s),
                                    gpu_providers(manifest.root, manifest.stages[s], fp16, int8, ranges),
                                    s, threads, required_provider(device, backend)) for s in stage_names}
        from runtime.backends.tensorrt.engines import find_engine
        from runtime.backends.tensorrt.runner import TrtRunner, device_info

        gpu = device_info()  # names the 'tensorrt' extra when it is missing
        runners = {s: TrtRunner(find_engine(manifest, s, gpu), manifest.stages[s]) for s in VISUAL_STAGES}
        # The LLM stages run on ONNX Runtime CUDA (KV cache on the device with I/O binding).
        runners.update({s: stage_runner(manifest.stage_file(s), providers_for("cuda"), s, threads,
                                        required_provider("cuda", backend))
                        for s in stage_names if s not in VISUAL_STAGES})
        return runners

    def close(self) -> None:
        """Frees what the runners hold on the device (TensorRT contexts, streams, buffers)."""
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()

    @classmethod
    def from_artifacts(cls, path: str | os.PathLike, device: str = "cpu", backend: str = "onnxruntime",
                       defaults: GenerationOptions | None = None, verify: bool = True,
                       io_binding: bool | None = None, threads: ThreadSettings | None = None) -> "Blip2Pipeline":
        """Loads an artifact directory; checks its schema version and every file's sha256 first.

        device: "cpu", "cuda" or "auto" (CUDA when available, else the CPU with a warning).
        backend: "onnxruntime", "onnxruntime-trt" (TensorRT execution provider) or "tensorrt"
            (engines from `blip2-edge build-engines` for the visual stages).
        io_binding: keep the KV cache on the device between steps (default: on for CUDA).
        threads: ONNX Runtime's intra-op threads per stage (runtime.backends.onnxrt.ThreadSettings;
            default: spinning only for the decoder, ORT's thread count).
        """
        return cls(load_manifest(Path(path), verify=verify), device=device, backend=backend, defaults=defaults,
                   io_binding=io_binding, threads=threads)

    # ---- public API -------------------------------------------------------------------------

    def caption(self, images: Sequence[ImageInput], prompt: str | None = None, **generation) -> list[Result]:
        """Captions each image; `prompt` is an optional caption prefix (e.g. "a photo of").
        `images` is a list even for one image: a single image is refused (ImageError)."""
        return self._generate_each(images, self.caption_prompt(prompt), **generation)

    def ask(self, images: Sequence[ImageInput], question: str, **generation) -> list[Result]:
        """Answers `question` about each image with the manifest's VQA template."""
        return self._generate_each(images, self.vqa_prompt(question), **generation)

    def stream(self, image: ImageInput, prompt: str | None = None, question: str | None = None,
               **generation) -> Iterator[str]:
        """Yields pieces of one image's text as tokens are produced: a caption (with optional
        prefix `prompt`), or the answer to `question`. The pieces joined are `Result.text`.

        The caller drives the work: each `next()` runs decoder steps in the caller's thread
        until there is new text, so a generator that is closed, dropped or interrupted
        (KeyboardInterrupt) stops generating; nothing runs in the background.

        Only text that cannot change is shown: a tail that could be the start of a stop string,
        an incomplete UTF-8 character or a pending tokenizer clean-up is held back until the
        next tokens settle it. With beams, the text shown is what every hypothesis that can
        still win has in common (running beams and finished ones), so it may lag behind the
        best beam and arrive in one piece when the beams agree late.
        """
        text_prompt = self.vqa_prompt(question) if question is not None else self.caption_prompt(prompt)
        opts = self.options(**generation)
        steps = self._generate_steps([image], [text_prompt], opts=opts, **generation)
        # Decodes only the ids after the part whose text is known (the settled ids only grow; see
        # GrowingText). stable_prefix and the comparisons below still scan the text, but as
        # string operations in C, not as Python work per token.
        decode = self.tokenizer.growing_text()
        emitted = ""
        try:
            while True:
                try:
                    rows = next(steps)
                except StopIteration as end:
                    final = end.value[0].text
                    break
                text = stable_prefix(decode(self.tokenizer.settled_ids(rows[0])), opts.stop_strings, self.tokenizer.rewrites).lstrip()
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):]
                    emitted = text
        finally:
            steps.close()
        if not final.startswith(emitted):  # would be a bug in the hold-back rules: say so
            raise RuntimeError(f"streamed {emitted!r} but the final text is {final!r}")
        if len(final) > len(emitted):
            yield final[len(emitted):]

    def vqa_prompt(self, question: str) -> str:
        return self.prompts["vqa"].format(question)

    def caption_prompt(self, prefix: str | None) -> str:
        return self.prompts["caption"] if not prefix else self.prompts["caption_prefix"].format(prefix)

    # ---- the pipeline -----------------------------------------------------------------------

    def options(self, **generation) -> GenerationOptions:
        return self.defaults.updated(**generation)

    def encode_images(self, images: Sequence[ImageInput], timings: dict,
                      prompts: Sequence[str] | None = None) -> np.ndarray:
        """Images -> query embeddings (B, Q, D), recording image decode (for paths) /
        preprocess / vision / qformer times. `prompts` (one per image; default: the caption
        prompt) condition the queries of an instruction-aware Q-Former (InstructBLIP)."""
        t_decode = time.perf_counter()
        decoded = [_as_image(im, i, self.preprocessing, self.max_image_pixels) for i, im in enumerate(images)]
        t0 = time.perf_counter()
        pixels = self.preprocessing.batch(decoded).astype(self.float_dtype)
        t1 = time.perf_counter()
        timings["image_decode"] = t0 - t_decode
        image_embeds = self.runners["vision"].infer({PIXEL_VALUES: pixels})[IMAGE_EMBEDS]
        t2 = time.perf_counter()
        query = self.runners["qformer"].infer(self.qformer_feeds(image_embeds, prompts))[QUERY_EMBEDS]
        t3 = time.perf_counter()
        timings.update(preprocess=t1 - t0, vision=t2 - t1, qformer=t3 - t2)
        return query

    def qformer_feeds(self, image_embeds: np.ndarray, prompts: Sequence[str] | None = None) -> dict:
        """The qformer stage's inputs: the image embeddings, and for an instruction-aware Q-Former
        the prompts (default: the caption prompt) in its own tokens, padded as its tokenizer pads."""
        prompts = [self.caption_prompt(None)] * len(image_embeds) if prompts is None else prompts
        return self.family.qformer_feeds(image_embeds, prompts, self.qformer_tokenizer, self.model)

    def layout(self, query: np.ndarray, prompts: Sequence[str]) -> LLMInputs:
        """The LLM's inputs from query embeddings and prompts, laid out by the family as
        Blip2Processor and generate do, with the ids transformers' logits processors see."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self.family.layout(query, ids, self.embed_table, self.model, self.generation, self.float_dtype)

    def new_decoder(self, io_binding: bool | None = None):
        """A fresh step decoder (runtime.generation.search.StepDecoder with `prefill(embeds, mask)`) for one
        batch, from the family."""
        return self.family.new_decoder(self.runners, self.embed_table, self.model, self.generation, self.float_dtype,
                                       io_binding=self.io_binding if io_binding is None else io_binding)

    def fit_to_positions(self, opts: GenerationOptions, prompt_length: int, explicit: bool) -> GenerationOptions:
        """Families with learned positions (OPT) have a fixed number for queries + prompt + the
        new tokens it reads back; the last new token is never read, so max_new_tokens may reach
        limit - prompt_length + 1 (transformers' OPT raises an IndexError one further). A default
        max_new_tokens shrinks to fit; an explicit one that does not fit is an error."""
        limit = self.family.position_limit(self.model)
        if limit is None:
            return opts
        queries = self.model["num_query_tokens"]
        room = limit - prompt_length + 1
        if room < 1:
            raise PromptTooLongError(
                f"prompt too long: {queries} query tokens + {prompt_length - queries} prompt tokens "
                f"exceed the model's {limit} positions")
        if opts.max_new_tokens <= room:
            return opts
        if explicit:
            raise GenerationOptionError(
                "max_new_tokens", f"must be at most {room} here, got {opts.max_new_tokens}: the model has {limit} "
                f"positions and {queries} query tokens + {prompt_length - queries} prompt tokens use "
                f"{prompt_length} of them (the last new token takes none)")
        return opts.updated(max_new_tokens=room, min_new_tokens=min(opts.min_new_tokens, room))

    def generate(self, images: Sequence[ImageInput], prompts: Sequence[str], **generation) -> list[Result]:
        """Runs a batch: one prompt per image. `images` is a list even for one image."""
        return run(self._generate_steps(_image_batch(images), prompts, settle=False, **generation))

    def _generate_each(self, images: Sequence[ImageInput], prompt: str, **generation) -> list[Result]:
        """generate() with the same prompt for every image (caption, ask)."""
        images = _image_batch(images)  # before len(): a path string has one
        return self.generate(images, [prompt] * len(images), **generation)

    def _generate_steps(self, images: Sequence[ImageInput], prompts: Sequence[str], *, settle: bool = True,
                        opts: GenerationOptions | None = None,
                        **generation) -> Generator[list[Sequence[int]] | None, None, list[Result]]:
        """generate() one decoder step per next(): yields each row's settled token ids (see
        runtime.generation.search; None without `settle`), returns the Results. `opts`: the options
        `generation` gives, when the caller has them already."""
        if len(images) != len(prompts):
            raise OptionError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        opts = opts if opts is not None else self.options(**generation)
        self.family.check_instructions(prompts, self.qformer_tokenizer, self.model)  # before any stage runs
        t_start = time.perf_counter()
        timings: dict = {}
        query = self.encode_images(images, timings, prompts)
        t0 = time.perf_counter()
        inputs = self.layout(query, prompts)
        embeds, mask, history = inputs.embeds, inputs.mask, inputs.history
        opts = self.fit_to_positions(opts, embeds.shape[1], explicit=generation.get("max_new_tokens") is not None)
        timings["prompt"] = time.perf_counter() - t0

        decoder = self.new_decoder()
        t0 = time.perf_counter()
        first = decoder.prefill(embeds, mask)
        timings.update(decoder.prefill_times)  # stages the family runs before the decoder (T5: encoder)
        timings["prefill"] = time.perf_counter() - t0 - sum(decoder.prefill_times.values())
        t0 = time.perf_counter()
        search = beam_search if opts.num_beams > 1 else greedy_or_sample
        stops = StopStrings(opts.stop_strings or (), self.tokenizer.token_text)
        # The consumer's time between steps (a stream's printing) is not the pipeline's: leave
        # it out of decode.
        paused = 0.0
        steps = search(first, decoder, history, opts, tuple(opts.eos_token_ids), self.pad_id, stops, settle=settle)
        while True:
            try:
                settled = next(steps)
            except StopIteration as end:
                rows = end.value
                break
            t_yield = time.perf_counter()
            yield settled
            paused += time.perf_counter() - t_yield
        # decode: the whole search after prefill (token choice included); decode_steps: each
        # decoder run alone.
        timings["decode"] = time.perf_counter() - t0 - paused
        timings["decode_steps"] = decoder.step_times
        t0 = time.perf_counter()
        texts = [clip(self.tokenizer.decode(r), opts.stop_strings).strip() for r in rows]
        timings["detokenize"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start - paused
        return [Result(text=t, tokens=r, timings=timings) for t, r in zip(texts, rows)]
