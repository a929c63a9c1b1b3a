"""BLIP-2 Flan-T5 for the exporter: encoder, cross-K/V and decoder wrappers, dims, checks and
stage validation.

The wrappers are written over T5's own modules (its layer norms, feed-forward blocks, attention
projections and relative-position buckets) because transformers' T5Stack keeps its cache in
`EncoderDecoderCache` objects and builds its masks through `_update_causal_mask`, which do not
trace to graphs with a dynamic past length; optimum's T5 export takes `input_ids`, not the
`inputs_embeds` BLIP-2 feeds the encoder. The arithmetic follows T5Stack/T5Block/T5Attention
step by step (no 1/sqrt(d) scaling; one relative-position bias, from the first layer, shared by
all layers; cross-attention without position bias), and the export is checked against
`generate`.

float16 as transformers runs T5 in it: the feed-forward output projection `wo` stays float32
(T5's `_keep_in_fp32_modules`; the loader keeps it so for BLIP-2 too, exporter/loading.py), its
input is cast up before it (T5DenseActDense / T5DenseGatedActDense, called as they are), and the
residual stream, float16 + float32, is float32 from the first feed-forward on; while it is still
float16 (the first block's attention sums) T5Block's clamp replaces an overflow with the largest
finite value (`_clamp_fp16`). The graphs get the casts and the clamp where torch computes them.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.comparison import VALIDATION_PROMPTS, compare, merge_reports, to_numpy
from exporter.families.base import ExportFamily
from runtime.errors import Blip2EdgeError
from runtime.stages import ATTENTION_MASK, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES, INPUTS_EMBEDS, LOGITS, kv_names


def _split_heads(x, heads: int, head_dim: int):  # (B, T, H*d) -> (B, H, T, d)
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


def _attend(attn, hidden, keys, values, bias):
    """T5Attention's arithmetic with the keys/values given: no scaling, softmax in fp32."""
    q = _split_heads(attn.q(hidden), attn.n_heads, attn.key_value_proj_dim)
    scores = torch.matmul(q, keys.transpose(3, 2)) + bias  # (B, H, T, S)
    probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(hidden.shape[0], -1, attn.inner_dim)
    return attn.o(out)


def _position_bias(attn, q_pos, k_pos, bidirectional: bool):
    """T5Attention.compute_bias for query positions q_pos (T, 1) and key positions k_pos (1, S)."""
    buckets = attn._relative_position_bucket(k_pos - q_pos, bidirectional=bidirectional,
                                             num_buckets=attn.relative_attention_num_buckets,
                                             max_distance=attn.relative_attention_max_distance)
    return attn.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)  # (1, H, T, S)


def _clamp_fp16(hidden):
    """T5Block's guard after each of its sub-layers, where the hidden states are float16: an inf
    anywhere clamps the whole tensor to +-(max - 1000), else to +-max (transformers' clamp_value).
    float32 states (from the first float32 `wo` on) pass unchanged, as in transformers."""
    if hidden.dtype != torch.float16:
        return hidden
    big = torch.finfo(torch.float16).max
    # |x| == inf is torch.isinf(x) (NaN is neither); torch.onnx would cast to double for IsInf.
    limit = torch.where((hidden.abs() == float("inf")).any(), big - 1000, big).to(hidden.dtype)
    return torch.clamp(hidden, min=-limit, max=limit)


def _padding_bias(mask, dtype):  # (B, S) -> (B, 1, 1, S), as T5Stack / invert_attention_mask
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5EncoderStage(nn.Module):
    """[query ; prompt] embeddings + mask -> encoder hidden states (after the final layer norm)."""

    def __init__(self, model):
        super().__init__()
        enc = model.language_model.encoder
        self.blocks = enc.block
        self.final_layer_norm = enc.final_layer_norm

    def forward(self, inputs_embeds, attention_mask):
        s = inputs_embeds.shape[1]
        pos = torch.arange(s)
        first = self.blocks[0].layer[0].SelfAttention
        bias = _position_bias(first, pos[:, None], pos[None, :], bidirectional=True) \
            + _padding_bias(attention_mask, inputs_embeds.dtype)  # (B, H, S, S)
        hidden = inputs_embeds
        for block in self.blocks:
            sa = block.layer[0]
            normed = sa.layer_norm(hidden)
            attn = sa.SelfAttention
            k = _split_heads(attn.k(normed), attn.n_heads, attn.key_value_proj_dim)
            v = _split_heads(attn.v(normed), attn.n_heads, attn.key_value_proj_dim)
            hidden = _clamp_fp16(hidden + _attend(attn, normed, k, v, bias))
            # T5LayerFF: layer norm, (gated) feed-forward (wo in its own dtype), residual
            hidden = _clamp_fp16(block.layer[-1](hidden))
        return self.final_layer_norm(hidden)


