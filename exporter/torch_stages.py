"""The PyTorch modules that become the ONNX graphs, one per stage of runtime/stages.py.

Each wraps the loaded `Blip2ForConditionalGeneration` and shares its weights (no copies). The
vision and Q-Former stages call transformers' own modules as `Blip2ForConditionalGeneration.generate`
does. The decoder is written out here over OPT's own layers instead: transformers' OPTDecoder
builds its causal mask and cache through `masking_utils` and `Cache` objects that do not trace
to a graph with dynamic past length, and optimum's OPT decoder config takes `input_ids`, not the
`inputs_embeds` that BLIP-2 needs. The arithmetic below follows OPTDecoder/OPTDecoderLayer
step for step, and parity with `generate` is checked after every export.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):  # (B, 3, H, W) -> (B, P, Dv)
        return self.vision_model(pixel_values, return_dict=True).last_hidden_state


class QFormerStage(nn.Module):
    """Learned query tokens + Q-Former + language projection: image_embeds -> soft prompt."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds):  # (B, P, Dv) -> (B, Q, Dl)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        # The Q-Former is kept in fp32 by transformers; cast back as generate() does.
        return self.language_projection(out.to(image_embeds.dtype))


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
        b, t, _ = inputs_embeds.shape
        total = attention_mask.shape[1]
        dtype = inputs_embeds.dtype
        # Additive mask (B, 1, T, total): causal over the new positions, and padding.
        q_pos = torch.arange(total - t, total).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(total).unsqueeze(0)  # (1, total)
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool()[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

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
