"""LLaMA (Vicuna): a decoder-only LLM with rotary positions, RMSNorm, SwiGLU, no biases and,
when num_kv_heads < num_heads, grouped-query attention (runtime/families/decoder_only.py).

Nothing here depends on the architecture around the LLM: BLIP-2 and InstructBLIP lay out
[query embeds][left padding][BOS + prompt] alike, so both use this family.

- KV cache: the key/value heads only (num_kv_heads), so GQA checkpoints keep their smaller cache.
- Positions: cumsum(attention_mask) - 1, as transformers' `generate` computes them; the graph
  turns them into rotary angles itself, so left padding rotates each row as if it were alone.
- Limit: max_position_embeddings. Rotary positions have no table to run out of, but the model
  was trained on that context; past it transformers goes on and its text degrades.
- Defaults as InstructBLIP (Vicuna) uses them: the instruction is the prompt as written, the
  answer ends at </s> (no stop string), a caption is asked for with LAVIS's instruction.
"""

from __future__ import annotations

from runtime.families.decoder_only import DecoderOnlyFamily
from runtime.stages import PAST_GQA_KV_SHAPE, PRESENT_GQA_KV_SHAPE, SHARED_GQA_KV_SHAPE

# ONNX Runtime's GroupQueryAttention applies the rotary embedding itself (do_rotary) for head sizes
# that are multiples of 16 only (its CPU kernel refuses others at run time).
GQA_ROTARY_HEAD_MULTIPLE = 16


def gqa_rotary(model: dict) -> bool:
    """Whether the shared form's graph rotates q and k inside GroupQueryAttention, at each token's
    cache position, and so reads no position ids; else it rotates them itself from position ids
    (a dozen small nodes per layer: bench/KV_CACHE_RESULTS.md)."""
    return model["head_dim"] % GQA_ROTARY_HEAD_MULTIPLE == 0


class LlamaFamily(DecoderOnlyFamily):
    name = "llama"
    prompts = {"caption": "A short image description:", "caption_prefix": "{}", "vqa": "{}"}
    stop_strings = ()
    kv_shapes = (PAST_GQA_KV_SHAPE, PRESENT_GQA_KV_SHAPE, SHARED_GQA_KV_SHAPE)

    def shared_reads_positions(self, model: dict) -> bool:
        return not gqa_rotary(model)


LLAMA = LlamaFamily()
