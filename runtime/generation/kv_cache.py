"""Step decoders (runtime.generation.search.StepDecoder) over a decoder graph with a self-attention KV
cache: what every family's shares (CachedDecoder), and the OPT family's (KVCacheDecoder), which
also carries the attention mask and positions between steps.

OPT positions follow transformers' `generate`: cumsum(attention_mask) - 1, with padded
positions set to 1 (they are masked, so their value never reaches a real token).
"""

from __future__ import annotations

import time

import numpy as np

from runtime.stages import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, POSITION_IDS, kv_names


class CachedDecoder:
    """The decoder graph's self-attention cache: fed back at every step, replaced by the graph's
    present key/values, reordered for beam search. With `io_binding`, the cache lives in
    OrtValues on the runner's device (the GPU under CUDA) and only the logits cross to the host
    each step."""

    def __init__(self, runner, model: dict, float_dtype: np.dtype, io_binding: bool = False):
        self.runner = runner
        self.io_binding = io_binding
        self.dtype = float_dtype
        self.past_names = kv_names(model["num_layers"], "past")
        self.present_names = kv_names(model["num_layers"], "present")
        # Families with grouped-query attention (LLaMA) cache only their key/value heads.
        self.kv_shape = (model.get("num_kv_heads", model["num_heads"]), model["head_dim"])
        self.past: list = []
        self.step_times: list[float] = []
        self.prefill_times: dict[str, float] = {}  # stages run before the decoder's prefill (T5: encoder)

    def _empty_cache(self, batch: int) -> None:
        self.past = [np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), self.dtype) for _ in self.past_names]

    def _decode(self, feeds: dict) -> np.ndarray:
        """Runs the decoder graph on `feeds` and the cache; keeps the new cache, returns the logits."""
        feeds.update(zip(self.past_names, self.past))
        if self.io_binding:
            out = self.runner.infer_bound(feeds, host_outputs={LOGITS})
        else:
            out = self.runner.infer(feeds)
        self.past = [out[n] for n in self.present_names]
        return out[LOGITS]

    def _take_rows(self, value, rows: np.ndarray):
        """value[rows] for a host array or, with `io_binding`, a device OrtValue. OrtValues cannot
        be indexed in place: a round trip through the host. Greedy and sampling never reorder;
        beam search pays this copy once per step."""
        if self.io_binding:
            return self.runner.to_device(value.numpy()[rows])
        return value[rows]


class KVCacheDecoder(CachedDecoder):
    """OPT's: one graph for prefill and every step, with the attention mask and positions."""

    def __init__(self, runner, embed_table: np.ndarray, model: dict, float_dtype: np.dtype,
                 io_binding: bool = False):
        super().__init__(runner, model, float_dtype, io_binding)
        self.table = embed_table
        self.mask: np.ndarray | None = None

    def _run(self, embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self._decode({INPUTS_EMBEDS: embeds.astype(self.dtype, copy=False), ATTENTION_MASK: self.mask,
                             POSITION_IDS: position_ids})

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """embeds (B, S, D), mask (B, S) -> logits of the last position (B, V)."""
        b = embeds.shape[0]
        self.mask = mask.astype(np.int64)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions[self.mask == 0] = 1
        self._empty_cache(b)
        return self._run(embeds, positions)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """One new token per row -> next logits (B, V)."""
        t0 = time.perf_counter()
        b = token_ids.shape[0]
        self.mask = np.concatenate([self.mask, np.ones((b, 1), np.int64)], axis=1)
        positions = (self.mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits = self._run(self.table[token_ids][:, None, :], positions)
        self.step_times.append(time.perf_counter() - t0)
        return logits

    def select(self, rows: np.ndarray) -> None:
        """Reorders (or duplicates) cache rows: beam search's bookkeeping."""
        self.past = [self._take_rows(p, rows) for p in self.past]
        self.mask = self.mask[rows]
