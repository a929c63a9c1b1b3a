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
from runtime.errors import Blip2EdgeError


class OPTDecoderStage(nn.Module):
    """inputs_embeds + attention_mask + position_ids + past KV -> last-position logits + present KV."""

    def __init__(self, model):
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

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        t = inputs_embeds.shape[1]
        bias = causal_padding_bias(attention_mask, t, inputs_embeds.dtype)  # (B, 1, T, total)

        hidden = inputs_embeds
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions.weight[position_ids + self.embed_positions.offset]

        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            if self.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            hidden, k, v = self._attention(layer.self_attn, hidden, bias, past[2 * i], past[2 * i + 1])
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

        last = hidden[:, -1, :]  # (B, D): only the next token's logits leave the graph
        if self.final_layer_norm is not None:
            last = self.final_layer_norm(last)
        if self.project_out is not None:
            last = self.project_out(last)
        return (self.lm_head(last), *presents)


class OPTExport(ExportFamily):
    name = "opt"

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

    def llm_modules(self, hf_model) -> dict:
        return {"decoder": OPTDecoderStage(hf_model)}

    def validate_llm(self, hf_model, processor, runners, query, manifest, atol) -> list[dict]:
        return [validate_kv_decoder(OPTDecoderStage(hf_model), hf_model, processor, runners, query, manifest, atol)]


FAMILY = OPTExport()
