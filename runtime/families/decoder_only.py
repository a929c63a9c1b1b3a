"""What the decoder-only families (OPT, LLaMA) share: one `decoder` graph with a KV cache that
serves prefill and every step, and the [query embeds][left padding][BOS + prompt] layout that
Blip2Processor and InstructBlipProcessor build (image placeholders first, then the padded text).

Positions are transformers' `generate` positions, cumsum(attention_mask) - 1 (runtime.kv_decoder):
learned position embeddings (OPT) and rotary ones (LLaMA) read the same ids, so left padding in
a batch gives each row the positions it would have alone.
"""

from __future__ import annotations

import numpy as np

from runtime.families.base import Family, LLMInputs, pad_prompts, query_first
from runtime.kv_decoder import KVCacheDecoder
from runtime.stages import (ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, PAST_KV_SHAPE, POSITION_IDS, PRESENT_KV_SHAPE,
                            StageSpec, TensorSpec, kv_names)


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


class DecoderOnlyFamily(Family):
    llm_stages = ("decoder",)
    weight_only_stages = ("decoder",)
    padding_side = "left"

    def llm_specs(self, model: dict) -> dict[str, StageSpec]:
        return {"decoder": decoder_spec(model["num_layers"])}

    def layout(self, query, prompt_ids, embed_table, model, generation, float_dtype) -> LLMInputs:
        ids, mask = pad_prompts(prompt_ids, int(generation["pad_token_id"]), self.padding_side)
        embeds, full_mask = query_first(query, ids, mask, embed_table, float_dtype)
        b, q, _ = query.shape
        # The ids transformers' processors see: image placeholders, then the padded prompt.
        history = np.concatenate([np.full((b, q), model["image_token_id"], np.int64), ids], axis=1)
        return LLMInputs(embeds, full_mask, history)

    def new_decoder(self, runners, embed_table, model, generation, float_dtype, io_binding=False):
        return KVCacheDecoder(runners["decoder"], embed_table, model, float_dtype, io_binding=io_binding)

    def position_limit(self, model: dict) -> int:
        return int(model["max_position_embeddings"])
