"""The step decoder of the "shared" KV cache form (runtime.stages.KV_CACHE_FORMS): one
preallocated buffer per cache entry, bound as both the graph's past_* input and present_* output,
into which ONNX Runtime's GroupQueryAttention writes each step's keys and values in place. Nothing
is concatenated or copied per step, so a step costs the same at position 500 as at 50 apart from
the attention itself (bench/KV_CACHE_RESULTS.md).

Layout: GroupQueryAttention keeps each row's tokens at the front of its cache (right padding,
`seqlens_k` per row) and has no attention mask. transformers' decoder-only layout is
[query][left padding][prompt]; prefill moves each row's unmasked positions to the front, in
order. A token then sits at the position cumsum(mask) - 1 gives it (runtime.generation.kv_cache) and
attends to the same tokens, so the arithmetic is that of the padded layout.
"""

from __future__ import annotations

import time

import numpy as np

from runtime.errors import OptionError
from runtime.stages import INPUTS_EMBEDS, LOGITS, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, kv_names

# Positions a cache is allocated with beyond the prompt; it doubles when a step needs more.
HEADROOM = 64


def check_placement(where, float_dtype: np.dtype, device: str, backend: str, available) -> None:
    """Refuses, in one line and before any session is built, a shared-cache decoder that would
    run where ONNX Runtime cannot run its GroupQueryAttention: TensorRT does not build the contrib
    op, and ONNX Runtime's CUDA kernel takes fp16/bf16 only (an fp32 decoder's attention would
    fall back to the CPU, copying the cache across every step). `available`: ONNX Runtime's
    providers (the backends' available_providers() on this machine); without the provider a
    backend needs, building its sessions says what to install instead."""
    fix = "re-export with --kv-cache concat (the form every provider runs)"
    if backend == "onnxruntime-trt" and "TensorrtExecutionProvider" in available:
        raise OptionError(f"{where}: this decoder keeps a shared KV cache (GroupQueryAttention), which the "
                          f"TensorRT provider does not build; {fix}")
    cuda = "CUDAExecutionProvider" in available and (backend != "onnxruntime" or device in ("cuda", "auto"))
    if cuda and np.dtype(float_dtype) == np.float32:
        raise OptionError(f"{where}: this fp32 decoder keeps a shared KV cache (GroupQueryAttention), whose "
                          f"CUDA kernel is fp16/bf16 only; run it with --device cpu, {fix}, or export with --dtype fp16")


def check_artifact_placement(manifest, device: str) -> None:
    """check_placement for an artifact meant to run on `device` on another machine (a Triton
    server, quantize's GPU target): any device but the CPU counts as having CUDA."""
    from runtime.stages import kv_cache_form

    if kv_cache_form(manifest.model) == "shared":
        check_placement(manifest.where, manifest.input_dtype("decoder"), device,
                        "onnxruntime", available=("CUDAExecutionProvider",) if device != "cpu" else ())


class SharedKVCacheDecoder:
    """runtime.generation.search.StepDecoder over a decoder graph of the shared form (shared_decoder_spec).

    The buffers live on the runner's device. On the CPU they are numpy arrays that the
    OrtValues wrap without a copy; under CUDA, growing or reordering them (beam search) goes
    through the host, as KVCacheDecoder's reordering does."""

    def __init__(self, runner, embed_table: np.ndarray, model: dict, float_dtype: np.dtype):
        self.runner = runner
        self.table = embed_table
        self.dtype = np.dtype(float_dtype)
        layers = model["num_layers"]
        self.pairs = list(zip(kv_names(layers, "present"), kv_names(layers, "past")))
        self.entry = (model.get("num_kv_heads", model["num_heads"]), model["head_dim"])
        # OPT's graph reads position ids; LLaMA's rotates in GroupQueryAttention at each token's
        # cache position (the same number): shared_decoder_spec.
        self.reads_positions = POSITION_IDS in runner.input_names
        self.lengths = np.zeros(0, np.int64)  # each row's valid cache positions
        self.host: list[np.ndarray] = []  # the CPU buffers (what the OrtValues wrap)
        self.values: list = []  # OrtValues, in self.pairs' order
        self.step_times: list[float] = []
        self.prefill_times: dict[str, float] = {}

    @property
    def capacity(self) -> int:
        return self.host[0].shape[2] if self.host else (self.values[0].shape()[2] if self.values else 0)

    def _arrays(self) -> list[np.ndarray]:
        return self.host if self.runner.device == "cpu" else [v.numpy() for v in self.values]

    def _store(self, arrays: list[np.ndarray]) -> None:
        if self.runner.device == "cpu":
            self.host = arrays  # the OrtValues wrap these arrays' memory: they must stay referenced
            self.values = [self.runner.to_device(a) for a in arrays]
        else:
            self.host = []
            self.values = [self.runner.to_device(a) for a in arrays]

    def _fresh(self, batch: int, capacity: int, old: list[np.ndarray] | None = None, rows=None) -> None:
        """New zeroed buffers (positions past a row's length are never read, but zeros keep them
        finite); copies each row's valid positions over from `old` (rows: which old row)."""
        used = int(self.lengths.max()) if old is not None and len(self.lengths) else 0
        heads, head_dim = self.entry
        arrays = []
        for i in range(len(self.pairs)):
            a = np.zeros((batch, heads, capacity, head_dim), self.dtype)
            if old is not None and used:
                a[:, :, :used] = old[i][rows, :, :used] if rows is not None else old[i][:, :, :used]
            arrays.append(a)
        self._store(arrays)

    def _reserve(self, positions: int) -> None:
        """Room for `positions` per row: doubles the buffers when they are full."""
        if positions > self.capacity:
            self._fresh(len(self.lengths), max(positions, 2 * self.capacity), self._arrays())

    def _run(self, embeds: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        feeds = {INPUTS_EMBEDS: embeds.astype(self.dtype, copy=False), SEQLENS_K: seqlens_k.astype(np.int32),
                 TOTAL_SEQUENCE_LENGTH: np.array(seqlens_k.max() + 1, np.int32)}
        if self.reads_positions:
            feeds[POSITION_IDS] = positions.astype(np.int64)
        buffers = {out: (inp, value) for (out, inp), value in zip(self.pairs, self.values)}
        return self.runner.infer_in_place(feeds, buffers, host_outputs={LOGITS})[LOGITS]

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """embeds (B, S, D), mask (B, S) in transformers' layout -> logits of each row's last token (B, V)."""
        b = embeds.shape[0]
        keep = mask.astype(bool)
        self.lengths = keep.sum(axis=1).astype(np.int64)
        width = int(self.lengths.max())
        front = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # unmasked positions first, in order
        packed = np.take_along_axis(embeds, front[:, :, None], axis=1)
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (b, width))
        self.host, self.values = [], []
        self._fresh(b, width + HEADROOM)
        return self._run(packed, positions, self.lengths - 1)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """One new token per row -> next logits (B, V)."""
        t0 = time.perf_counter()
        self._reserve(int(self.lengths.max()) + 1)
        logits = self._run(self.table[token_ids][:, None, :], self.lengths[:, None], self.lengths)
        self.lengths = self.lengths + 1
        self.step_times.append(time.perf_counter() - t0)
        return logits

    def select(self, rows: np.ndarray) -> None:
        """Reorders (or duplicates) cache rows: beam search's bookkeeping. Copies each row's valid
        positions only, into new buffers (a row may be read and written by the same reorder)."""
        old = self._arrays()
        self.lengths = self.lengths[rows]
        self._fresh(len(rows), self.capacity, old, rows)
