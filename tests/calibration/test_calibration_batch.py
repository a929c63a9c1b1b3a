"""The vision stage's calibration runs as many images per batch as keep their intermediate
outputs within a budget (calibration/memory.py): a ViT-g from fp16 one image at a time, the toy's
ViT eight. MinMax ranges, and so the quantized graph, do not depend on it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration import memory
from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest


def scales(graph) -> dict:
    model = onnx.load(str(graph))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith(("_scale", "_zero_point"))}


def test_a_small_vision_stage_calibrates_eight_images_at_a_time(toy_artifacts):
    assert memory.vision_calibration_batch(load_manifest(toy_artifacts)) == memory.CALIB_BATCH


def test_a_vit_g_from_fp16_calibrates_one_image_at_a_time(toy_artifacts, monkeypatch):
    """blip2's ViT-g/14 at 224 in fp16: 1.97 GB of weights, 257 tokens of width 1408."""
    m = load_manifest(toy_artifacts)
    monkeypatch.setattr(memory, "artifact_weights", lambda manifest: {"stages": {"vision": {"bytes": 1.97e9}}})
    monkeypatch.setitem(m.stages["vision"], "precision", "fp16")
    monkeypatch.setitem(m.model, "num_patches", 257)
    monkeypatch.setitem(m.model, "vision_hidden", 1408)
    assert memory.vision_calibration_batch(m) == 1


@pytest.mark.parametrize("budget", [1.0, 5e6])
def test_the_batch_size_does_not_change_minmax_ranges(toy_artifacts, tmp_path, monkeypatch, budget):
    """One image per batch (a budget nothing fits), or a few, quantizes the vision stage to the
    same scales and zero points as eight."""
    kw = dict(num_calib=20, held_out=4, llm=LLMOptions(precision="none"), gate=False)
    quantize(toy_artifacts, tmp_path / "eight", QuantizeOptions(**kw), log=lambda s: None)
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", budget)
    batch = memory.vision_calibration_batch(load_manifest(toy_artifacts))
    assert batch < memory.CALIB_BATCH
    quantize(toy_artifacts, tmp_path / "fewer", QuantizeOptions(**kw), log=lambda s: None)
    a, b = scales(tmp_path / "eight" / "vision.onnx"), scales(tmp_path / "fewer" / "vision.onnx")
    assert a and sorted(a) == sorted(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
