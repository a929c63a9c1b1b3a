"""Weight-only quantization of the LLM stages with ONNX Runtime's MatMulNBits (INT8 or INT4):
the decoder, and for encoder-decoder families (Flan-T5) the encoder and cross-K/V graphs too.

Decoding one token at batch 1 reads every weight once and does little arithmetic with it: it is
bound by memory bandwidth, so bytes per weight is what sets its speed. Activations stay in
float; weights are stored in blocks of `block_size` with one scale each.

lm_head is a deliberate choice: its errors land directly on the logits that pick each token,
and for OPT-125m it is a third of the decoder's bytes. By default it is quantized to INT8 even
when the body is INT4 (4x smaller than fp32, top-1 rarely changes); `--lm-head float` keeps it
exact, `--lm-head same` gives it the body's precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibration.nbits_streaming import has_subgraphs, quantize_matmuls_streaming
from runtime.artifact.writer import EXTERNAL_DATA_THRESHOLD
from runtime.backends.onnxrt import import_onnxruntime
from runtime.errors import ArtifactError, OptionError
from runtime.stages import LOGITS

LLM_CHOICES = ("none", "int8", "int4")
LM_HEAD_CHOICES = ("int8", "float", "same")
# One scale per 128 weights, for INT8 and INT4 alike: measured in bench/NBITS_RESULTS.md. On the
# bench decoder (accuracy level 4, 40 interleaved rounds) a step took 4.36 ms at 128 against
# 5.25 at 32 for INT4 (x0.83) and 5.49 against 6.26 for INT8 (x0.88), with 11% / 8% fewer bytes;
# on the trained OPT, Flan-T5 and LLaMA toys, 128 kept the same decoder top-1 agreement
# (>= 0.9994) and caption exact match as 32 (INT4 KL vs FP32 ~2e-6 -> ~5e-6, INT8 <= 6e-7).
# 128 is also ONNX Runtime's own default and the usual GPTQ/AWQ group size.
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class LLMOptions:
    precision: str = "none"
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4  # int8 activations inside the kernel (CPU); ignored by other providers
    lm_head: str = "int8"
    embed_fp16: bool = False

    def __post_init__(self) -> None:
        if self.precision not in LLM_CHOICES:
            raise OptionError(f"unknown --llm '{self.precision}'; valid: {', '.join(LLM_CHOICES)}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise OptionError(f"unknown --lm-head '{self.lm_head}'; valid: {', '.join(LM_HEAD_CHOICES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OptionError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OptionError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.precision]


def lm_head_node(model, src: Path) -> str:
    """The MatMul that produces the `logits` output (through at most an Add for a bias); `src`
    names the graph file in the error."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(LOGITS)
    while node is not None and node.op_type in ("Add", "Identity", "Cast"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise ArtifactError(f"{src}: decoder graph has no lm_head MatMul feeding '{LOGITS}'")
    return node.name


def quantize_decoder(src: Path, dst: Path, opts: LLMOptions, has_lm_head: bool = True,
                     streaming: bool | None = None) -> dict:
    """Writes the weight-only quantized LLM graph to `dst`; returns its settings for the
    manifest. `has_lm_head`: the graph produces the logits (its lm_head follows --lm-head).
    `streaming`: one weight at a time (calibration/nbits_streaming.py); None: when the source
    keeps its weights in an external data file (a graph over 2 GB, which onnx.load would hold
    whole, twice over with the quantizer's copies)."""
    import onnx

    MatMulNBitsQuantizer = import_onnxruntime("quantization.matmul_nbits_quantizer").MatMulNBitsQuantizer

    structure = onnx.load(str(src), load_external_data=False)
    head = lm_head_node(structure, src) if has_lm_head else None
    head_bits = {"float": None, "same": opts.bits, "int8": 8}[opts.lm_head] if has_lm_head else opts.bits
    settings = dict(block_size=opts.block_size, is_symmetric=True, accuracy_level=opts.accuracy_level)
    if streaming is None:  # graphs with If/Loop/Scan go through the whole-graph pass, which looks inside them
        streaming = not has_subgraphs(structure) and any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in structure.graph.initializer)
    if streaming:
        quantize_matmuls_streaming(src, dst, lambda node: head_bits if node.name == head else opts.bits, settings)
        external = True
    else:
        model = onnx.load(str(src))

        def run(model, bits, include=None, exclude=None):
            q = MatMulNBitsQuantizer(model, bits=bits, nodes_to_include=include, nodes_to_exclude=exclude, **settings)
            q.process()
            return q.model.model

        if head_bits == opts.bits:
            model = run(model, opts.bits)
        else:
            model = run(model, opts.bits, exclude=[head])
            if head_bits is not None:
                model = run(model, head_bits, include=[head])
        size = sum(len(t.raw_data) for t in model.graph.initializer)
        external = size > EXTERNAL_DATA_THRESHOLD
        onnx.save_model(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
    return {"method": "MatMulNBits weight-only", "bits": opts.bits, "block_size": opts.block_size,
            "symmetric": True, "accuracy_level": opts.accuracy_level,
            "lm_head": ("float" if head_bits is None else f"int{head_bits}") if has_lm_head else None,
            "external_data": external}
