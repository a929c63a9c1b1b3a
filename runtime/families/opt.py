"""BLIP-2 OPT: a decoder-only LLM with a KV cache.

Layout: [query embeds][left padding][BOS + prompt], as Blip2Processor (left padding) builds it;
one `decoder` graph serves prefill and every step. Positions are learned, so queries + prompt +
new tokens must fit in max_position_embeddings.
"""

from __future__ import annotations

import numpy as np

from runtime.families import register
from runtime.families.base import Family, LLMInputs, pad_prompts, query_first
from runtime.kv_decoder import KVCacheDecoder
from runtime.stages import (ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, PAST_KV_SHAPE, POSITION_IDS, PRESENT_KV_SHAPE,
                            StageSpec, TensorSpec, kv_names)


def decoder_spec(num_layers: int) -> StageSpec:
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
            *(TensorSpec(n, "float", PAST_KV_SHAPE) for n in kv_names(num_layers, "past")),
        ),
        outputs=(
            TensorSpec(LOGITS, "float", ("batch", "vocab_size")),
            *(TensorSpec(n, "float", PRESENT_KV_SHAPE) for n in kv_names(num_layers, "present")),
        ),
    )


class OPTFamily(Family):
    name = "opt"
    llm_stages = ("decoder",)
    weight_only_stages = ("decoder",)
    padding_side = "left"
    # BLIP-2's OPT models end a caption at a newline (LAVIS uses "\n" as their end of text).
    stop_strings = ("\n",)

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


OPT = register(OPTFamily())
