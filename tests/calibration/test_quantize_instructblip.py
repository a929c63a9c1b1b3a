"""Quantizing an InstructBLIP artifact: the instruction-aware Q-Former is calibrated and checked
on the instructions it reads, the Q-Former tokenizer travels with the artifacts."""

from __future__ import annotations

import onnx

from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.runtime.test_parity import images


def test_instructblip_int8_visual_and_llm(instructblip_t5_tiny_artifacts, tmp_path):
    out = tmp_path / "q"
    # A random tiny model has no right captions: the accuracy gate is not what is tested here.
    report = quantize(instructblip_t5_tiny_artifacts, out,
                      QuantizeOptions(num_calib=16, held_out=8, gate=False, llm=LLMOptions(precision="int8")),
                      log=lambda s: None)
    assert report["stages"]["qformer"]["cosine_mean"] > 0.9
    m = load_manifest(out)
    assert m.data["architecture"] == "instructblip" and m.stages["qformer"]["precision"] == "int8"
    graph = onnx.load(str(out / "qformer.onnx")).graph
    assert [i.name for i in graph.input] == ["image_embeds", "qformer_input_ids", "qformer_attention_mask"]
    assert "QuantizeLinear" in {n.op_type for n in graph.node}
    pipe = Blip2Pipeline.from_artifacts(out)
    texts = [r.text for r in pipe.generate(images(2), ["what colour is it?", "A short image description:"],
                                           max_new_tokens=5)]
    assert len(texts) == 2