class T5CrossKVStage(nn.Module):
    """Encoder hidden states -> each decoder layer's cross-attention keys and values, once."""

    def __init__(self, model):
        super().__init__()
        # The cross-attention key and value projections alone: a stage-by-stage export reads the
        # weights a stage holds, and the whole decoder blocks are 7x these (flan-t5-xl: 5.7 GB in fp32).
        attentions = [block.layer[1].EncDecAttention for block in model.language_model.decoder.block]
        self.keys = nn.ModuleList(a.k for a in attentions)
        self.values = nn.ModuleList(a.v for a in attentions)
        self.heads, self.head_dim = attentions[0].n_heads, attentions[0].key_value_proj_dim

    def forward(self, encoder_hidden_states):
        out = []
        for k, v in zip(self.keys, self.values):
            out.append(_split_heads(k(encoder_hidden_states), self.heads, self.head_dim))
            out.append(_split_heads(v(encoder_hidden_states), self.heads, self.head_dim))
        return tuple(out)


class T5DecoderStage(nn.Module):
    """New token embeddings + encoder mask + self-attention cache + cross K/V -> last-position
    logits + the grown self-attention cache."""

    def __init__(self, model):
        super().__init__()
        lm = model.language_model
        self.blocks = lm.decoder.block
        self.final_layer_norm = lm.decoder.final_layer_norm
        self.lm_head = lm.lm_head
        # Tied embeddings: T5ForConditionalGeneration rescales the output before lm_head.
        self.output_scale = lm.model_dim ** -0.5 if lm.config.tie_word_embeddings else None

    def forward(self, inputs_embeds, encoder_attention_mask, *kv):
        n = len(self.blocks)
        past, cross = kv[:2 * n], kv[2 * n:]
        t = inputs_embeds.shape[1]
        total = past[0].shape[2] + t
        dtype = inputs_embeds.dtype
        q_pos = torch.arange(total - t, total)[:, None]  # (T, 1)
        k_pos = torch.arange(total)[None, :]  # (1, total)
        first = self.blocks[0].layer[0].SelfAttention
        causal = torch.zeros(t, total, dtype=dtype).masked_fill(k_pos > q_pos, torch.finfo(dtype).min)
        self_bias = _position_bias(first, q_pos, k_pos, bidirectional=False) + causal  # (1, H, T, total)
        cross_bias = _padding_bias(encoder_attention_mask, dtype)  # (B, 1, 1, S)

        hidden = inputs_embeds
        presents = []
        for i, block in enumerate(self.blocks):
            sa = block.layer[0]
            normed = sa.layer_norm(hidden)
            attn = sa.SelfAttention
            k = torch.cat([past[2 * i], _split_heads(attn.k(normed), attn.n_heads, attn.key_value_proj_dim)], dim=2)
            v = torch.cat([past[2 * i + 1], _split_heads(attn.v(normed), attn.n_heads, attn.key_value_proj_dim)], dim=2)
            presents += [k, v]
            hidden = _clamp_fp16(hidden + _attend(attn, normed, k, v, self_bias))
            ca = block.layer[1]
            hidden = _clamp_fp16(hidden + _attend(ca.EncDecAttention, ca.layer_norm(hidden), cross[2 * i],
                                                  cross[2 * i + 1], cross_bias))
            hidden = _clamp_fp16(block.layer[-1](hidden))
        last = self.final_layer_norm(hidden[:, -1, :])  # (B, D): only the next token's logits leave
        if self.output_scale is not None:
            last = last * self.output_scale
        return (self.lm_head(last), *presents)


