"""Quantizing a LLaMA artifact: INT8 visual stages and the weight-only decoder (grouped-query
attention, untied lm_head), with the fidelity report teacher-forced through the LLaMA decoder and
the default gates on."""

from __future__ import annotations

import onnx
import pytest

from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.runtime.test_parity import PROMPTS_MIXED, images


@pytest.mark.parametrize("llm, min_top1", [("int8", 0.95), ("int4", 0.9)])
def test_llama_weight_only_decoder_passes_the_gates(llama_tiny_artifacts, tmp_path, llm, min_top1):
    out = tmp_path / "q"
    report = quantize(llama_tiny_artifacts, out, QuantizeOptions(num_calib=16, held_out=12,
                                                                 llm=LLMOptions(precision=llm)), log=lambda s: None)
    judged = [g for g in report["gates"] if g["passed"] is not None]
    assert judged and all(g["passed"] for g in judged)
    # Random weights caption nothing right: the accuracy gate cannot judge, and says so.
    accuracy = [g for g in report["gates"] if g["name"].startswith("accuracy drop")]
    assert [g["verdict"] for g in accuracy] == ["not judged"] and "random weights?" in accuracy[0]["reason"]
    dec = report["stages"]["decoder"]
    assert dec["positions"] > 12 and min_top1 <= dec["top1_agreement"] <= 1.0 and 0.0 <= dec["mean_kl"] < 1e-3
    m = load_manifest(out)
    assert m.stages["decoder"]["precision"] == f"{llm}-weight-only"
    assert m.stages["decoder"]["quantization"]["lm_head"] == "int8"
    graph = onnx.load(str(out / "decoder.onnx")).graph
    weights = {t.name for t in graph.initializer}
    # Every projection (q/k/v/o, gate/up/down, lm_head) is MatMulNBits; no float weight MatMul left.
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 7 * m.model["num_layers"] + 1
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    # The quantized artifact runs a left-padded batch with beams.
    pipe = Blip2Pipeline.from_artifacts(out)
    rows = pipe.generate(images(4), PROMPTS_MIXED, max_new_tokens=5, min_new_tokens=5, num_beams=2)
    assert [len(r.tokens) for r in rows] == [5] * 4
