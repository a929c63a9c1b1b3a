"""The stages of a BLIP-2 artifact, declared once.

The exporter builds graphs with these input/output names and symbolic dims, the validator
compares them, calibration picks its inputs from them and the runtime feeds them. A later model
family (Flan-T5's encoder stage, InstructBLIP's text-conditioned Q-Former) is a new spec here,
not an edit of every consumer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "float" is replaced by the artifact's float precision
    shape: tuple  # ints for fixed dims, strings for symbolic ones

    def resolve(self, float_dtype: str, dims: dict[str, int]) -> dict:
        """The manifest form: the concrete float dtype, fixed model dims filled in."""
        dtype = float_dtype if self.dtype == "float" else self.dtype
        shape = [dims.get(d, d) if isinstance(d, str) else d for d in self.shape]
        return {"name": self.name, "dtype": dtype, "shape": shape}


@dataclass(frozen=True)
class StageSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic dims that stay dynamic in the graph (model dims are resolved, not dynamic)."""
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in DYNAMIC_DIMS}
            if dyn:
                axes[t.name] = dyn
        return axes

    def to_manifest(self, float_dtype: str, dims: dict[str, int]) -> dict:
        return {
            "file": self.file,
            "inputs": [t.resolve(float_dtype, dims) for t in self.inputs],
            "outputs": [t.resolve(float_dtype, dims) for t in self.outputs],
        }


# Dims that vary per call; every other symbolic dim is a model dimension fixed at export.
DYNAMIC_DIMS = ("batch", "height", "width", "sequence", "past_sequence", "total_sequence")

VISION = StageSpec(
    name="vision",
    file="vision.onnx",
    inputs=(TensorSpec("pixel_values", "float", ("batch", 3, "image_size", "image_size")),),
    outputs=(TensorSpec("image_embeds", "float", ("batch", "num_patches", "vision_hidden")),),
)

QFORMER = StageSpec(
    name="qformer",
    file="qformer.onnx",
    inputs=(TensorSpec("image_embeds", "float", ("batch", "num_patches", "vision_hidden")),),
    outputs=(TensorSpec("query_embeds", "float", ("batch", "num_query_tokens", "text_hidden")),),
)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (or present_*), in the graph's order."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def decoder_spec(num_layers: int) -> StageSpec:
    """The decoder-only LLM with a KV cache. One graph serves prefill (past_sequence = 0) and
    each decode step; it returns only the last position's logits, so prefill never
    materialises (sequence x vocab) logits."""
    kv_shape = ("batch", "num_heads", "past_sequence", "head_dim")
    present_shape = ("batch", "num_heads", "total_sequence", "head_dim")
    return StageSpec(
        name="decoder",
        file="decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float", ("batch", "sequence", "text_hidden")),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
            TensorSpec("position_ids", "int64", ("batch", "sequence")),
            *(TensorSpec(n, "float", kv_shape) for n in kv_names(num_layers, "past")),
        ),
        outputs=(
            TensorSpec("logits", "float", ("batch", "vocab_size")),
            *(TensorSpec(n, "float", present_shape) for n in kv_names(num_layers, "present")),
        ),
    )
