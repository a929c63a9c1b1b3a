"""Blip2Retriever: image and text embeddings (ITC) and match scores (ITM) from a retrieval
artifact directory, without PyTorch.

    r = Blip2Retriever.from_artifacts("out/itm")
    r.embed_images(images)    # (N, Q, D) float32, L2-normalised: transformers' ITC image_embeds
    r.embed_texts(texts)      # (M, D) float32, L2-normalised: transformers' ITC text_embeds
    r.itc(images, texts)      # (N, M): transformers' logits_per_image, use_image_text_matching_head=False
    r.itm(images, texts)      # (N, M): P(image i matches text j), softmax of the ITM head, index 1

transformers' ITC score is the plain cosine of the best-matching query token: max over the
queries of image_embeds @ text_embeds.T, with no temperature (Blip2ForImageTextRetrieval has
none; LAVIS divides by its learned temp only inside the training loss). ITM pairs image i with
text j, so itm() runs N x M pairs through the ITM stage; it reuses each image's vision
features (vision_embeds) for all its texts, and an index that re-ranks can pass them back in
(itm_from_vision).

One object serves any number of threads: ONNX Runtime sessions and the tokenizer are
thread-safe and nothing here changes after construction.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.artifact.manifest import MAX_MANIFEST_BYTES, Manifest, load_manifest
from runtime.artifact.verified_files import read_bounded
from runtime.backends.threads import ThreadSettings
from runtime.errors import ArtifactError, OptionError
from runtime.families.base import pad_prompts  # BERT pads right; masked ids are never read
from runtime.images import ImageInput, as_image, image_batch
from runtime.loaded_artifact import LoadedArtifact, OnArtifact
from runtime.stages import ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, ITC_IMAGE_EMBEDS, ITC_TEXT_EMBEDS, ITM_LOGITS, PIXEL_VALUES
from runtime.tokenizer import check_text

DEFAULT_BATCH = 16


def _text_batch(texts) -> list[str]:
    """A list of strings; a single string is refused rather than iterated over."""
    if isinstance(texts, (str, bytes)):
        raise OptionError("texts must be a list of strings, got a single string; pass [text] for one text")
    return [check_text(t, f"text {i}") for i, t in enumerate(texts)]


def similarity(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """ITC scores (N, M) from image embeddings (N, Q, D) and text embeddings (M, D): the cosine
    of the best query token, as transformers' logits_per_image."""
    scores = np.einsum("nqd,md->nqm", image_embeds.astype(np.float32), text_embeds.astype(np.float32))
    return scores.max(axis=1) if scores.shape[1] else np.zeros((scores.shape[0], scores.shape[2]), np.float32)


