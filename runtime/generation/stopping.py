"""Stop strings with transformers' token-level semantics, and the text a stream may show.

`StopStrings.hits(history)` is transformers' `StopStringCriteria` (4.57) without torch: a row
stops when the text of its last tokens ends with a stop string and the final token overlaps
the string's end (the stop string may begin in the prompt or inside an earlier token). Each
token is taken as its own "clean" text (the tokenizer's decoder run on the token alone, behind a
static prefix, as transformers' `clean_tokenizer_vocab` does); only the tokens a check reaches
are looked up, once each per tokenizer (TextTokenizer.token_text keeps them), so a step costs a
few string comparisons, not a decode of the row.

`stable_prefix(text, stops, ...)` is the part of a growing text that no later token can take
back: not a possible beginning of a stop string (the final text is cut there), not an
incomplete UTF-8 sequence, not a space that the tokenizer's clean-up could still remove.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

Clean = Callable[[int], "str | None"]  # token id -> its text alone (None: not in the vocabulary)


def _end_overlaps(token: str, stop: str) -> set[int]:
    """How many characters of `stop`'s end the token can hold, the stop string ending inside the
    token: a prefix of the token equals the end of `stop`, or contains all of `stop` at its end."""
    found = set()
    for n in range(1, len(token) + 1):
        prefix = token[:n]
        if prefix == stop[-n:] if n <= len(stop) else prefix.endswith(stop):
            found.add(min(n, len(stop)))
    return found


def _fits_at(token: str, stop: str, pos: int) -> bool:
    """Whether the token can sit right before the last `pos` characters of `stop` (it may run
    off the start of the string)."""
    if not 0 < pos < len(stop):
        return False
    end = len(stop) - pos
    if len(token) <= end:
        return stop[end - len(token):end] == token
    return token.endswith(stop[:end])


class StopStrings:
    def __init__(self, stops: Sequence[str], clean: Clean):
        self.stops = tuple(stops)
        self.clean = clean  # cached by its owner (TextTokenizer.token_text), shared by every request
        self.window = max((len(s) for s in self.stops), default=0)  # transformers looks no further back

    def __bool__(self) -> bool:
        return bool(self.stops)

    def row_hits(self, ids: Sequence[int]) -> bool:
        ids = list(ids)[-self.window:] if self.window else []
        if not ids:
            return False
        texts = [self.clean(int(i)) for i in reversed(ids)]  # most recent first
        if texts[0] is None:
            return False
        for stop in self.stops:
            for pos in _end_overlaps(texts[0], stop):
                for text in texts[1:]:
                    if pos >= len(stop) or text is None or not _fits_at(text, stop, pos):
                        break
                    pos += len(text)
                if pos >= len(stop):
                    return True
        return False

    def hits(self, history: np.ndarray) -> np.ndarray:
        """history (N, L) of every id each row has seen -> (N,) bool."""
        if not self.stops:
            return np.zeros(history.shape[0], dtype=bool)
        tail = history[:, -self.window:]
        return np.array([self.row_hits(row) for row in tail.tolist()], dtype=bool)


def clip(text: str, stops: Iterable[str] | None) -> str:
    """The text before the first stop string it contains."""
    cut = min((text.index(s) for s in stops or () if s in text), default=len(text))
    return text[:cut]


def stable_prefix(text: str, stops: Iterable[str] | None, volatile: Iterable[str] = ()) -> str:
    """The longest prefix of clip(text, stops) that later tokens cannot change or remove.

    stops: a stop string completed later cuts the text where it begins, so a tail that could be
        its beginning is held back. volatile: strings whose arrival rewrites the text before them
        (the tokenizer's clean-up turns " 's" into "'s"), held back alike while incomplete.
    Trailing whitespace is held back too: the final text is stripped.
    """
    text = clip(text, stops)
    cut = len(text)
    if "\ufffd" in text[-3:]:  # an incomplete UTF-8 sequence decodes as U+FFFD until its last byte
        cut = text.index("\ufffd", max(0, len(text) - 3))
    patterns = [p for p in (*(stops or ()), *volatile) if p]
    for start in range(max(0, cut - max((len(p) for p in patterns), default=0)), cut):
        tail = text[start:cut]
        if any(p.startswith(tail) for p in patterns):
            cut = start
            break
    return text[:cut].rstrip()
