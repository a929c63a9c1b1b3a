"""runtime/generation/logits.py against transformers' own logits processors and warpers on random scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime.generation import logits as lp
from runtime.generation.options import GenerationOptions

SHAPES = [(1, 7), (3, 50), (4, 300)]
SEEDS = [0, 1, 2]


def scores_for(seed: int, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Random logits: plain normal, with many ties (a few distinct values), or with extremes
    (huge magnitudes and -inf entries, as after an EOS ban)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 3, shape).astype(np.float32)
    if kind == "ties":
        return rng.integers(-2, 3, shape).astype(np.float32)
    x = rng.normal(0, 1, shape).astype(np.float32) * rng.choice([1e-3, 1.0, 80.0], shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = -np.inf
    x[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = 50.0  # every row keeps a finite best
    return x


def history_for(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    return rng.integers(0, shape[1], (shape[0], 6)).astype(np.int64)  # repeats included


def hf(processor, scores: np.ndarray, history: np.ndarray) -> np.ndarray:
    return processor(torch.from_numpy(history), torch.from_numpy(scores.copy())).numpy()


CASES = [(seed, shape, kind) for seed in SEEDS for shape in SHAPES for kind in ("normal", "ties", "extreme")]


@pytest.mark.parametrize("seed,shape,kind", CASES)
@pytest.mark.parametrize("t", [0.3, 0.7, 1.6])
def test_temperature(seed, shape, kind, t):
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    got = lp.warp(s, GenerationOptions(temperature=t, top_k=0))
    np.testing.assert_allclose(got, hf(TemperatureLogitsWarper(t), s, h), rtol=1e-6)


@pytest.mark.parametrize("seed,shape,kind", CASES)
@pytest.mark.parametrize("k", [1, 2, 5, 10_000])
def test_top_k(seed, shape, kind, k):
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    got = lp.warp(s, GenerationOptions(top_k=k))
    np.testing.assert_array_equal(got, hf(TopKLogitsWarper(k), s, h))


@pytest.mark.parametrize("seed,shape,kind", CASES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(seed, shape, kind, p):
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    got = lp.warp(s, GenerationOptions(top_k=0, top_p=p))
    assert_same_or_tie_swapped(got, hf(TopPLogitsWarper(p), s, h), kind)


def assert_same_or_tie_swapped(got: np.ndarray, want: np.ndarray, kind: str) -> None:
    """Equal; with tied scores, which of two equal tokens top-p drops at the cut-off follows
    torch.sort's order, which is not stable past 16 elements (an implementation detail no numpy
    sort reproduces): then each row must keep the same number of tokens of each value."""
    if kind != "ties":
        np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
    assert (np.isneginf(got).sum(axis=-1) == np.isneginf(want).sum(axis=-1)).all()


@pytest.mark.parametrize("seed,shape,kind", CASES)
@pytest.mark.parametrize("penalty", [0.8, 1.3, 1.5, 2.0])
def test_repetition_penalty(seed, shape, kind, penalty):
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    got = lp.process(s, h, 0, GenerationOptions(repetition_penalty=penalty), eos_ids=())
    np.testing.assert_allclose(got, hf(RepetitionPenaltyLogitsProcessor(penalty), s, h), rtol=1e-6)


@pytest.mark.parametrize("seed,shape,kind", CASES[::3])
@pytest.mark.parametrize("new_tokens", [0, 2, 3, 4])
@pytest.mark.parametrize("eos", [(0,), (1, 4)])
def test_min_new_tokens_bans_eos_until_reached(seed, shape, kind, new_tokens, eos):
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    prompt = h.shape[1] - new_tokens  # transformers counts new tokens past the prompt in input_ids
    got = lp.process(s, h, new_tokens, GenerationOptions(min_new_tokens=3), eos_ids=eos)
    want = hf(MinNewTokensLengthLogitsProcessor(prompt, 3, list(eos)), s, h)
    np.testing.assert_array_equal(got, want)
    assert np.isneginf(got[:, list(eos)]).all() == (new_tokens < 3)


@pytest.mark.parametrize("seed,shape,kind", [c for c in CASES if c[2] != "ties"])
def test_processors_and_warpers_in_transformers_order(seed, shape, kind):
    """All at once, in the order transformers' _get_logits_processor builds them. (Not on tied
    scores: torch's unstable sort orders the ties top-p sums differently, so float rounding of
    the running sum can move the cut-off by one tied token; test_top_p covers ties alone.)"""
    s, h = scores_for(seed, shape, kind), history_for(seed, shape)
    opts = GenerationOptions(repetition_penalty=1.2, min_new_tokens=2, temperature=0.7, top_k=4, top_p=0.8,
                             do_sample=True)
    eos = (shape[1] - 1,)
    got = lp.warp(lp.process(s, h, 1, opts, eos), opts)
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), MinNewTokensLengthLogitsProcessor(h.shape[1] - 1, 2, list(eos)),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(4), TopPLogitsWarper(0.8),
    ])
    np.testing.assert_allclose(got, hf(chain, s, h), rtol=1e-6)


def test_defaults_leave_scores_untouched():
    s = scores_for(0, (3, 50), "normal")
    opts = GenerationOptions(top_k=0)
    np.testing.assert_array_equal(lp.warp(lp.process(s, history_for(0, (3, 50)), 5, opts, (0,)), opts), s)


@pytest.mark.parametrize("seed,shape,kind", CASES)
def test_softmax_and_log_softmax_match_torch(seed, shape, kind):
    s = scores_for(seed, shape, kind)
    t = torch.from_numpy(s)
    np.testing.assert_allclose(lp.softmax(s), torch.softmax(t, -1).numpy(), rtol=1e-5, atol=1e-7)
    want = torch.log_softmax(t, -1).numpy()
    finite = np.isfinite(want)
    np.testing.assert_allclose(lp.log_softmax(s)[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert (np.isneginf(lp.log_softmax(s)) == np.isneginf(want)).all()
