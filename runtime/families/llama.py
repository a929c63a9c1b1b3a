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

from runtime.families import register
from runtime.families.decoder_only import DecoderOnlyFamily
from runtime.stages import PAST_GQA_KV_SHAPE, PRESENT_GQA_KV_SHAPE, SHARED_GQA_KV_SHAPE


class LlamaFamily(DecoderOnlyFamily):
    name = "llama"
    prompts = {"caption": "A short image description:", "caption_prefix": "{}", "vqa": "{}"}
    stop_strings = ()
    kv_shapes = (PAST_GQA_KV_SHAPE, PRESENT_GQA_KV_SHAPE, SHARED_GQA_KV_SHAPE)


LLAMA = register(LlamaFamily())
