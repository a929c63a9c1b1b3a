"""Quantizing retrieval artifacts: INT8 vision and image_embed stages, a fidelity report measured
on retrieval itself (recall vs FP32, embedding cosine, recall vs ground truth) and its gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from calibration.gates import GateError, Gates
from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime import synthetic
from runtime.artifact.manifest import load_manifest
from runtime.errors import Blip2EdgeError
from runtime.retriever import Blip2Retriever

QUIET = dict(log=lambda s: None)


def test_toy_retrieval_quantized_passes_its_gates(retrieval_toy_artifacts, tmp_path):
    out = tmp_path / "q"
    report = quantize(retrieval_toy_artifacts, out, QuantizeOptions(num_calib=64, held_out=144), **QUIET)
    names = [g["name"] for g in report["gates"]]
    assert {"text to image recall@1 vs FP32", "image to text recall@5 vs FP32", "image embeddings cosine mean",
            "image_embed cosine mean", "text to image recall at 1 drop vs FP32"} <= set(names)
    assert all(g["passed"] for g in report["gates"]), [g for g in report["gates"] if not g["passed"]]
    assert report["ground_truth"]["fp32"]["text_to_image_recall_at_1"] >= 0.8  # a trained model, not noise

    m = load_manifest(out)
    assert {s: m.stages[s]["precision"] for s in m.stages} == {
        "vision": "int8", "image_embed": "int8", "text_embed": "fp32", "itm": "fp32"}
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out / "image_embed.onnx")).graph.node}
    fp32, int8 = Blip2Retriever.from_artifacts(retrieval_toy_artifacts), Blip2Retriever.from_artifacts(out)
    assert m.data["quantization"]["source_manifest_sha256"] == fp32.artifact_sha256 != int8.artifact_sha256
    assert json.loads((out / "fidelity.json").read_text())["gates"] == report["gates"]
    # The quantized artifact ranks as FP32 does on fresh scenes.
    images = [im for _, im in synthetic.make_scenes(12, seed=77)]
    texts = sorted({s.caption for s, _ in synthetic.make_scenes(12, seed=77)})
    assert (fp32.itc(images, texts).argmax(1) == int8.itc(images, texts).argmax(1)).mean() >= 0.9


def test_tiny_report_and_a_failed_gate_writes_nothing(retrieval_tiny_artifacts, tmp_path):
    out = tmp_path / "q"
    strict = Gates(recall_at_5_vs_fp32=1.01)  # unreachable
    with pytest.raises(GateError, match=r"fidelity gate failed: .*recall@5 vs FP32"):
        quantize(retrieval_tiny_artifacts, out, QuantizeOptions(num_calib=16, held_out=16, gates=strict), **QUIET)
    assert not out.exists()
    kept = json.loads(next(tmp_path.glob("*fidelity*.json")).read_text())
    r = kept["recall_vs_fp32"]
    for direction in ("text_to_image", "image_to_text"):
        assert 0.0 <= r[direction]["recall_at_1"] <= r[direction]["recall_at_5"] <= 1.0
    assert kept["held_out_images"] == 16 and kept["texts"] >= 1
    # --no-gate keeps it anyway, and the runtime loads it.
    quantize(retrieval_tiny_artifacts, out, QuantizeOptions(num_calib=16, held_out=16, gates=strict, gate=False),
             **QUIET)
    assert Blip2Retriever.from_artifacts(out).embed_texts(["x"]).shape == (1, 16)


def test_llm_options_are_refused_for_retrieval(retrieval_tiny_artifacts, tmp_path):
    with pytest.raises(Blip2EdgeError, match="a retrieval artifact has no LLM"):
        quantize(retrieval_tiny_artifacts, tmp_path / "q", QuantizeOptions(llm=LLMOptions(precision="int8")), **QUIET)
    assert not (tmp_path / "q").exists()


def test_recall_vs_reference_counts_the_reference_top1_in_the_top_k():
    from calibration.retrieval_fidelity import recall_vs_reference

    ref = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.0, 0.7]])  # rows: images, columns: texts
    got = np.array([[0.5, 0.6, 0.0], [0.2, 0.8, 0.0], [0.1, 0.0, 0.7]])  # image 0 now prefers text 1
    assert recall_vs_reference(ref, got, axis=1) == {"recall_at_1": 2 / 3, "recall_at_5": 1.0}
    # text->image: text 1's best image is still image 1 (0.8 > 0.6); all columns agree
    assert recall_vs_reference(ref, got, axis=0) == {"recall_at_1": 1.0, "recall_at_5": 1.0}
