"""What the decoder-only families (OPT, LLaMA) share: one `decoder` graph with a KV cache that
serves prefill and every step, and the [query embeds][left padding][BOS + prompt] layout that
Blip2Processor and InstructBlipProcessor build (image placeholders first, then the padded text).

Positions are transformers' `generate` positions, cumsum(attention_mask) - 1 (runtime.generation.kv_cache):
learned position embeddings (OPT) and rotary ones (LLaMA) read the same ids, so left padding in
a batch gives each row the positions it would have alone.

The graph keeps its KV cache in one of two forms (runtime.stages.KV_CACHE_FORMS, the manifest's
model.kv_cache): concatenated each step (KVCacheDecoder), or preallocated buffers that ONNX
Runtime's GroupQueryAttention updates in place (runtime.generation.shared_kv_cache).
"""

from __future__ import annotations

import numpy as np

from runtime.families.base import Family, LLMInputs, pad_prompts, query_first
from runtime.generation.kv_cache import KVCacheDecoder
from runtime.generation.shared_kv_cache import SharedKVCacheDecoder, check_placement
from runtime.stages import (
    ATTENTION_MASK,
    INPUTS_EMBEDS,
    LOGITS,
    PAST_KV_SHAPE,
    POSITION_IDS,
    PRESENT_KV_SHAPE,
    SEQLENS_K,
    SHARED_KV_SHAPE,
    TOTAL_SEQUENCE_LENGTH,
    StageSpec,
    TensorSpec,
    kv_cache_form,
    kv_names,
)


def decoder_spec(num_layers: int, past_shape: tuple = PAST_KV_SHAPE,
                 present_shape: tuple = PRESENT_KV_SHAPE) -> StageSpec:
    """The decoder-only LLM with a KV cache. One graph serves prefill (past_sequence = 0) and
    each decode step; it returns only the last position's logits, so prefill never
    materialises (sequence x vocab) logits."""
    return StageSpec(
        name="decoder",
        file="decoder.onnx",
        inputs=(
            TensorSpec(INPUTS_EMBEDS, "float", ("batch", "sequence", "text_hidden")),
            TensorSpec(ATTENTION_MASK, "int64", ("batch", "total_sequence")),
            TensorSpec(POSITION_IDS, "int64", ("batch", "sequence")),
            *(TensorSpec(n, "float", past_shape) for n in kv_names(num_layers, "past")),
        ),
        outputs=(
            TensorSpec(LOGITS, "float", ("batch", "vocab_size")),
            *(TensorSpec(n, "float", present_shape) for n in kv_names(num_layers, "present")),
        ),
    )


def shared_decoder_spec(num_layers: int, cache_shape: tuple = SHARED_KV_SHAPE, positions: bool = True) -> StageSpec:
    """The decoder-only LLM over a KV cache updated in place (ONNX Runtime's GroupQueryAttention).

    Each row's tokens sit at the front of its cache, padding at the right: no attention mask.
    Prefill (from an empty cache) feeds each row's tokens left-aligned, `seqlens_k` = its length
    - 1; a step feeds one token per row, `seqlens_k` = the row's cache length before it. The
    graph writes the new keys/values at those positions into the buffers bound as both past_*
    and present_*, and returns each row's last logits (position min(seqlens_k, sequence - 1)).
    `positions`: the graph reads position ids (OPT's learned table); LLaMA's has none, its
    GroupQueryAttention rotating each token at its cache position, which is the same number."""
    return StageSpec(
        name="decoder",
        file="decoder.onnx",
        inputs=(
            TensorSpec(INPUTS_EMBEDS, "float", ("batch", "sequence", "text_hidden")),
            *((TensorSpec(POSITION_IDS, "int64", ("batch", "sequence")),) if positions else ()),
            TensorSpec(SEQLENS_K, "int32", ("batch",)),
            TensorSpec(TOTAL_SEQUENCE_LENGTH, "int32", ()),
            *(TensorSpec(n, "float", cache_shape) for n in kv_names(num_layers, "past")),
        ),
        outputs=(
            TensorSpec(LOGITS, "float", ("batch", "vocab_size")),
            *(TensorSpec(n, "float", cache_shape) for n in kv_names(num_layers, "present")),
        ),
    )


class DecoderOnlyFamily(Family):
    llm_stages = ("decoder",)
    weight_only_stages = ("decoder",)
    padding_side = "left"
    # The cache entries' shapes: concat's past and present, and the shared form's buffers.
    kv_shapes = (PAST_KV_SHAPE, PRESENT_KV_SHAPE, SHARED_KV_SHAPE)

    def shared_reads_positions(self, model: dict) -> bool:
        """Whether the shared form's graph takes position ids (shared_decoder_spec)."""
        return True

    def llm_specs(self, model: dict) -> dict[str, StageSpec]:
        past, present, shared = self.kv_shapes
        if kv_cache_form(model) == "shared":
            return {"decoder": shared_decoder_spec(model["num_layers"], shared, self.shared_reads_positions(model))}
        return {"decoder": decoder_spec(model["num_layers"], past, present)}

    def layout(self, query, prompt_ids, embed_table, model, generation, float_dtype) -> LLMInputs:
        ids, mask = pad_prompts(prompt_ids, int(generation["pad_token_id"]), self.padding_side)
        embeds, full_mask = query_first(query, ids, mask, embed_table, float_dtype)
        b, q, _ = query.shape
        # The ids transformers' processors see: image placeholders, then the padded prompt.
        history = np.concatenate([np.full((b, q), model["image_token_id"], np.int64), ids], axis=1)
        return LLMInputs(embeds, full_mask, history)

    def check_placement(self, where, model, float_dtype, device, backend, available) -> None:
        if kv_cache_form(model) == "shared":
            check_placement(where, float_dtype, device, backend, available)

    def new_decoder(self, runners, embed_table, model, generation, float_dtype, io_binding=False):
        if kv_cache_form(model) == "shared":  # always bound in place: `io_binding` is the concat form's choice
            return SharedKVCacheDecoder(runners["decoder"], embed_table, model, float_dtype)
        return KVCacheDecoder(runners["decoder"], embed_table, model, float_dtype, io_binding=io_binding)

    def position_limit(self, model: dict) -> int:
        return int(model["max_position_embeddings"])
