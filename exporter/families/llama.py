"""LLaMA (Vicuna) for the exporter: the decoder wrapper, dims, checks and decoder validation.

As for OPT, the decoder is written out over LLaMA's own modules (its RMSNorms, SwiGLU MLPs and
attention projections, called as they are): transformers' LlamaModel builds its mask through
`masking_utils` and keeps its cache in `Cache` objects, which do not trace to one graph with a
dynamic past length. The arithmetic follows LlamaModel / LlamaDecoderLayer / LlamaAttention with
eager attention step by step:

- rotary angles from the position ids in float32 (inv_freq x position, cat, cos/sin x
  attention_scaling), cast to the model dtype, applied to q and k before k enters the cache;
- scores = (q @ k^T) * head_dim^-0.5 + mask, softmax in float32;
- grouped-query attention: the cache holds num_kv_heads heads, each repeated for its group of
  query heads inside the graph (repeat_kv), so the cache stays num_heads / num_kv_heads smaller.

Nothing here knows the architecture around the LLM (BLIP-2 or InstructBLIP): the wrapper takes
the causal LM itself. Parity with `generate` is checked after every export.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.families.base import ExportFamily, causal_padding_bias, validate_kv_decoder
from exporter.families.gqa import group_query_attention, last_positions
from runtime.errors import Blip2EdgeError
from runtime.families.llama import gqa_rotary

# Rotary types whose inv_freq depends on the sequence length at run time; the others are fixed
# when the model is built (default, linear, llama3, yarn) and are exported as constants.
_DYNAMIC_ROPE = ("dynamic", "longrope")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoderStage(nn.Module):
    """inputs_embeds + position ids + past KV -> last-position logits + present KV. The concat
    form also reads the attention mask; the shared form reads seqlens_k and the total length and
    attends through GroupQueryAttention, which groups query heads onto KV heads and, for heads of
    a multiple of 16 (gqa_rotary), applies the rotary embedding itself: that graph reads no
    position ids."""

    def __init__(self, causal_lm, kv_cache: str = "concat"):
        super().__init__()
        body = causal_lm.model
        self.layers = body.layers
        self.norm = body.norm
        self.lm_head = causal_lm.lm_head
        cfg = causal_lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        self.register_buffer("inv_freq", body.rotary_emb.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(body.rotary_emb.attention_scaling)
        self.shared = self.uses_contrib_ops = kv_cache == "shared"
        # The shared form rotates inside GroupQueryAttention where its kernel can (gqa_rotary).
        self.op_rotary = self.shared and gqa_rotary({"head_dim": self.head_dim})
        if self.op_rotary:  # GroupQueryAttention's rotary tables: every position the model was trained on
            freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * self.inv_freq[None, :]
            dtype = self.lm_head.weight.dtype
            self.register_buffer("cos_cache", (freqs.cos() * self.attention_scaling).to(dtype), persistent=False)
            self.register_buffer("sin_cache", (freqs.sin() * self.attention_scaling).to(dtype), persistent=False)

    def _rotary(self, position_ids, dtype):
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None]  # (B, 1, T, hd)
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None]
        return cos, sin

    def _attention(self, attn, hidden, cos, sin, bias, past_k, past_v):
        b, t, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = attn.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = attn.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)  # (B, nkv, past+T, hd): the cache keeps the KV heads only
        v = torch.cat([past_v, v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        keys, values = k, v
        if groups > 1:  # repeat_kv: each KV head serves `groups` query heads
            keys = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
            values = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling + bias  # (B, nh, T, past+T)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(out), k, v

    def _shared_attention(self, attn, hidden, cos, sin, seqlens_k, total, past_k, past_v):
        """cos/sin (B, 1, T, hd) from position ids, or None: GroupQueryAttention rotates itself."""
        q, k = attn.q_proj(hidden), attn.k_proj(hidden)
        if cos is not None:
            b, t, _ = hidden.shape
            q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, nh, hd): GQA's layout
            k = k.view(b, t, self.num_kv_heads, self.head_dim)
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
            q = (q * cos + _rotate_half(q) * sin).reshape(b, t, -1)
            k = (k * cos + _rotate_half(k) * sin).reshape(b, t, -1)
        rotary = (self.cos_cache, self.sin_cache) if self.op_rotary else None
        out, k, v = group_query_attention(q, k, attn.v_proj(hidden), past_k, past_v, seqlens_k, total,
                                          self.num_heads, self.num_kv_heads, self.scaling, rotary=rotary)
        return attn.o_proj(out), k, v

    def _layers(self, hidden, attend, past):
        """The decoder body; attend(layer's self_attn, normed hidden, past k, past v) -> (out, k, v)."""
        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            hidden, k, v = attend(layer.self_attn, layer.input_layernorm(hidden), past[2 * i], past[2 * i + 1])
            presents += [k, v]
            hidden = residual + hidden
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, presents

    def forward(self, inputs_embeds, *rest):
        if self.shared:  # without position ids where GroupQueryAttention rotates at each token's cache position
            if self.op_rotary:
                (seqlens_k, total, *past), cos, sin = rest, None, None
            else:
                position_ids, seqlens_k, total, *past = rest
                cos, sin = self._rotary(position_ids, inputs_embeds.dtype)
            hidden, presents = self._layers(
                inputs_embeds, lambda attn, h, pk, pv: self._shared_attention(attn, h, cos, sin, seqlens_k, total, pk, pv),
                past)
            return (self.lm_head(self.norm(last_positions(hidden, seqlens_k))), *presents)
        attention_mask, position_ids, *past = rest
        bias = causal_padding_bias(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)  # (B, 1, T, total)
        cos, sin = self._rotary(position_ids, inputs_embeds.dtype)
        hidden, presents = self._layers(
            inputs_embeds, lambda attn, h, pk, pv: self._attention(attn, h, cos, sin, bias, pk, pv), past)
        last = self.norm(hidden[:, -1, :])  # (B, D): only the next token's logits leave the graph
        return (self.lm_head(last), *presents)


class LlamaExport(ExportFamily):
    name = "llama"
    kv_cache_forms = ("concat", "shared")
    # The bench LLaMA's 1.16 GB decoder took 6.3-6.8 GB beside the model (5.35x, OPT's and T5's
    # ~2.2x). Over 2 GiB, instructblip-vicuna-7b's 13.2 GB fp16 decoder, read stage by stage from
    # its shards, took 1.13 GB anonymous in all (torch wrote its tensors from the mapped
    # weights): the others' 0.55x bounds it.
    trace_copies = (5.35, 0.55)

    def check(self, config, model: str, dtype: str) -> None:
        t = config.text_config
        rope = getattr(t, "rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind in _DYNAMIC_ROPE:
            raise Blip2EdgeError(f"'{model}': LLaMA rope_scaling type '{kind}' is not supported: its rotary "
                                 "frequencies change with the sequence length at run time")
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        if head_dim * t.num_attention_heads != t.hidden_size:
            raise Blip2EdgeError(f"'{model}': LLaMA head_dim ({head_dim}) x num_attention_heads "
                                 f"({t.num_attention_heads}) != hidden_size ({t.hidden_size}) is not supported")
        if t.num_attention_heads % t.num_key_value_heads:
            raise Blip2EdgeError(f"'{model}': LLaMA num_key_value_heads ({t.num_key_value_heads}) does not divide "
                                 f"num_attention_heads ({t.num_attention_heads})")

    def llm_dims(self, t) -> dict:
        return {
            "text_hidden": t.hidden_size,
            "num_layers": t.num_hidden_layers,
            "num_heads": t.num_attention_heads,
            "num_kv_heads": t.num_key_value_heads,
            "head_dim": t.hidden_size // t.num_attention_heads,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
        }

    def llm_modules(self, hf_model, kv_cache: str = "concat") -> dict:
        return {"decoder": LlamaDecoderStage(hf_model.language_model, kv_cache)}

    def generation_defaults(self, hf_model, tokenizer=None) -> dict:
        """Vicuna's config often has no pad id (or -1): the prompt's padding is the tokenizer's,
        which is also what transformers' processor pads with (so the ids a repetition penalty
        sees match)."""
        out = super().generation_defaults(hf_model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is not None:
            out["pad_token_id"] = int(pad)
        elif out["pad_token_id"] is None or out["pad_token_id"] < 0:
            out["pad_token_id"] = out["eos_token_ids"][0]
        return out

    def validate_llm(self, hf_model, processor, runners, query, manifest, atol) -> list[dict]:
        dec = LlamaDecoderStage(hf_model.language_model)
        return [validate_kv_decoder(dec, hf_model, processor, runners, query, manifest, atol)]


FAMILY = LlamaExport()
