"""What every family declares; runtime/families/opt.py and t5.py fill it in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.stages import IMAGE_EMBEDS, QFORMER, VISION, StageSpec


@dataclass(frozen=True)
class LLMInputs:
    """The LLM's inputs for one batch, as transformers' generate builds them."""

    embeds: np.ndarray  # (B, S, D): query embeddings and prompt token embeddings
    mask: np.ndarray  # (B, S) int64, 1 for real positions
    history: np.ndarray  # (B, L0) ids the logits processors see (repetition penalty)


class Family:
    """One model kind. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # the manifest's llm_family
    architecture: str = "blip-2"
    # What the artifacts are for: "generation" (Blip2Pipeline: captions, answers) or "retrieval"
    # (Blip2Retriever: embeddings and match scores; no LLM).
    task: str = "generation"
    # Stages fed by images alone, in run order: INT8-calibrated on images by `quantize`.
    visual_stages: tuple[str, ...] = ("vision", "qformer")
    llm_stages: tuple[str, ...] = ()  # stages after the Q-Former, in run order: llm_specs' keys
    # Stages quantized weight-only by `quantize --llm` (MatMulNBits); the one producing logits
    # is the `logits_stage` (its lm_head has its own --lm-head precision).
    weight_only_stages: tuple[str, ...] = ()
    logits_stage: str = "decoder"
    # The stage whose first input's dtype is the float the runtime feeds (embeddings, pixels).
    float_stage: str = "decoder"
    # Timings the family's decoder records at prefill besides prefill itself (e.g. "encoder").
    prefill_stages: tuple[str, ...] = ()
    padding_side: str = "left"  # where the prompt's padding goes, as its processor pads it
    prompts: dict = {"caption": "", "caption_prefix": "{}", "vqa": "Question: {} Answer:"}
    stop_strings: tuple[str, ...] = ()

    def llm_specs(self, model: dict) -> dict[str, StageSpec]:
        raise NotImplementedError

    def stage_specs(self, model: dict) -> dict[str, StageSpec]:
        """Every stage of an artifact, in run order."""
        return {"vision": VISION, "qformer": QFORMER, **self.llm_specs(model)}

    def stage_names(self, model: dict) -> tuple[str, ...]:
        return ("vision", "qformer", *self.llm_stages)

    def qformer_feeds(self, image_embeds: np.ndarray, prompts, tokenizer, model: dict) -> dict:
        """The Q-Former stage's inputs for a batch: BLIP-2's reads the image alone (InstructBLIP's
        also the prompts, through `tokenizer`, the Q-Former's own)."""
        return {IMAGE_EMBEDS: image_embeds}

    def layout(self, query: np.ndarray, prompt_ids: list[list[int]], embed_table: np.ndarray, model: dict,
               generation: dict, float_dtype: np.dtype) -> LLMInputs:
        raise NotImplementedError

    def new_decoder(self, runners: dict, embed_table: np.ndarray, model: dict, generation: dict,
                    float_dtype: np.dtype, io_binding: bool = False):
        """A runtime.generation.search.StepDecoder with `prefill(embeds, mask) -> logits (B, V)`, `step_times`
        and `prefill_times` (the `prefill_stages` timings of the last prefill)."""
        raise NotImplementedError

    def check_placement(self, where, model: dict, float_dtype: np.dtype, device: str, backend: str,
                        available) -> None:
        """Raises Blip2EdgeError, at load and before any session is built, when a stage's graph
        cannot run on that device and backend (the shared KV cache on TensorRT), given ONNX
        Runtime's `available` providers; every family's graphs run anywhere by default."""

    def check_instructions(self, prompts, tokenizer, model: dict):
        """Raises PromptTooLongError for a prompt the architecture's own text encoder cannot take
        (InstructBLIP's Q-Former); BLIP-2's Q-Former reads no text."""

    def position_limit(self, model: dict) -> int | None:
        """Positions available to queries + prompt + new tokens; None when unbounded."""
        return None


def pad_prompts(prompt_ids: list[list[int]], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest prompt on `side`, with their mask, as a tokenizer pads."""
    longest = max(len(x) for x in prompt_ids)
    ids = np.full((len(prompt_ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompt_ids), longest), dtype=np.int64)
    for i, x in enumerate(prompt_ids):
        span = slice(longest - len(x), longest) if side == "left" else slice(0, len(x))
        ids[i, span] = x
        mask[i, span] = 1
    return ids, mask


def query_first(query: np.ndarray, ids: np.ndarray, mask: np.ndarray, embed_table: np.ndarray,
                float_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[query embeds][prompt embeds], as Blip2Processor puts the image tokens before the text
    (and its padding) and generate scatters the query embeddings into them."""
    b, q, _ = query.shape
    embeds = np.concatenate([query.astype(float_dtype), embed_table[ids].astype(float_dtype)], axis=1)
    full_mask = np.concatenate([np.ones((b, q), np.int64), mask], axis=1)
    return embeds, full_mask
