"""IdHistory keeps what a naive concatenated history would show its two readers."""

import numpy as np
import pytest

from runtime.generation.id_history import IdHistory


@pytest.mark.parametrize("keep_all", [True, False])
@pytest.mark.parametrize("window", [0, 1, 3, 9])
@pytest.mark.parametrize("prompt_len", [0, 2, 7])
def test_matches_a_concatenated_history(keep_all, window, prompt_len):
    rng = np.random.default_rng(window * 10 + prompt_len)
    n, steps = 4, 12
    naive = rng.integers(0, 50, (n, prompt_len))
    hist = IdHistory(naive, steps, keep_all=keep_all, window=window)
    for _ in range(steps):
        rows = rng.integers(0, n, n)
        naive, tokens = naive[rows], rng.integers(0, 50, n)
        hist.select(rows)
        naive = np.concatenate([naive, tokens[:, None]], axis=1)
        hist.append(tokens)
        if keep_all:
            np.testing.assert_array_equal(hist.ids(), naive)
        for k in range(window + 2):
            want = naive[:, max(0, naive.shape[1] - k):] if keep_all or k <= max(window, 1) else None
            if want is not None:
                np.testing.assert_array_equal(hist.tail(k), want)


def test_expanding_rows_for_beams():
    hist = IdHistory(np.array([[1, 2], [3, 4]]), 3, keep_all=True, window=2)
    hist.select(np.array([0, 0, 1, 1]))
    hist.append(np.array([5, 6, 7, 8]))
    np.testing.assert_array_equal(hist.ids(), [[1, 2, 5], [1, 2, 6], [3, 4, 7], [3, 4, 8]])
