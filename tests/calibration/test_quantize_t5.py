"""Quantizing a Flan-T5 artifact: INT8 visual stages, weight-only encoder, cross-K/V and decoder,
and the decoder fidelity teacher-forced through the whole encoder-decoder."""

from __future__ import annotations

import onnx
import pytest

from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.runtime.test_parity import images


@pytest.mark.parametrize("llm, min_top1", [("int8", 0.95), ("int4", 0.3)])
def test_t5_weight_only_llm(t5_tiny_artifacts, tmp_path, llm, min_top1):
    out = tmp_path / "q"
    # A random tiny model has no right captions, so the accuracy gate is not what is tested here.
    report = quantize(t5_tiny_artifacts, out, QuantizeOptions(num_calib=16, held_out=8, gate=False,
                                                         llm=LLMOptions(precision=llm)), log=lambda s: None)
    dec = report["stages"]["decoder"]
    assert dec["positions"] > 8 and min_top1 <= dec["top1_agreement"] <= 1.0 and dec["mean_kl"] >= 0.0
    m = load_manifest(out)
    for stage in ("encoder", "cross_kv", "decoder"):
        assert m.stages[stage]["precision"] == f"{llm}-weight-only"
        graph = onnx.load(str(out / f"{stage}.onnx")).graph
        weights = {t.name for t in graph.initializer}
        assert "MatMulNBits" in {n.op_type for n in graph.node}, stage
        assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights], stage
    assert m.stages["decoder"]["quantization"]["lm_head"] == "int8"
    assert m.stages["encoder"]["quantization"]["lm_head"] is None
    texts = [r.text for r in Blip2Pipeline.from_artifacts(out).caption(images(2), max_new_tokens=5)]
    assert len(texts) == 2


@pytest.mark.parametrize("llm", ["int8", "int4"])
def test_t5_toy_quantized_passes_gates(tmp_path, llm):
    """The trained T5 toy, quantized with the default gates on: captions stay right."""
    from exporter.export import export
    from exporter.toy import CHECKPOINT_T5_DIR

    fp32 = tmp_path / "fp32"
    export(str(CHECKPOINT_T5_DIR), fp32, log=lambda s: None)
    report = quantize(fp32, tmp_path / "q", QuantizeOptions(num_calib=48, held_out=100, llm=LLMOptions(precision=llm)),
                      log=lambda s: None)
    assert all(g["passed"] for g in report["gates"])
    e2e = report["end_to_end"]
    assert e2e["fp32_accuracy"] >= 0.95
    assert report["stages"]["decoder"]["top1_agreement"] >= (0.98 if llm == "int8" else 0.9)
