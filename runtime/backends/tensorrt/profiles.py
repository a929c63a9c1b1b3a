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
    # InstructBLIP's instruction, in the Q-Former's tokens ([CLS] text [SEP]); fixed for a request.
    instruction: Range = Range(1, 16, 64)

    def for_dim(self, dim: str) -> Range:
        if dim == "batch":
            return self.batch
        if dim == "sequence":
            return self.sequence
        if dim == "past_sequence":
            return self.past
        if dim == "encoder_sequence":
            return self.encoder
        if dim == "instruction":
            return self.instruction
        if dim == "total_sequence":
            return Range(self.past.min + self.sequence.min, self.past.opt + self.sequence.opt,
                         self.past.max + self.sequence.max)
        raise ArtifactError(f"no TensorRT profile range for dynamic dim '{dim}' (known: batch, sequence, "
                            "past_sequence, total_sequence, encoder_sequence, instruction)")


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