class T5Export(ExportFamily):
    name = "t5"
    # transformers' T5PreTrainedModel._keep_in_fp32_modules: float16 exports keep it float32.
    keep_in_fp32 = ("wo",)

    def check(self, config, model: str, dtype: str) -> None:
        t = config.text_config
        # Fewer decoder layers than encoder layers (t5-efficient "DL" shapes) export: the decoder
        # graphs, its cache and cross K/V are sized by num_decoder_layers, the encoder by num_layers.
        if t.num_decoder_layers > t.num_layers:
            raise Blip2EdgeError(
                f"'{model}': T5 with more decoder layers (num_decoder_layers {t.num_decoder_layers}) than encoder "
                f"layers (num_layers {t.num_layers}) is not supported: transformers' generate sizes its KV cache by "
                "num_layers and fails on such configs, so there is no reference to validate the export against")

    def llm_dims(self, t) -> dict:
        return {
            "text_hidden": t.d_model,
            "num_layers": t.num_decoder_layers,  # decoder layers: the self-attention cache's and cross K/V's
            "num_encoder_layers": t.num_layers,  # may be more (never fewer: check)
            "num_heads": t.num_heads,
            "head_dim": t.d_kv,
            "vocab_size": t.vocab_size,
        }

    def llm_modules(self, hf_model, kv_cache: str = "concat") -> dict:
        return {"encoder": T5EncoderStage(hf_model), "cross_kv": T5CrossKVStage(hf_model),
                "decoder": T5DecoderStage(hf_model)}

    def generation_defaults(self, hf_model, tokenizer=None) -> dict:
        tc = hf_model.config.text_config
        start = hf_model.generation_config.decoder_start_token_id
        return {**super().generation_defaults(hf_model, tokenizer),
                "decoder_start_token_id": int(start if start is not None else tc.decoder_start_token_id)}

    def validate_llm(self, hf_model, processor, runners, query, manifest, atol) -> list[dict]:
        """Right-padded [query][prompt </s>][pad] through the encoder and cross K/V, then the
        decoder on the start token and one cached step."""

        layers = manifest.model["num_layers"]
        tok = processor.tokenizer(list(VALIDATION_PROMPTS), padding=True, return_tensors="pt")
        embeds = torch.cat([query, hf_model.get_input_embeddings()(tok["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(query.shape[:2], dtype=torch.long), tok["attention_mask"]], dim=1)
        hidden = T5EncoderStage(hf_model)(embeds, mask)
        reports = [compare("encoder", {ENCODER_HIDDEN_STATES: to_numpy(hidden)},
                           runners["encoder"].infer({INPUTS_EMBEDS: embeds.numpy(), ATTENTION_MASK: mask.numpy()}),
                           atol)]
        cross = T5CrossKVStage(hf_model)(hidden)
        cross_names = kv_names(layers, "cross")
        reports.append(compare("cross_kv", {n: to_numpy(c) for n, c in zip(cross_names, cross)},
                               runners["cross_kv"].infer({ENCODER_HIDDEN_STATES: hidden.numpy()}), atol))

        dec = T5DecoderStage(hf_model)
        b, heads, hd = embeds.shape[0], manifest.model["num_heads"], manifest.model["head_dim"]
        start = manifest.data["generation"]["decoder_start_token_id"]
        past = [torch.zeros(b, heads, 0, hd, dtype=embeds.dtype) for _ in range(2 * layers)]
        names = [LOGITS, *kv_names(layers, "present")]
        step_reports = []
        ids = torch.full((b,), start, dtype=torch.long)
        for _ in range(2):  # the start token on an empty cache, then one cached step
            tokens = hf_model.get_input_embeddings()(ids)[:, None, :]
            out = dec(tokens, mask, *past, *cross)
            feeds = {INPUTS_EMBEDS: tokens.numpy(), ENCODER_ATTENTION_MASK: mask.numpy()}
            feeds.update({n: p.numpy() for n, p in zip(kv_names(layers, "past"), past)})
            feeds.update({n: c.numpy() for n, c in zip(cross_names, cross)})
            step_reports.append(compare("decoder", {n: to_numpy(t) for n, t in zip(names, out)},
                                        runners["decoder"].infer(feeds), atol))
            ids, past = out[0].argmax(-1), list(out[1:])
        reports.append(merge_reports(step_reports[0], step_reports[1], "step."))
        return reports


FAMILY = T5Export()
