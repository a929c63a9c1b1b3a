"""Generation options, with transformers' names and semantics, checked on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

from runtime.errors import OptionError

EARLY_STOPPING_CHOICES = (True, False, "never")


class GenerationOptionError(OptionError):
    """One generation option is invalid. `option` is its API name; the CLI names the flag instead."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem

    def as_flag(self) -> "GenerationOptionError":
        """The same error naming the command-line flag (--max-new-tokens, not max_new_tokens)."""
        return GenerationOptionError("--" + self.option.replace("_", "-"), self.problem)


class PromptTooLongError(OptionError):
    """The query tokens and the prompt alone fill the model's positions."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Defaults come from the artifact's manifest where it has them.

    max_new_tokens: tokens to generate at most (the prompt is not counted).
    min_new_tokens: end-of-sequence is forbidden until this many tokens exist.
    num_beams: 1 is greedy (or sampling); more is beam search.
    length_penalty: beam scores are divided by length ** length_penalty.
    early_stopping: beam search stops when num_beams hypotheses are done (True), by
        transformers' heuristic (False), or only at max_new_tokens ("never").
    do_sample: sample from the distribution instead of taking the most likely token.
    temperature, top_k, top_p: sampling warpers, applied in that order (0 disables top_k).
    seed: seed of the sampler's random generator; same seed, same text.
    repetition_penalty: > 1 discourages tokens already in the sequence (CTRL's penalty).
    stop_strings: a sequence ends when its text ends with one of these, as transformers'
        StopStringCriteria decides (None: the manifest's); the text is cut before it.
    eos_token_ids: token ids that end a sequence (None: the manifest's).

    Counts are ints (not bools), floats are finite numbers, do_sample is a bool; anything else
    raises a GenerationOptionError (a ValueError) naming the option and what it accepts.

    `set_fields` records which options a caller set through `updated` (the pipeline's
    `options(**generation)`), as opposed to defaults: a max_new_tokens the caller asked for
    must fit the model's positions, a default one shrinks to fit. It takes no part in equality.
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] | None = None
    eos_token_ids: tuple[int, ...] | None = None
    set_fields: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        def fail(name: str, problem: str):
            raise GenerationOptionError(name, f"{problem}, got {getattr(self, name)!r}")

        def integer(name: str, low: int, high: int | None = None, what: str = "") -> None:
            v = getattr(self, name)
            if not _is_int(v) or v < low or (high is not None and v > high):
                fail(name, what or f"must be an integer >= {low}")
            object.__setattr__(self, name, int(v))  # numpy integers become plain ints

        def real(name: str, ok, what: str) -> None:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not ok(v):
                fail(name, what)
            object.__setattr__(self, name, float(v))

        integer("max_new_tokens", 1)
        integer("min_new_tokens", 0, self.max_new_tokens,
                f"must be an integer in [0, max_new_tokens={self.max_new_tokens}]")
        integer("num_beams", 1)
        integer("top_k", 0, what="must be an integer >= 0 (0 disables it)")
        if self.seed is not None:
            integer("seed", 0, what="must be a non-negative integer")
        real("length_penalty", lambda v: True, "must be a finite number")
        real("temperature", lambda v: v > 0, "must be a finite number > 0")
        real("top_p", lambda v: 0 < v <= 1, "must be a number in (0, 1]")
        real("repetition_penalty", lambda v: v > 0, "must be a finite number > 0")
        if not any(self.early_stopping is c or self.early_stopping == c and isinstance(c, str)
                   for c in EARLY_STOPPING_CHOICES):
            fail("early_stopping", "must be one of True, False, 'never'")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "must be True or False")
        if self.do_sample and self.num_beams > 1:
            raise GenerationOptionError(
                "num_beams", "> 1 with do_sample is beam sampling, which is not supported: use num_beams=1 with "
                "do_sample, or do_sample=False with beams")
        if self.stop_strings is not None:
            stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                fail("stop_strings", "must be a sequence of non-empty strings")
            object.__setattr__(self, "stop_strings", tuple(stops))
        if self.eos_token_ids is not None:
            ids = (self.eos_token_ids,) if _is_int(self.eos_token_ids) else self.eos_token_ids
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
                fail("eos_token_ids", "must be a sequence of token ids (integers >= 0)")
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))

    @classmethod
    def names(cls) -> list[str]:
        """The options' names (what `updated` and the pipeline's **generation take)."""
        return [f.name for f in fields(cls) if f.name != "set_fields"]

    def as_kwargs(self) -> dict:
        """Every option by name: passed back to `updated`, each one with a value is set."""
        return {name: getattr(self, name) for name in self.names()}

    def updated(self, **changes) -> "GenerationOptions":
        """A copy with `changes`, which join `set_fields`; a None value keeps the current value
        (except seed: None is "unseeded")."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise OptionError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(self.names())}")
        given = {k: v for k, v in changes.items() if v is not None or k == "seed"}
        return replace(self, **given, set_fields=self.set_fields | frozenset(given))

    def as_defaults(self) -> "GenerationOptions":
        """The same values, none of them set by a caller."""
        return replace(self, set_fields=frozenset())
