"""ONNX Runtime's GroupQueryAttention (com.microsoft) in the decoder graphs of the "shared" KV
cache form (runtime.stages.KV_CACHE_FORMS, runtime.generation.shared_kv_cache).

The op takes the new positions' projected q/k/v (B, S, heads x head_dim), the cache buffers
(B, kv_heads, capacity, head_dim), each row's `seqlens_k` and the longest row's total length; it
writes the new keys/values into the cache at each row's positions and attends causally over each
row's own length, grouping query heads onto KV heads. With the buffers bound as both past and
present, the cache is updated in place. For LLaMA the op also applies the rotary embedding
(do_rotary, from cos/sin tables baked into the graph): a token's rotary position is its index in
its row's cache, which is the position cumsum(mask) - 1 gives it in transformers' padded layout,
and the dozen small nodes per layer that rotating in the graph took are gone (bench/
KV_CACHE_RESULTS.md).

The torch side of the op (`forward`) only has to give the exporter's trace the right outputs for
the two calls the runtime makes (prefill from an empty cache, one token per row); the exported
graph holds the op itself, and every export is validated against the concat form's arithmetic.
"""

from __future__ import annotations

import torch

# torch.onnx.export's custom_opsets for a module whose `uses_contrib_ops` is true.
CONTRIB_OPSETS = {"com.microsoft": 1}

def _rotate(x, cos, sin, positions):
    """Rotary embedding (rotate-half form) of x (n, heads, hd) at `positions` (n,) from the
    caches (max positions, hd / 2)."""
    half = x.shape[-1] // 2
    c, s_ = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)


class GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int, scale: float):
        b, s, _ = q.shape
        hd = q.shape[-1] // num_heads
        present_k, present_v = past_k.clone(), past_v.clone()
        out = torch.zeros_like(q)
        for r in range(b):
            length = int(seqlens_k[r]) + 1
            start, n = (length - 1, 1) if s == 1 else (0, length)  # a step, or prefill from empty
            queries, keys = q[r, :n].view(n, num_heads, hd), k[r, :n].view(n, kv_heads, hd)
            if cos is not None:  # do_rotary: each token at its cache position
                positions = torch.arange(start, start + n)
                queries, keys = _rotate(queries, cos, sin, positions), _rotate(keys, cos, sin, positions)
            present_k[r, :, start:start + n] = keys.transpose(0, 1)
            present_v[r, :, start:start + n] = v[r, :n].view(n, kv_heads, hd).transpose(0, 1)
            keys = present_k[r, :, :length].repeat_interleave(num_heads // kv_heads, 0)
            values = present_v[r, :, :length].repeat_interleave(num_heads // kv_heads, 0)
            scores = queries.transpose(0, 1) @ keys.transpose(1, 2) * scale
            causal = torch.arange(length)[None, :] <= (start + torch.arange(n))[:, None]
            probs = scores.masked_fill(~causal, float("-inf")).float().softmax(-1).to(q.dtype)
            out[r, :n] = (probs @ values).transpose(0, 1).reshape(n, -1)
        return out, present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale):
        rotary = {} if cos is None else {"do_rotary_i": 1, "rotary_interleaved_i": 0}
        inputs = (q, k, v, past_k, past_v, seqlens_k, total, *(() if cos is None else (cos, sin)))
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", *inputs, num_heads_i=num_heads,
                                         kv_num_heads_i=kv_heads, scale_f=scale, outputs=3, **rotary)
        # Output types for torch's shape inference: the query's, and the cache buffers' (in place).
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def group_query_attention(q, k, v, past_k, past_v, seqlens_k, total, num_heads: int, kv_heads: int, scale: float,
                          rotary: tuple | None = None):
    """(attention output (B, S, heads x head_dim), present key, present value). `rotary`:
    (cos cache, sin cache), each (max positions, head_dim / 2), for the op to rotate q and k
    itself (do_rotary), each token at its position in its row's cache."""
    cos, sin = rotary if rotary is not None else (None, None)
    return GroupQueryAttention.apply(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads,
                                     float(scale))


def last_positions(hidden, seqlens_k):
    """Each row's last token's hidden state (B, D): position seqlens_k at prefill (right padding),
    the only position at a step (min(seqlens_k, S - 1) is both)."""
    idx = torch.clamp(seqlens_k.to(torch.long), max=hidden.shape[1] - 1)
    return hidden.gather(1, idx[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
