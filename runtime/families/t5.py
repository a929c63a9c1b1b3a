"""BLIP-2 Flan-T5: an encoder-decoder LLM.

Layout: the encoder reads [query embeds][prompt + </s>][right padding] (Blip2Processor puts the
image tokens first and T5's tokenizer pads on the right); the decoder starts from
decoder_start_token_id, so the ids the logits processors see are the decoder's own.

Three LLM graphs:
  encoder   inputs_embeds + attention_mask -> encoder_hidden_states
  cross_kv  encoder_hidden_states -> every decoder layer's cross-attention keys/values
  decoder   one token's embedding + self-attention KV cache + cross K/V -> logits + new cache

cross_kv is its own graph rather than the first decoder step's outputs: each request computes
it exactly once by construction, the decoder graph keeps one signature for every step (ONNX has
no optional outputs, so "first step" would need a second decoder graph or an If node), and beam
search copies the cross K/V only when a reorder moves rows between requests (never, in
practice: beams stay within their request). Relative position buckets have no upper bound, so
T5 has no position limit.

The manifest's model.num_layers is the decoder's depth (num_decoder_layers): the self-attention
cache and the cross K/V have one key/value pair per decoder layer. The encoder's depth
(model.num_encoder_layers) may be greater; it is inside the encoder graph and nothing here reads it.
"""

from __future__ import annotations

import time

import numpy as np

from runtime.families.base import Family, LLMInputs, pad_prompts, query_first
from runtime.generation.kv_cache import CachedDecoder
from runtime.stages import (
    ATTENTION_MASK,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUTS_EMBEDS,
    LOGITS,
    PAST_KV_SHAPE,
    PRESENT_KV_SHAPE,
    StageSpec,
    TensorSpec,
    kv_names,
)

HIDDEN = ("batch", "encoder_sequence", "text_hidden")
CROSS = ("batch", "num_heads", "encoder_sequence", "head_dim")


def encoder_spec() -> StageSpec:
    return StageSpec(
        name="encoder",
        file="encoder.onnx",
        inputs=(TensorSpec(INPUTS_EMBEDS, "float", HIDDEN),
                TensorSpec(ATTENTION_MASK, "int64", ("batch", "encoder_sequence"))),
        outputs=(TensorSpec(ENCODER_HIDDEN_STATES, "float", HIDDEN),),
    )


def cross_kv_spec(num_layers: int) -> StageSpec:
    return StageSpec(
        name="cross_kv",
        file="cross_kv.onnx",
        inputs=(TensorSpec(ENCODER_HIDDEN_STATES, "float", HIDDEN),),
        outputs=tuple(TensorSpec(n, "float", CROSS) for n in kv_names(num_layers, "cross")),
    )


def decoder_spec(num_layers: int) -> StageSpec:
    """New tokens (usually one per row) -> last-position logits; the self-attention cache grows,
    the cross-attention K/V are read-only inputs."""
    return StageSpec(
        name="decoder",
        file="decoder.onnx",
        inputs=(
            TensorSpec(INPUTS_EMBEDS, "float", ("batch", "sequence", "text_hidden")),
            TensorSpec(ENCODER_ATTENTION_MASK, "int64", ("batch", "encoder_sequence")),
            *(TensorSpec(n, "float", PAST_KV_SHAPE) for n in kv_names(num_layers, "past")),
            *(TensorSpec(n, "float", CROSS) for n in kv_names(num_layers, "cross")),
        ),
        outputs=(
            TensorSpec(LOGITS, "float", ("batch", "vocab_size")),
            *(TensorSpec(n, "float", PRESENT_KV_SHAPE) for n in kv_names(num_layers, "present")),
        ),
    )


class T5StepDecoder(CachedDecoder):
    """runtime.generation.search.StepDecoder over the encoder, cross_kv and decoder graphs."""

    def __init__(self, runners: dict, embed_table: np.ndarray, model: dict, start_id: int,
                 float_dtype: np.dtype, io_binding: bool = False):
        super().__init__(runners["decoder"], model, float_dtype, io_binding)
        self.runners = runners
        self.table = embed_table
        self.start_id = start_id
        self.cross_names = kv_names(model["num_layers"], "cross")
        self.cross: list = []
        self.enc_mask: np.ndarray | None = None
        self.requests: np.ndarray | None = None  # the request each row's cross K/V belong to

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Encodes the inputs, computes the cross K/V once, runs the decoder on the start token."""
        self.enc_mask = mask.astype(np.int64)
        t0 = time.perf_counter()
        hidden = self.runners["encoder"].infer({INPUTS_EMBEDS: embeds.astype(self.dtype, copy=False),
                                                ATTENTION_MASK: self.enc_mask})[ENCODER_HIDDEN_STATES]
        self.prefill_times = {"encoder": time.perf_counter() - t0}
        cross = self.runners["cross_kv"].infer({ENCODER_HIDDEN_STATES: hidden})
        self.cross = [self.runner.to_device(cross[n]) if self.io_binding else cross[n] for n in self.cross_names]
        b = embeds.shape[0]
        self.requests = np.arange(b)
        self._empty_cache(b)
        return self._run(np.full(b, self.start_id, np.int64))

    def _run(self, token_ids: np.ndarray) -> np.ndarray:
        feeds = {INPUTS_EMBEDS: self.table[token_ids][:, None, :].astype(self.dtype, copy=False),
                 ENCODER_ATTENTION_MASK: self.enc_mask}
        feeds.update(zip(self.cross_names, self.cross))
        return self._decode(feeds)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self._run(token_ids)
        self.step_times.append(time.perf_counter() - t0)
        return logits

    def select(self, rows: np.ndarray) -> None:
        self.past = [self._take_rows(p, rows) for p in self.past]
        requests = self.requests[rows]
        if not np.array_equal(requests, self.requests):  # only then do the cross K/V differ
            self.cross = [self._take_rows(c, rows) for c in self.cross]
            self.enc_mask = self.enc_mask[rows]
            self.requests = requests


class T5Family(Family):
    name = "t5"
    llm_stages = ("encoder", "cross_kv", "decoder")
    weight_only_stages = ("encoder", "cross_kv", "decoder")
    prefill_stages = ("encoder",)
    padding_side = "right"
    stop_strings = ()  # T5 ends with </s>

    def llm_specs(self, model: dict) -> dict[str, StageSpec]:
        return {"encoder": encoder_spec(), "cross_kv": cross_kv_spec(model["num_layers"]),
                "decoder": decoder_spec(model["num_layers"])}

    def layout(self, query, prompt_ids, embed_table, model, generation, float_dtype) -> LLMInputs:
        ids, mask = pad_prompts(prompt_ids, int(generation["pad_token_id"]), self.padding_side)
        embeds, full_mask = query_first(query, ids, mask, embed_table, float_dtype)
        start = int(generation["decoder_start_token_id"])
        return LLMInputs(embeds, full_mask, np.full((query.shape[0], 1), start, np.int64))

    def new_decoder(self, runners, embed_table, model, generation, float_dtype, io_binding=False):
        return T5StepDecoder(runners, embed_table, model, int(generation["decoder_start_token_id"]), float_dtype,
                             io_binding)

    def position_limit(self, model: dict) -> None:
        return None


T5 = T5Family()
