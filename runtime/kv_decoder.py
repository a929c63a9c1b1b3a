"""The OPT family's step decoder: carries the decoder's KV cache, attention mask and positions
between steps.

Positions follow transformers' `generate` for OPT: cumsum(attention_mask) - 1, with padded
positions set to 1 (they are masked, so their value never reaches a real token).
"""

from __future__ import annotations

import time

import numpy as np

from runtime.stages import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, POSITION_IDS, kv_names


class KVCacheDecoder:
    """With `io_binding`, the cache lives in OrtValues on the runner's device (the GPU under
    CUDA) and only the logits cross to the host each step."""

    def __init__(self, runner, embed_table: np.ndarray, model: dict, float_dtype: np.dtype,
                 io_binding: bool = False):
        self.runner = runner
        self.io_binding = io_binding
        self.table = embed_table
        self.dtype = float_dtype
        self.past_names = kv_names(model["num_layers"], "past")
        self.present_names = kv_names(model["num_layers"], "present")
        self.kv_shape = (model["num_heads"], model["head_dim"])
        self.past: list[np.ndarray] = []
        self.mask: np.ndarray | None = None
        self.step_times: list[float] = []
        self.prefill_times: dict[str, float] = {}  # no stage runs before the decoder's prefill

    def _run(self, embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = {INPUTS_EMBEDS: embeds.astype(self.dtype, copy=False), ATTENTION_MASK: self.mask,
                 POSITION_IDS: position_ids}
        feeds.update(zip(self.past_names, self.past))
        if self.io_binding:
            out = self.runner.infer_bound(feeds, host_outputs={LOGITS})
        else:
            out = self.runner.infer(feeds)
        self.past = [out[n] for n in self.present_names]
        return out[LOGITS]

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """embeds (B, S, D), mask (B, S) -> logits of the last position (B, V)."""
        b = embeds.shape[0]
        self.mask = mask.astype(np.int64)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions[self.mask == 0] = 1
        self.past = [np.zeros((b, self.kv_shape[0], 0, self.kv_shape[1]), self.dtype) for _ in self.past_names]
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
        if self.io_binding:
            # OrtValues cannot be indexed in place: a round trip through the host. Greedy and
            # sampling never reorder; beam search pays this copy once per step.
            self.past = [self.runner.to_device(p.numpy()[rows]) for p in self.past]
        else:
            self.past = [p[rows] for p in self.past]
        self.mask = self.mask[rows]
