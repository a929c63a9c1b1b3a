"""Token search over a KV-cached decoder: greedy, sampling and beam search.

The searches mirror transformers' `generate` (4.57): the same processors in the same order, the
same stopping rules (EOS, max_new_tokens, stop strings checked on the token ids as
StopStringCriteria does), and for beams the same vectorised algorithm (top 2*num_beams
continuations, finished hypotheses scored by length ** length_penalty, the same early-stopping
heuristic), so FP32 artifacts give transformers' token ids.

Each search is a generator driven by its caller: it runs one decoder step per `next()` and
returns the final rows. With `settle` (a stream) each step yields every row's *settled* tokens,
a prefix of what it will return: for greedy and sampling every token so far, for beams the
tokens all surviving hypotheses share; without it (a caller that only wants the end) a step
yields None and nothing is spent on them. A caller that stops iterating stops the work; `run`
drives a search to its end.

The decoder is anything with `step(token_ids) -> logits` (one new token per row, KV cache
carried inside) and `select(rows)` (reorder/duplicate cache rows, for beams).
"""

from __future__ import annotations

from typing import Generator, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from runtime.generation import logits as lp
from runtime.generation.id_history import IdHistory
from runtime.generation.options import GenerationOptions
from runtime.generation.stopping import StopStrings

NEG = -1.0e9  # transformers' "minus infinity" for beam bookkeeping

Rows = list[list[int]]
Search = Generator[list[Sequence[int]] | None, None, Rows]  # settled ids per step, or None


class StepDecoder(Protocol):
    def step(self, token_ids: np.ndarray) -> np.ndarray: ...  # (N,) -> (N, V)

    def select(self, rows: np.ndarray) -> None: ...


def run(search: Search) -> Rows:
    """Drives a search to its end; returns its final rows."""
    while True:
        try:
            next(search)
        except StopIteration as end:
            return end.value


def _no_stops() -> StopStrings:
    return StopStrings((), lambda i: None)


class Prefix(Sequence[int]):
    """The first n ids of a row that is only ever appended to (greedy and sampling rows): a
    snapshot that costs nothing to take, where a copy of the row each step costs O(T) a step.
    Compares equal to a list of the same ids; slices are lists."""

    __slots__ = ("_row", "_n")

    def __init__(self, row: list[int], n: int):
        self._row, self._n = row, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._row[slice(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError("Prefix index out of range")
        return self._row[i % self._n]

    def __iter__(self) -> Iterator[int]:
        return iter(self._row[: self._n])

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, tuple, Prefix)):
            return NotImplemented
        return len(other) == self._n and self._row[: self._n] == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which have none

    def __repr__(self) -> str:
        return repr(self._row[: self._n])


def greedy_or_sample(
    first_logits: np.ndarray,  # (B, V) from prefill
    decoder: StepDecoder,
    history: np.ndarray,  # (B, L0) ids as transformers sees them
    opts: GenerationOptions,
    eos_ids: tuple[int, ...],
    pad_id: int,
    stops: StopStrings | None = None,
    settle: bool = False,
) -> Search:
    """Returns every row's ids, each ending with its EOS id (or the token that completed a stop
    string) if it produced one. With `settle`, yields every row's ids so far after each step."""
    stops = stops or _no_stops()
    rng = np.random.default_rng(opts.seed)
    b = first_logits.shape[0]
    out: Rows = [[] for _ in range(b)]
    done = np.zeros(b, dtype=bool)
    scores_in = first_logits
    history = _history(history, opts, stops)
    for t in range(opts.max_new_tokens):
        scores = lp.process(scores_in.astype(np.float32), history.ids(), t, opts, eos_ids)
        if opts.do_sample:
            probs = lp.softmax(lp.warp(scores, opts).astype(np.float64))
            tokens = np.array([rng.choice(probs.shape[1], p=row / row.sum()) for row in probs])
        else:
            tokens = scores.argmax(axis=-1)
        tokens = np.where(done, pad_id, tokens)  # finished rows are padded, as transformers does
        history.append(tokens)
        live = np.flatnonzero(~done)
        for i in live:
            out[i].append(int(tokens[i]))
        # Stop strings are checked on the ids (prompt included), the last few tokens of a row.
        done[live] = np.isin(tokens[live], eos_ids)
        if stops:  # only the last `window` ids can complete a stop string
            done[live] |= stops.hits(history.tail(stops.window)[live])
        yield [Prefix(row, len(row)) for row in out] if settle else None
        if done.all() or t == opts.max_new_tokens - 1:
            break
        scores_in = decoder.step(tokens.astype(np.int64))
    return out


