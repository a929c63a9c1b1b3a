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
from typing import Generator, Iterator, Sequence

import numpy as np

from runtime.artifact.manifest import Manifest, load_manifest
from runtime.backends.stage_runners import BACKENDS, VISUAL_STAGES
from runtime.backends.threads import ThreadSettings
from runtime.errors import OptionError
from runtime.families import LLMInputs
from runtime.generation.options import GenerationOptionError, GenerationOptions, PromptTooLongError
from runtime.generation.search import beam_search, greedy_or_sample, run
from runtime.generation.stopping import StopStrings, clip, stable_prefix
from runtime.images import ImageInput, as_image, image_batch
from runtime.loaded_artifact import FromArtifact, LoadedArtifact, OnArtifact
from runtime.stages import IMAGE_EMBEDS, PIXEL_VALUES, QUERY_EMBEDS
from runtime.tokenizer import check_text
from runtime.video.watch import watch_pipeline

__all__ = ["BACKENDS", "VISUAL_STAGES", "Blip2Pipeline", "ImageInput", "Result"]


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


class Blip2Pipeline(OnArtifact):
    """Captions and answers from a generation artifact (BLIP-2 or InstructBLIP). Built on a
    LoadedArtifact (`self.artifact`), whose parts it shows read-only under the same names."""

    embed_table = FromArtifact()
    qformer_tokenizer = FromArtifact()

    def __init__(self, manifest: Manifest | LoadedArtifact, device: str = "cpu", backend: str = "onnxruntime",
                 defaults: GenerationOptions | None = None, io_binding: bool | None = None,
                 threads: ThreadSettings | None = None, precision: str = "f32"):
        """`manifest`: a Manifest (loaded here with device, backend, precision and threads) or a
        LoadedArtifact of a generation artifact, used as it is."""
        self._load(manifest, "generation", device=device, backend=backend, threads=threads, precision=precision)
        self.timed_stages = (*Result.STAGES[:5], *self.family.prefill_stages, *Result.STAGES[5:])
        # On a GPU the KV cache stays on the device between steps (I/O binding).
        decoder = self.runners.get("decoder")  # none on an artifact loaded with its visual stages alone
        self.io_binding = (decoder is not None and decoder.device == "cuda") if io_binding is None else io_binding
        m = self.manifest.data
        self.prompts = m["prompts"]
        gen = self.generation = m["generation"]
        base = defaults or GenerationOptions(max_new_tokens=gen.get("max_new_tokens", 30))
        self.defaults = base.updated(
            stop_strings=base.stop_strings if base.stop_strings is not None else tuple(gen["stop_strings"]),
            eos_token_ids=base.eos_token_ids if base.eos_token_ids is not None else tuple(gen["eos_token_ids"]),
        ).as_defaults()
        self.pad_id = int(gen["pad_token_id"])

    def close(self) -> None:
        """Frees what the runners hold on the device (TensorRT contexts, streams, buffers)."""
        self.artifact.close()

    @classmethod
    def from_artifacts(cls, path: str | os.PathLike, device: str = "cpu", backend: str = "onnxruntime",
                       defaults: GenerationOptions | None = None, verify: bool = True,
                       io_binding: bool | None = None, threads: ThreadSettings | None = None,
                       precision: str = "f32") -> "Blip2Pipeline":
        """Loads an artifact directory; checks its schema version and every file's sha256 first.

        device: "cpu", "cuda" or "auto" (CUDA when available, else the CPU with a warning).
        backend: "onnxruntime", "onnxruntime-trt" (TensorRT execution provider), "tensorrt"
            (engines from `blip2-edge build-engines` for the visual stages) or "openvino" (every
            stage OpenVINO runs, on device "cpu", "gpu" or "npu"; the others on ONNX Runtime's
            CPU: `pipe.artifact.placement` says which and why). Needs the openvino extra.
        precision: OpenVINO's inference precision, "f32" (default), "bf16" (CPUs with AVX-512
            BF16 or AMX) or "f16"; refused in one line where the device lacks it.
        io_binding: keep the KV cache on the device between steps (default: on for CUDA).
        threads: ONNX Runtime's intra-op threads per stage (runtime.backends.onnxrt.ThreadSettings;
            default: spinning only for the decoder, ORT's thread count).
        """
        return cls(load_manifest(Path(path), verify=verify), device=device, backend=backend, defaults=defaults,
                   io_binding=io_binding, threads=threads, precision=precision)

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
                settled = decode(self.tokenizer.settled_ids(rows[0]))
                text = stable_prefix(settled, opts.stop_strings, self.tokenizer.rewrites).lstrip()
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
        return self.prompts["vqa"].format(check_text(question, "question"))

    def caption_prompt(self, prefix: str | None) -> str:
        if prefix is None or prefix == "":
            return self.prompts["caption"]
        return self.prompts["caption_prefix"].format(check_text(prefix, "prompt"))

    # ---- the pipeline -----------------------------------------------------------------------

    def options(self, **generation) -> GenerationOptions:
        """The defaults updated with `generation`, checked against this model: end-of-sequence
        ids must be in its vocabulary (a logit the decoder never produces cannot end a row)."""
        opts = self.defaults.updated(**generation)
        vocab = int(self.model["vocab_size"])
        outside = [i for i in opts.eos_token_ids or () if i >= vocab]
        if outside:
            raise GenerationOptionError("eos_token_ids", f"must be ids below the model's vocabulary size {vocab}, "
                                                         f"got {', '.join(map(str, outside))}")
        return opts

    def encode(self, images: Sequence[ImageInput], timings: dict,
               prompts: Sequence[str] | None = None) -> np.ndarray:
        """Images -> query embeddings (B, Q, D), recording image decode (for paths) /
        preprocess / vision / qformer times. `prompts` (one per image; default: the caption
        prompt) condition the queries of an instruction-aware Q-Former (InstructBLIP)."""
        image_embeds = self._vision(images, timings)
        t2 = time.perf_counter()
        query = self.runners["qformer"].infer(self.qformer_feeds(image_embeds, prompts))[QUERY_EMBEDS]
        timings["qformer"] = time.perf_counter() - t2
        return query

    def encode_for_prompts(self, image: ImageInput, prompts: Sequence[str], timings: dict) -> np.ndarray:
        """One image, N prompts -> query embeddings (N, Q, D) with the vision stage run once:
        BLIP-2's Q-Former reads no text, so it runs once too and its queries serve every prompt;
        an instruction-aware one (InstructBLIP) runs once on the N prompts as a batch."""
        image_embeds = self._vision([image], timings)
        t2 = time.perf_counter()
        if self.qformer_tokenizer is None:
            query = self.runners["qformer"].infer(self.qformer_feeds(image_embeds, list(prompts[:1])))[QUERY_EMBEDS]
            query = np.repeat(query, len(prompts), axis=0)
        else:
            repeated = np.repeat(image_embeds, len(prompts), axis=0)
            query = self.runners["qformer"].infer(self.qformer_feeds(repeated, list(prompts)))[QUERY_EMBEDS]
        timings["qformer"] = time.perf_counter() - t2
        return query

    def _vision(self, images: Sequence[ImageInput], timings: dict) -> np.ndarray:
        """Images -> the vision stage's image embeddings (B, P, Dv), recording image_decode,
        preprocess and vision times."""
        t_decode = time.perf_counter()
        decoded = [as_image(im, i, self.preprocessing, self.max_image_pixels) for i, im in enumerate(images)]
        t0 = time.perf_counter()
        pixels = self.preprocessing.batch(decoded).astype(self.float_dtype)
        t1 = time.perf_counter()
        image_embeds = self.runners["vision"].infer({PIXEL_VALUES: pixels})[IMAGE_EMBEDS]
        timings.update(image_decode=t0 - t_decode, preprocess=t1 - t0, vision=time.perf_counter() - t1)
        return image_embeds

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

    def fit_to_positions(self, opts: GenerationOptions, prompt_length: int) -> GenerationOptions:
        """Families with learned positions (OPT) have a fixed number for queries + prompt + the
        new tokens it reads back; the last new token is never read, so max_new_tokens may reach
        limit - prompt_length + 1 (transformers' OPT raises an IndexError one further). A default
        max_new_tokens shrinks to fit; one the caller set (opts.set_fields) that does not fit is an error."""
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
        if "max_new_tokens" in opts.set_fields:
            raise GenerationOptionError(
                "max_new_tokens", f"must be at most {room} here, got {opts.max_new_tokens}: the model has {limit} "
                f"positions and {queries} query tokens + {prompt_length - queries} prompt tokens use "
                f"{prompt_length} of them (the last new token takes none)")
        return opts.updated(max_new_tokens=room, min_new_tokens=min(opts.min_new_tokens, room))

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """A PromptTooLongError for a prompt the architecture's own text encoder cannot take
        (InstructBLIP's Q-Former), before any stage runs."""
        self.family.check_instructions(prompts, self.qformer_tokenizer, self.model)

    def fit_prompt(self, opts: GenerationOptions, prompt: str) -> GenerationOptions:
        """The options `prompt` gets when it runs alone (fit_to_positions for its own length):
        a server fits each request so that a long prompt in a batch never shortens the others."""
        query = np.zeros((1, self.model["num_query_tokens"], self.embed_table.shape[1]), self.float_dtype)
        return self.fit_to_positions(opts, self.layout(query, [prompt]).embeds.shape[1])

    def generate(self, images: Sequence[ImageInput], prompts: Sequence[str], **generation) -> list[Result]:
        """Runs a batch: one prompt per image. `images` is a list even for one image."""
        return run(self._generate_steps(image_batch(images), prompts, settle=False, **generation))

    def generate_from_queries(self, query: np.ndarray, prompts: Sequence[str], **generation) -> list[Result]:
        """The LLM half alone: query embeddings (B, Q, D) from `encode` (or another process's
        visual stages, as in the Triton ensemble) and one prompt per row -> Results."""
        if len(query) != len(prompts):
            raise OptionError(f"{len(query)} query rows but {len(prompts)} prompts")
        if not len(prompts):
            return []
        for i, prompt in enumerate(prompts):
            check_text(prompt, f"prompt {i}")
        opts = self.options(**generation)
        return run(self._decode_steps(query, prompts, opts, {}, time.perf_counter(), settle=False))

    def generate_for_image(self, image: ImageInput, prompts: Sequence[str], **generation) -> list[Result]:
        """One image and N prompts (a caption prompt, questions in the VQA template) -> N Results,
        with the vision stage run once (encode_for_prompts) and the N prompts decoded as a batch."""
        if not len(prompts):
            return []
        for i, prompt in enumerate(prompts):
            check_text(prompt, f"prompt {i}")
        opts = self.options(**generation)
        self.check_prompts(prompts)
        t_start = time.perf_counter()
        timings: dict = {}
        query = self.encode_for_prompts(image, prompts, timings)
        return run(self._decode_steps(query, list(prompts), opts, timings, t_start, settle=False))

    def watch(self, source, every: float | None = 1.0, question: str | None = None,
              questions: Sequence[str] = (), prompt: str | None = None, **options) -> Iterator:
        """Captions (or answers `question` / each of `questions` about) frames of a video file,
        a stream URL or a camera as they come: a generator of runtime.video.WatchEvent (timestamp,
        frame index, text, latency, lag) that stops the decoder when it is closed. `every`: seconds
        between sampled frames; `options`: runtime.video.watch_pipeline's (scene=True samples at
        scene changes, skip_duplicates, generation options...). Needs the video extra."""
        qs = ([question] if question is not None else []) + list(questions)
        prompts = [self.vqa_prompt(q) for q in qs] or [self.caption_prompt(prompt)]
        return watch_pipeline(self, source, prompts, questions=qs or None, every=every, **options)

    def _generate_each(self, images: Sequence[ImageInput], prompt: str, **generation) -> list[Result]:
        """generate() with the same prompt for every image (caption, ask)."""
        images = image_batch(images)  # before len(): a path string has one
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
        for i, prompt in enumerate(prompts):
            check_text(prompt, f"prompt {i}")
        opts = opts if opts is not None else self.options(**generation)
        self.check_prompts(prompts)  # before any stage runs
        t_start = time.perf_counter()
        timings: dict = {}
        query = self.encode(images, timings, prompts)
        return (yield from self._decode_steps(query, prompts, opts, timings, t_start, settle))

    def _decode_steps(self, query: np.ndarray, prompts: Sequence[str], opts: GenerationOptions, timings: dict,
                      t_start: float, settle: bool) -> Generator[list[Sequence[int]] | None, None, list[Result]]:
        """Query embeddings and prompts -> Results, one decoder step per next() (see _generate_steps)."""
        t0 = time.perf_counter()
        inputs = self.layout(query, prompts)
        embeds, mask, history = inputs.embeds, inputs.mask, inputs.history
        opts = self.fit_to_positions(opts, embeds.shape[1])
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
