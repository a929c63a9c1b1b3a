"""Input shapes against an engine's optimization profile: refuse with the flag to rebuild with,
or split a batch above the profile's maximum into batches that fit.

Plain Python on shapes and ranges (the engine's own get_tensor_profile_shape values on a
device), so it is tested without a GPU.
"""

from __future__ import annotations

from runtime.errors import Blip2EdgeError

# The build-engines flags that set a dynamic dim's range (runtime.backends.tensorrt.cli); engines
# are built for the visual stages only, whose one dynamic dim is the batch.
DIM_FLAGS = {"batch": "batch"}


class ProfileShapeError(Blip2EdgeError):
    """An input shape outside the engine's optimization profile."""


def _remedy(dim: str | int, bound: str, value: int) -> str:
    name = DIM_FLAGS.get(dim) if isinstance(dim, str) else None
    if name is None:  # a fixed model dim (image size, hidden size): the input is wrong, not the engine
        return "the model fixes it" if not isinstance(dim, str) else "no build-engines flag sets it"
    return f"rebuild with 'blip2-edge build-engines ... --{bound}-{name} {value}'"


def batch_limit(spec_inputs: list[dict], limits: dict[str, tuple]) -> int | None:
    """The largest batch every input's profile allows, when each input's first dim is the
    manifest's 'batch'; None when some input has no batch axis (such a call is never split)."""
    if not spec_inputs or any(not t["shape"] or t["shape"][0] != "batch" for t in spec_inputs):
        return None
    return min(limits[t["name"]][2][0] for t in spec_inputs)


def check_shapes(shapes: dict[str, tuple], spec_inputs: list[dict], limits: dict[str, tuple],
                 engine: str, split_batch: bool) -> None:
    """Raises a ProfileShapeError naming the input, the dim, the profile's range and the
    build-engines flag, for any dim outside [min, max]; a batch above the maximum is allowed
    when the caller splits it (split_batch)."""
    for tensor in spec_inputs:
        name = tensor["name"]
        shape, (lo, _, hi) = tuple(shapes[name]), limits[name]
        if len(shape) != len(lo):
            raise ProfileShapeError(f"{engine}: input '{name}' has {len(shape)} dims, the engine expects {len(lo)}")
        for axis, (value, dmin, dmax, dim) in enumerate(zip(shape, lo, hi, tensor["shape"])):
            if dim == "batch" and axis == 0 and split_batch and value > dmax:
                continue
            if not dmin <= value <= dmax:
                bound = "max" if value > dmax else "min"
                raise ProfileShapeError(f"{engine}: input '{name}' dim {axis} ({dim}) is {value}, outside the engine's "
                                        f"profile [{dmin}, {dmax}]; {_remedy(dim, bound, value)}")


def batch_slices(batch: int, max_batch: int) -> list[slice]:
    """[0, batch) in consecutive slices of at most max_batch rows."""
    if max_batch < 1:
        raise ProfileShapeError(f"the engine's profile allows no batch (max {max_batch})")
    return [slice(start, min(start + max_batch, batch)) for start in range(0, batch, max_batch)]