def _history(prompt_ids: np.ndarray, opts: GenerationOptions, stops: StopStrings) -> IdHistory:
    # Only the repetition penalty reads the whole history; stop strings read `window` ids.
    return IdHistory(prompt_ids, opts.max_new_tokens, keep_all=opts.repetition_penalty != 1.0,
                     window=stops.window)


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return seqs[0][:k]
    return seqs[0][:n]


class _Candidates(NamedTuple):
    """One step's `keep` best continuations per input, over all its beams."""

    logp: np.ndarray  # (B, keep) cumulative log-probabilities
    src_beam: np.ndarray  # (B, keep) the beam each continues
    tokens: np.ndarray  # (B, keep) the new token
    seq: np.ndarray  # (B, keep, T) the source beam's ids with the new token at step t
    hits: np.ndarray  # (B, keep) ends here: EOS, a stop string, or max_new_tokens


class _Beams:
    """A beam search's state, as transformers' vectorised beam search keeps it: per input,
    num_beams running hypotheses and the num_beams best finished ones (slot 0 the best)."""

    def __init__(self, b: int, opts: GenerationOptions, eos_ids: tuple[int, ...], pad_id: int):
        nb, max_new = opts.num_beams, opts.max_new_tokens
        self.opts, self.b, self.nb = opts, b, nb
        self.eos = np.array(eos_ids, dtype=np.int64)
        # Continuations kept per step: enough that num_beams survive even if the best ones end.
        self.keep = max(2, 1 + len(eos_ids)) * nb
        self.top_nb_mask = np.arange(self.keep) < nb
        self.run_seq = np.full((b, nb, max_new), pad_id, dtype=np.int64)
        self.run_scores = np.zeros((b, nb), dtype=np.float32)
        self.run_scores[:, 1:] = NEG  # the beams start as copies of one row: only the first counts
        self.run_src = np.zeros((b, nb), dtype=np.int64)
        self.seqs = self.run_seq.copy()
        self.seq_len = np.zeros((b, nb), dtype=np.int64)
        self.beam_scores = np.full((b, nb), NEG, dtype=np.float32)
        self.finished = np.zeros((b, nb), dtype=bool)
        self.improvable = np.ones((b, 1), dtype=bool)

    def candidates(self, logp: np.ndarray, t: int, history: IdHistory, stops: StopStrings) -> _Candidates:
        """The top `keep` continuations of each input from the processed log-probabilities
        (B*nb, V), with which of them end at this step."""
        b, nb, vocab = self.b, self.nb, logp.shape[-1]
        logp = (logp.reshape(b, nb, vocab) + self.run_scores[:, :, None]).reshape(b, nb * vocab)
        idx = np.argsort(-logp, axis=-1, kind="stable")[:, :self.keep]
        topk_logp = np.take_along_axis(logp, idx, axis=-1)
        src_beam, tokens = idx // vocab, idx % vocab
        topk_seq = np.take_along_axis(self.run_seq, src_beam[:, :, None], axis=1)
        topk_seq[:, :, t] = tokens
        hits = np.isin(tokens, self.eos) | (t + 1 >= self.opts.max_new_tokens)
        if stops:  # on each continuation's ids: its source beam's history plus the new token
            recent = history.tail(stops.window - 1).reshape(b, nb, -1)
            recent = np.take_along_axis(recent, src_beam[:, :, None], axis=1)  # (B, keep, window - 1)
            tails = np.concatenate([recent, tokens[:, :, None]], axis=-1)
            hits = hits | stops.hits(tails.reshape(b * self.keep, -1)).reshape(b, self.keep)
        return _Candidates(topk_logp, src_beam, tokens, topk_seq, hits)

    def advance(self, c: _Candidates) -> None:
        """Running beams for the next step: the best num_beams continuations that did not end."""
        running_logp = c.logp + c.hits.astype(np.float32) * NEG
        nxt = np.argsort(-running_logp, axis=-1, kind="stable")[:, :self.nb]
        self.run_seq = np.take_along_axis(c.seq, nxt[:, :, None], axis=1)
        self.run_scores = np.take_along_axis(running_logp, nxt, axis=-1)
        self.run_src = np.take_along_axis(c.src_beam, nxt, axis=-1)

    def merge_finished(self, c: _Candidates, t: int) -> None:
        """The hypotheses that ended among the top num_beams, scored by length ** length_penalty,
        merged with the finished ones kept so far."""
        opts, b = self.opts, self.b
        just_done = c.hits & self.top_nb_mask[None, :]
        cand = c.logp / ((t + 1) ** opts.length_penalty)
        cand = cand + (self.finished.all(axis=1, keepdims=True) & (opts.early_stopping is True)) * NEG
        cand = cand + (~self.improvable) * NEG + (~just_done) * NEG
        m_scores = np.concatenate([self.beam_scores, cand.astype(np.float32)], axis=1)
        m_seq = np.concatenate([self.seqs, c.seq], axis=1)
        m_len = np.concatenate([self.seq_len, np.full((b, self.keep), t + 1)], axis=1)
        m_fin = np.concatenate([self.finished, just_done], axis=1)
        best = np.argsort(-m_scores, axis=-1, kind="stable")[:, :self.nb]
        self.beam_scores = np.take_along_axis(m_scores, best, axis=-1)
        self.seqs = np.take_along_axis(m_seq, best[:, :, None], axis=1)
        self.seq_len = np.take_along_axis(m_len, best, axis=-1)
        self.finished = np.take_along_axis(m_fin, best, axis=-1)

    def can_go_on(self, c: _Candidates, t: int) -> bool:
        """transformers' early-stop heuristic (can a running beam still beat the worst finished
        hypothesis?), updating which inputs are still improvable."""
        opts = self.opts
        lpen = opts.length_penalty
        best_len = opts.max_new_tokens if (opts.early_stopping == "never" and lpen > 0.0) else t + 1
        best_running = self.run_scores[:, :1] / (best_len ** lpen)
        worst_done = np.where(self.finished, self.beam_scores.min(axis=1, keepdims=True), NEG)
        self.improvable = self.improvable & (best_running > worst_done).any(axis=-1, keepdims=True)
        all_done = self.finished.all() and opts.early_stopping is True
        return bool(self.improvable.any()) and not all_done and not c.hits.all()

    def settled(self, t: int) -> list[list[int]]:
        running = self.run_seq[:, :, : t + 1]
        return [_settled(i, self.seqs, self.seq_len, self.finished, self.beam_scores, running, self.run_scores,
                         self.improvable, self.opts, t) for i in range(self.b)]

    def next_step(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The cache rows the running beams continue (B*nb,) and their newest tokens (B*nb,)."""
        rows = (self.run_src + np.arange(self.b)[:, None] * self.nb).reshape(-1)
        return rows, self.run_seq[:, :, t].reshape(-1)

    def best(self) -> Rows:
        return [self.seqs[i, 0, : self.seq_len[i, 0]].tolist() for i in range(self.b)]


def beam_search(
    first_logits: np.ndarray,  # (B, V) from prefill, one row per input
    decoder: StepDecoder,
    history: np.ndarray,  # (B, L0)
    opts: GenerationOptions,
    eos_ids: tuple[int, ...],
    pad_id: int,
    stops: StopStrings | None = None,
    settle: bool = False,
) -> Search:
    """transformers' beam search; returns the best hypothesis per input. With `settle`, yields
    after each step the ids every hypothesis that can still win shares (running beams and
    finished ones), so a stream never shows a token the final choice does not have."""
    stops = stops or _no_stops()
    b = first_logits.shape[0]
    expand = np.repeat(np.arange(b), opts.num_beams)
    decoder.select(expand)
    logits = first_logits[expand]
    history = _history(history[expand], opts, stops)  # (B*nb, L)
    beams = _Beams(b, opts, eos_ids, pad_id)
    for t in range(opts.max_new_tokens):
        logp = lp.log_softmax(logits.astype(np.float32))
        logp = lp.process(logp, history.ids(), t, opts, eos_ids)
        candidates = beams.candidates(logp, t, history, stops)
        beams.advance(candidates)
        beams.merge_finished(candidates, t)
        go_on = beams.can_go_on(candidates, t)
        yield beams.settled(t) if settle else None
        if not go_on:
            break
        rows, step_tokens = beams.next_step(t)
        history.select(rows)
        history.append(step_tokens)
        decoder.select(rows)
        logits = decoder.step(step_tokens)
    return beams.best()


def _settled(i, seqs, seq_len, finished, beam_scores, running, run_scores, improvable, opts, t) -> list[int]:
    """Input i's ids that no later step can change. The answer is the best finished hypothesis
    (heap slot 0) unless a running beam later finishes with a higher score; a running beam's
    log-probability only falls, so its best possible score is its current one over the most
    favourable length still reachable. Settled: all of slot 0 when nothing can beat it, else
    the prefix slot 0 shares with every running beam that might."""
    best = seqs[i, 0, : seq_len[i, 0]].tolist()
    last = t + 1 >= opts.max_new_tokens
    if finished[i, 0] and (last or not improvable[i, 0] or (finished[i].all() and opts.early_stopping is True)):
        return best
    cands = [best] if finished[i, 0] else []
    for j, score in enumerate(run_scores[i]):
        reachable = max(score / (t + 2) ** opts.length_penalty, score / opts.max_new_tokens ** opts.length_penalty)
        if not finished[i, 0] or reachable >= beam_scores[i, 0] - 1e-4 * abs(beam_scores[i, 0]):  # float32 slack
            cands.append(running[i, j].tolist())
    return _common_prefix(cands) if cands else []
