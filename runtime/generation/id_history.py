"""The ids each search row has seen, kept so that one decode step costs O(1) in the length.

Two consumers look back: the repetition penalty reads every id a row has seen (prompt
included), stop strings read only the last `window` ids. A search used to concatenate the whole
history every step (O(T) a step, O(T^2) a request). Here the buffer is allocated once:
- when the penalty is on, with room for the prompt and every new token (appending writes one
  column; beam search's row reordering still copies the rows, as the penalty needs them all);
- otherwise only the last `window` ids are kept (appending shifts `window` columns).
"""

from __future__ import annotations

import numpy as np


class IdHistory:
    def __init__(self, prompt_ids: np.ndarray, max_new: int, keep_all: bool, window: int):
        n, length = prompt_ids.shape
        width = length + max_new if keep_all else max(window, 1)
        self._buf = np.zeros((n, width), dtype=np.int64)
        kept = prompt_ids[:, max(0, length - width):]
        self._buf[:, : kept.shape[1]] = kept
        self._len = kept.shape[1]  # valid columns, from the left
        self._keep_all = keep_all

    def ids(self) -> np.ndarray:
        """(N, L) the ids kept: all of them when the history keeps all, else the last `window`."""
        return self._buf[:, : self._len]

    def tail(self, k: int) -> np.ndarray:
        """(N, min(k, L)) the last k ids kept."""
        return self._buf[:, max(0, self._len - k): self._len]

    def append(self, tokens: np.ndarray) -> None:
        if self._len == self._buf.shape[1]:
            if self._keep_all:  # sized for the prompt + max_new, so a search never gets here
                raise RuntimeError("IdHistory is full")
            self._buf[:, :-1] = self._buf[:, 1:]
            self._len -= 1
        self._buf[:, self._len] = tokens
        self._len += 1

    def select(self, rows: np.ndarray) -> None:
        """Reorders (and duplicates) rows, for beams: copies the valid columns only."""
        if len(rows) == self._buf.shape[0]:
            self._buf[:, : self._len] = self._buf[rows, : self._len]
        else:
            self._buf = self._buf[rows]
