"""Generation options, with transformers' names and semantics."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

EARLY_STOPPING_CHOICES = (True, False, "never")


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
    stop_strings: generation ends when the text contains one of these (None: the manifest's).
    eos_token_ids: token ids that end a sequence (None: the manifest's).
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

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(0 <= self.min_new_tokens <= self.max_new_tokens,
              f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        check(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        check(self.early_stopping in EARLY_STOPPING_CHOICES,
              f"early_stopping must be one of True, False, 'never'; got {self.early_stopping!r}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(not (self.do_sample and self.num_beams > 1),
              "beam sampling is not supported: use num_beams=1 with do_sample, or do_sample=False with beams")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self, **changes) -> "GenerationOptions":
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(self.names())}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None or k in ("seed",)})
