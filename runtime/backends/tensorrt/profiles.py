"""TensorRT optimization profiles from the manifest's symbolic shapes.

Each dynamic dim of a stage's inputs gets a (min, opt, max) from the user's ranges; fixed model
dims (image size, hidden sizes, heads) come from the manifest as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import ArtifactError, OptionError


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int
    name: str = field(default="range", compare=False)  # what the error names: the flags it came from

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise OptionError(f"{self.name}: need 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class ProfileRanges:
    batch: Range = Range(1, 1, 4)
    sequence: Range = Range(1, 1, 64)  # tokens fed per decoder call: 1 per step, more at prefill
    past: Range = Range(0, 64, 256)  # cached positions
    # An encoder-decoder's input: query tokens (32 in BLIP-2) + prompt; fixed for a request.
    encoder: Range = Range(1, 40, 128)

    def for_dim(self, dim: str) -> Range:
        if dim == "batch":
            return self.batch
        if dim == "sequence":
            return self.sequence
        if dim == "past_sequence":
            return self.past
        if dim == "encoder_sequence":
            return self.encoder
        if dim == "total_sequence":
            return Range(self.past.min + self.sequence.min, self.past.opt + self.sequence.opt,
                         self.past.max + self.sequence.max)
        raise ArtifactError(f"no TensorRT profile range for dynamic dim '{dim}' (known: batch, sequence, "
                            "past_sequence, total_sequence)")


def stage_profile(stage: dict, ranges: ProfileRanges) -> dict[str, tuple[tuple, tuple, tuple]]:
    """input name -> (min shape, opt shape, max shape) for one stage of the manifest."""
    out = {}
    for tensor in stage["inputs"]:
        shapes = ([], [], [])
        for dim in tensor["shape"]:
            if isinstance(dim, int):
                for s in shapes:
                    s.append(dim)
            else:
                r = ranges.for_dim(dim)
                for s, v in zip(shapes, (r.min, r.opt, r.max)):
                    s.append(v)
        out[tensor["name"]] = tuple(tuple(s) for s in shapes)
    return out


# The ORT TensorRT EP's profiles for a whole pipeline: a prompt of up to this many tokens after
# the query tokens at prefill, batches up to ORT_MAX_BATCH rows (images x beams).
PROMPT_TOKENS = 64
ORT_MAX_BATCH = 16
DEFAULT_POSITION_LIMIT = 512  # a family with no position limit (T5's relative positions)


def pipeline_ranges(model: dict, position_limit: int | None) -> ProfileRanges:
    """Ranges that cover every call one pipeline makes: prefill (queries + prompt) and each
    decode step up to the model's position limit, so the ORT TensorRT EP never meets a shape
    outside its profile and never builds a second engine for a stage."""
    limit = int(position_limit or DEFAULT_POSITION_LIMIT)
    queries = int(model["num_query_tokens"])
    prefill = min(limit, queries + PROMPT_TOKENS)
    return ProfileRanges(batch=Range(1, 1, ORT_MAX_BATCH, "ORT TensorRT batch"),
                         sequence=Range(1, 1, prefill, "ORT TensorRT sequence"),
                         past=Range(0, min(limit, queries + 16), limit, "ORT TensorRT past"),
                         encoder=Range(1, min(prefill, queries + 8), prefill, "ORT TensorRT encoder"))