def match_probability(logits: np.ndarray) -> np.ndarray:
    """softmax(logits)[..., 1] of 2-way ITM logits, computed as a logistic of their difference."""
    d = logits[..., 1].astype(np.float64) - logits[..., 0].astype(np.float64)
    return (1.0 / (1.0 + np.exp(-d))).astype(np.float32)


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of manifest.json as it is on disk (what quantize records as source_manifest_sha256);
    for a manifest held only in memory, of the bytes write_manifest would write."""
    written = (json.dumps(manifest.data, indent=2) + "\n").encode()
    try:
        raw = read_bounded(manifest.where, MAX_MANIFEST_BYTES)
        if json.loads(raw) == manifest.data:
            return hashlib.sha256(raw).hexdigest()
    except (ArtifactError, ValueError):
        pass
    return hashlib.sha256(written).hexdigest()


class Blip2Retriever(OnArtifact):
    """Embeddings and match scores from a retrieval artifact. Built on a LoadedArtifact
    (`self.artifact`), whose parts it shows read-only under the same names."""

    def __init__(self, manifest: Manifest | LoadedArtifact, device: str = "cpu", threads: ThreadSettings | None = None,
                 batch_size: int = DEFAULT_BATCH, backend: str = "onnxruntime", precision: str = "f32"):
        """`manifest`: a Manifest (loaded here with device, backend, precision and threads) or a
        LoadedArtifact of a retrieval artifact, used as it is. backend: "onnxruntime" or
        "openvino" (with its precision: f32, bf16, f16)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
        # A device asked for must be the one each session got (a CUDA provider that fails to load
        # would otherwise fall back to the CPU without a word), as in the pipeline.
        self._load(manifest, "retrieval", device=device, backend=backend, threads=threads, precision=precision)
        self.batch_size = batch_size
        self._sha256 = manifest_sha256(self.manifest)

    @classmethod
    def from_artifacts(cls, path: str | os.PathLike, device: str = "cpu", verify: bool = True,
                       threads: ThreadSettings | None = None, batch_size: int = DEFAULT_BATCH,
                       backend: str = "onnxruntime", precision: str = "f32") -> "Blip2Retriever":
        """Loads a retrieval artifact directory; checks its schema and every file's sha256 first.
        batch_size: images (or image-text pairs for ITM) per stage run. backend, precision: as
        Blip2Pipeline.from_artifacts."""
        return cls(load_manifest(Path(path), verify=verify), device=device, threads=threads, batch_size=batch_size,
                   backend=backend, precision=precision)

    # ---- properties the index keeps -----------------------------------------------------------

    @property
    def artifact_sha256(self) -> str:
        """sha256 of the manifest: which model (and precision) produced a set of vectors."""
        return self._sha256

    @property
    def num_query_tokens(self) -> int:
        return int(self.model["num_query_tokens"])

    @property
    def embed_dim(self) -> int:
        return int(self.model["embed_dim"])

    # ---- images -----------------------------------------------------------------------------------

    def vision_embeds(self, images: Sequence[ImageInput]) -> np.ndarray:
        """The vision stage's features (N, P, Dv), which the ITM stage reads."""
        images = image_batch(images)
        p, dv = self.model["num_patches"], self.model["vision_hidden"]
        out = [np.zeros((0, p, dv), self.float_dtype)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            decoded = [as_image(im, start + i, self.preprocessing, self.max_image_pixels) for i, im in enumerate(chunk)]
            pixels = self.preprocessing.batch(decoded).astype(self.float_dtype)
            out.append(self.runners["vision"].infer({PIXEL_VALUES: pixels})[IMAGE_EMBEDS])
        return np.concatenate(out)

    def embed_images_from_vision(self, vision: np.ndarray) -> np.ndarray:
        """ITC image embeddings (N, Q, D) float32 from vision features (N, P, Dv)."""
        vision = self._check_vision(vision)
        out = [np.zeros((0, self.num_query_tokens, self.embed_dim), np.float32)]
        for start in range(0, len(vision), self.batch_size):
            feeds = {IMAGE_EMBEDS: vision[start:start + self.batch_size]}
            out.append(self.runners["image_embed"].infer(feeds)[ITC_IMAGE_EMBEDS].astype(np.float32))
        return np.concatenate(out)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, Q, D) float32, L2-normalised per query: transformers' ITC image_embeds."""
        return self.embed_images_from_vision(self.vision_embeds(images))

    # ---- texts ------------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """BERT ids ([CLS] ... [SEP]) of each text; an OptionError names a text the model cannot take."""
        limit, vocab = self.model["max_text_tokens"], self.model["vocab_size"]
        out = []
        for i, text in enumerate(_text_batch(texts)):
            ids = self.tokenizer.encode(text)
            if len(ids) > limit:
                raise OptionError(f"text {i}: {len(ids)} tokens; the model takes at most {limit} (with [CLS] and "
                                  "[SEP]); shorten it")
            if ids and max(ids) >= vocab:
                token = self.tokenizer.token_text(max(ids))
                raise OptionError(f"text {i}: contains a token ({token!r}) outside the model's vocabulary of {vocab} ids")
            out.append(ids)
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(M, D) float32, L2-normalised: transformers' ITC text_embeds."""
        ids = self.encode_texts(texts)
        out = [np.zeros((0, self.embed_dim), np.float32)]
        for start in range(0, len(ids), self.batch_size):
            arr, mask = pad_prompts(ids[start:start + self.batch_size], 0, "right")
            feeds = {INPUT_IDS: arr, ATTENTION_MASK: mask}
            out.append(self.runners["text_embed"].infer(feeds)[ITC_TEXT_EMBEDS].astype(np.float32))
        return np.concatenate(out)

    # ---- scores -----------------------------------------------------------------------------------

    # itc() from stored embeddings: image_embeds (N, Q, D) and text_embeds (M, D) -> (N, M).
    itc_from_embeds = staticmethod(similarity)

    def itc(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """(N, M) ITC scores: transformers' logits_per_image with use_image_text_matching_head=False."""
        texts = _text_batch(texts)
        return similarity(self.embed_images(images), self.embed_texts(texts))

    def itm(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """(N, M): the ITM head's probability that image i matches text j."""
        texts = _text_batch(texts)
        return self.itm_from_vision(self.vision_embeds(images), texts)

    def itm_from_vision(self, vision: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """itm() from vision features (N, P, Dv) of vision_embeds(): re-ranking a shortlist
        needs the vision stage only once per image."""
        vision = self._check_vision(vision)
        ids = self.encode_texts(texts)
        n, m = len(vision), len(ids)
        pairs = [(i, j) for i in range(n) for j in range(m)]
        probs = np.zeros(n * m, np.float32)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            arr, mask = pad_prompts([ids[j] for _, j in chunk], 0, "right")
            feeds = {IMAGE_EMBEDS: vision[[i for i, _ in chunk]], INPUT_IDS: arr, ATTENTION_MASK: mask}
            logits = self.runners["itm"].infer(feeds)[ITM_LOGITS]
            probs[start:start + len(chunk)] = match_probability(logits)
        return probs.reshape(n, m)

    def _check_vision(self, vision) -> np.ndarray:
        want = (self.model["num_patches"], self.model["vision_hidden"])
        if not isinstance(vision, np.ndarray) or vision.ndim != 3 or tuple(vision.shape[1:]) != want:
            shape = getattr(vision, "shape", type(vision).__name__)
            raise OptionError(f"vision features of shape {shape}; expected (N, {want[0]}, {want[1]}) from vision_embeds()")
        return np.ascontiguousarray(vision, dtype=self.float_dtype)
