"""Quantize for the checkpoints people deploy (issue 21): fp16 sources, and the source freed
before the quantized artifacts load."""

from __future__ import annotations

import onnx
import pytest

from calibration.llm import LLMOptions
from calibration.quantize import quantize
from calibration.sources import synthetic_source
from calibration.visual import VisualOptions
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.calibration.test_quantize import QUIET, check_tensorrt_readable, opts


@pytest.fixture(scope="module")
def toy_fp16_artifacts(tmp_path_factory):
    from exporter.loading import LoadOptions
    from exporter.toy import CHECKPOINT_DIR
    from tests.conftest import exported

    return exported(tmp_path_factory, CHECKPOINT_DIR, "toy-fp16", load=LoadOptions(dtype="fp16"))


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_a_float16_export_quantizes(toy_fp16_artifacts, tmp_path, target):
    """An fp16 export (what a GPU runs, and the only export of a 7B model that fits this machine)
    quantizes: its visual QDQ graphs move to opset 19, the first whose DequantizeLinear takes the
    float16 scales onnxruntime's quantizer gives them (opset 17 refuses them at load), the LLM's
    MatMulNBits keep float16 scales, and the artifact captions as the FP32 toy does."""
    from onnx import TensorProto

    from runtime import synthetic

    out = tmp_path / "q"
    report = quantize(toy_fp16_artifacts, out, opts(num_calib=8, held_out=8, visual=VisualOptions(target=target),
                                                    llm=LLMOptions(precision="int4")), **QUIET)
    assert all(g["passed"] for g in report["gates"] if g["passed"] is not None)
    m = load_manifest(out)
    for stage in ("vision", "qformer"):
        model = onnx.load(str(out / f"{stage}.onnx"))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
        inits = {t.name: t for t in model.graph.initializer}
        scales = {inits[n.input[1]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear"}
        # BLIP-2 keeps the Q-Former in float32 under fp16 (its _keep_in_fp32_modules): float32 scales there.
        assert TensorProto.FLOAT16 in scales and (stage == "qformer" or scales == {TensorProto.FLOAT16}), stage
        assert m.stages[stage]["inputs"][0]["dtype"] == "float16"
        if target == "gpu":
            check_tensorrt_readable(out / f"{stage}.onnx")
    decoder = onnx.load(str(out / "decoder.onnx"))
    inits = {t.name: t for t in decoder.graph.initializer}
    nbits = [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {inits[n.input[2]].data_type for n in nbits} == {TensorProto.FLOAT16}
    assert not [n for n in decoder.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    scenes = synthetic.make_scenes(8, seed=404)
    texts = [r.text for r in Blip2Pipeline.from_artifacts(out).caption([im for _, im in scenes])]
    assert sum(t == s.caption for t, (s, _) in zip(texts, scenes)) >= 7, texts


def test_the_source_is_freed_before_the_quantized_artifacts_load(toy_artifacts, tmp_path, monkeypatch):
    """Bounded memory (issue 21): the source's FP32 side of the report is taken first, only its
    vision stage stays for calibration, and it is gone before the quantized pipeline loads; the
    report is the one the side-by-side comparison gives."""
    import gc
    import weakref

    from calibration import fidelity
    from calibration import quantize as quantize_mod
    from runtime.loaded_artifact import LoadedArtifact

    loaded, at_quantized_load = [], []
    real_loaded, real_against = quantize_mod.LoadedArtifact, quantize_mod.fidelity_against

    def loading(*args, **kwargs):
        artifact = real_loaded(*args, **kwargs)
        loaded.append(weakref.ref(artifact))
        return artifact

    def against(refs, quant):
        gc.collect()
        at_quantized_load.append(loaded[0]() is None)
        return real_against(refs, quant)

    real_visual = quantize_mod._quantize_visual

    def visual(source, *args, **kwargs):
        at_quantized_load.append(sorted(source.runners))
        return real_visual(source, *args, **kwargs)

    monkeypatch.setattr(quantize_mod, "LoadedArtifact", loading)
    monkeypatch.setattr(quantize_mod, "fidelity_against", against)
    monkeypatch.setattr(quantize_mod, "_quantize_visual", visual)
    options = opts(num_calib=8, held_out=12, llm=LLMOptions(precision="int4"))
    report = quantize(toy_artifacts, tmp_path / "q", options, **QUIET)
    assert at_quantized_load == [["vision"], True]
    # The same numbers as both pipelines side by side.
    source = synthetic_source(8, 0, 12)
    side_by_side = fidelity.fidelity_report(Blip2Pipeline(LoadedArtifact.open(toy_artifacts, "generation")),
                                            Blip2Pipeline.from_artifacts(tmp_path / "q"), source, True)
    for key in ("stages", "end_to_end", "held_out_images"):
        assert report[key] == side_by_side[key], key
