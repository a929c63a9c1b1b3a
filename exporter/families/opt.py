"""BLIP-2 OPT for the exporter: the decoder wrapper, dims, checks and decoder validation.

The decoder is written out here over OPT's own layers: transformers' OPTDecoder builds its
causal mask and cache through `masking_utils` and `Cache` objects that do not trace to a graph
with dynamic past length, and optimum's OPT decoder config takes `input_ids`, not the
`inputs_embeds` that BLIP-2 needs. The arithmetic follows OPTDecoder/OPTDecoderLayer step for
step, and parity with `generate` is checked after every export.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.families.base import ExportFamily, causal_padding_bias, validate_kv_decoder
from exporter.families.gqa import group_query_attention, last_positions
from runtime.errors import Blip2EdgeError


class OPTDecoderStage(nn.Module):
    """inputs_embeds + position ids + past KV -> last-position logits + present KV. The concat
    form (decoder_spec) also reads the attention mask; the shared form (shared_decoder_spec)
    reads seqlens_k and the total length instead and attends through GroupQueryAttention."""

    def __init__(self, model, kv_cache: str = "concat"):
        super().__init__()
        lm = model.language_model
        dec = lm.model.decoder
        self.layers = dec.layers
        self.embed_positions = dec.embed_positions
        self.project_in = dec.project_in
        self.project_out = dec.project_out
        self.final_layer_norm = dec.final_layer_norm
        self.lm_head = lm.lm_head
        cfg = lm.config
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.do_layer_norm_before = cfg.do_layer_norm_before
        self.shared = self.uses_contrib_ops = kv_cache == "shared"

    def _attention(self, attn, hidden, bias, past_k, past_v):
        b, t, _ = hidden.shape
        q = (attn.q_proj(hidden) * attn.scaling).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = torch.cat([past_k, k], dim=2)  # (B, nh, past+T, hd)
        v = torch.cat([past_v, v], dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)) + bias  # (B, nh, T, past+T)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
        return attn.out_proj(out), k, v

    def _shared_attention(self, attn, hidden, seqlens_k, total, past_k, past_v):
        out, k, v = group_query_attention(attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden), past_k, past_v,
                                          seqlens_k, total, self.num_heads, self.num_heads, attn.scaling)
        return attn.out_proj(out), k, v

    def _layers(self, hidden, position_ids, attend, past):
        """The decoder body; attend(layer's self_attn, normed hidden, past k, past v) -> (out, k, v)."""
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions.weight[position_ids + self.embed_positions.offset]
        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            if self.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            hidden, k, v = attend(layer.self_attn, hidden, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            hidden = residual + hidden
            if not self.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            if self.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
            hidden = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = residual + hidden
            if not self.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
        return hidden, presents

    def _logits(self, last):
        """(B, D) last positions -> (B, V): only the next token's logits leave the graph."""
        if self.final_layer_norm is not None:
            last = self.final_layer_norm(last)
        if self.project_out is not None:
            last = self.project_out(last)
        return self.lm_head(last)

    def forward(self, inputs_embeds, *rest):
        if self.shared:
            position_ids, seqlens_k, total, *past = rest
            hidden, presents = self._layers(
                inputs_embeds, position_ids,
                lambda attn, h, pk, pv: self._shared_attention(attn, h, seqlens_k, total, pk, pv), past)
            return (self._logits(last_positions(hidden, seqlens_k)), *presents)
        attention_mask, position_ids, *past = rest
        bias = causal_padding_bias(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)  # (B, 1, T, total)
        hidden, presents = self._layers(inputs_embeds, position_ids,
                                        lambda attn, h, pk, pv: self._attention(attn, h, bias, pk, pv), past)
        return (self._logits(hidden[:, -1, :]), *presents)


class OPTExport(ExportFamily):
    name = "opt"
    kv_cache_forms = ("concat", "shared")

    def check(self, config, model: str, dtype: str) -> None:
        text = config.text_config
        if getattr(text, "word_embed_proj_dim", text.hidden_size) != text.hidden_size:
            # BLIP-2's language_projection outputs hidden_size while the embedding table is
            # word_embed_proj_dim wide: transformers then scatters mismatched rows into the prompt.
            raise Blip2EdgeError(
                f"'{model}': OPT word_embed_proj_dim ({text.word_embed_proj_dim}) != hidden_size ({text.hidden_size}) "
                "is not a consistent BLIP-2 configuration (the query embeddings would not fit the token embeddings)"
            )

    def llm_dims(self, t) -> dict:
        return {
            "text_hidden": t.hidden_size,
            "num_layers": t.num_hidden_layers,
            "num_heads": t.num_attention_heads,
            "head_dim": t.hidden_size // t.num_attention_heads,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
        }

    def llm_modules(self, hf_model, kv_cache: str = "concat") -> dict:
        return {"decoder": OPTDecoderStage(hf_model, kv_cache)}

    def validate_llm(self, hf_model, processor, runners, query, manifest, atol) -> list[dict]:
        return [validate_kv_decoder(OPTDecoderStage(hf_model), hf_model, processor, runners, query, manifest, atol)]


FAMILY = OPTExport()
