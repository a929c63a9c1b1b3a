"""The stages of a BLIP-2 artifact, declared once.

The exporter builds graphs with these input/output names and symbolic dims, the validator
compares them, calibration picks its inputs from them and the runtime feeds them. A later model
family (Flan-T5's encoder stage, InstructBLIP's text-conditioned Q-Former) is a new spec here,
not an edit of every consumer. Each family declares its LLM stages in runtime/families/; the
tensor names below are the only place those strings are written.
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
# encoder_sequence: an encoder-decoder's input length (query tokens + prompt), fixed per request.
# instruction: InstructBLIP's instruction length in the Q-Former's tokens, fixed per request.
# cache_capacity: the positions a preallocated KV cache buffer holds (the "shared" KV cache form).
DYNAMIC_DIMS = ("batch", "height", "width", "sequence", "past_sequence", "total_sequence", "encoder_sequence",
                "instruction", "cache_capacity")

# Tensor names shared by the stages of every family.
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
QUERY_EMBEDS = "query_embeds"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# The shared KV cache form's (ONNX Runtime's GroupQueryAttention): each row's valid cache length
# after this run minus one, and the longest row's length.
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
QFORMER_INPUT_IDS = "qformer_input_ids"
QFORMER_ATTENTION_MASK = "qformer_attention_mask"
# Retrieval (ITC / ITM): the Q-Former's text input and the three heads' outputs.
INPUT_IDS = "input_ids"
ITC_IMAGE_EMBEDS = "itc_image_embeds"
ITC_TEXT_EMBEDS = "itc_text_embeds"
ITM_LOGITS = "itm_logits"

VISION = StageSpec(
    name="vision",
    file="vision.onnx",
    inputs=(TensorSpec(PIXEL_VALUES, "float", ("batch", 3, "image_size", "image_size")),),
    outputs=(TensorSpec(IMAGE_EMBEDS, "float", ("batch", "num_patches", "vision_hidden")),),
)

QFORMER = StageSpec(
    name="qformer",
    file="qformer.onnx",
    inputs=(TensorSpec(IMAGE_EMBEDS, "float", ("batch", "num_patches", "vision_hidden")),),
    outputs=(TensorSpec(QUERY_EMBEDS, "float", ("batch", "num_query_tokens", "text_hidden")),),
)

# InstructBLIP's: the instruction's tokens (the Q-Former's own BERT vocabulary) attend together
# with the queries; only the queries' outputs are projected to the LLM.
INSTRUCT_QFORMER = StageSpec(
    name="qformer",
    file="qformer.onnx",
    inputs=(TensorSpec(IMAGE_EMBEDS, "float", ("batch", "num_patches", "vision_hidden")),
            TensorSpec(QFORMER_INPUT_IDS, "int64", ("batch", "instruction")),
            TensorSpec(QFORMER_ATTENTION_MASK, "int64", ("batch", "instruction"))),
    outputs=(TensorSpec(QUERY_EMBEDS, "float", ("batch", "num_query_tokens", "text_hidden")),),
)


# A self-attention KV cache entry: past_* inputs, present_* outputs (one more position or more).
PAST_KV_SHAPE = ("batch", "num_heads", "past_sequence", "head_dim")
PRESENT_KV_SHAPE = ("batch", "num_heads", "total_sequence", "head_dim")
# Grouped-query attention (LLaMA): the cache holds the key/value heads only (num_kv_heads <= num_heads).
PAST_GQA_KV_SHAPE = ("batch", "num_kv_heads", "past_sequence", "head_dim")
PRESENT_GQA_KV_SHAPE = ("batch", "num_kv_heads", "total_sequence", "head_dim")
# The shared form: one preallocated buffer per entry, bound as both past_* and present_*, that the
# graph writes the new positions into; its capacity is the runtime's choice.
SHARED_KV_SHAPE = ("batch", "num_heads", "cache_capacity", "head_dim")
SHARED_GQA_KV_SHAPE = ("batch", "num_kv_heads", "cache_capacity", "head_dim")

# How a decoder graph keeps its self-attention KV cache (the manifest's model.kv_cache):
# - "concat": past_* in, past + new concatenated out (every provider, TensorRT's included);
# - "shared": ONNX Runtime's GroupQueryAttention over buffers updated in place (no copy of the
#   cache per step); CPU, and CUDA in fp16 (its kernel has no fp32). Artifacts without the key
#   are "concat", the only form before it existed.
KV_CACHE_FORMS = ("concat", "shared")
# GroupQueryAttention's kernels take head sizes of a multiple of 8 only (checked with ONNX Runtime
# 1.18 to 1.32 on the CPU): the shared form needs them.
SHARED_HEAD_MULTIPLE = 8


def kv_cache_form(model: dict) -> str:
    """The manifest's model.kv_cache; artifacts written before the key existed concatenate."""
    return model.get("kv_cache", "concat")


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (or present_*, cross_*), in the graph's order."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
