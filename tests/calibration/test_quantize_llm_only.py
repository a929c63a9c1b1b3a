"""`quantize --visual none`: the LLM quantized alone, the visual stages left as exported (for an
engine that runs float visual graphs faster than INT8 ones: OpenVINO bf16, TensorRT FP16)."""

from __future__ import annotations

import json

import onnx
import pytest

from calibration.llm import LLMOptions
from calibration.memory import quantize_peak
from calibration.quantize import QuantizeOptions, quantize
from runtime import synthetic
from runtime.artifact.manifest import load_manifest, sha256_file
from runtime.errors import OptionError
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def test_llm_only_keeps_the_visual_graphs_and_quantizes_the_decoder(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    proc = run_cli("quantize", toy_artifacts, out, "--visual", "none", "--llm", "int4", "--synthetic", "8",
                   "--held-out", "24")
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    for stage in ("vision", "qformer"):
        assert m.stages[stage]["precision"] == "fp32" and "quantization" not in m.stages[stage]
        assert sha256_file(out / f"{stage}.onnx") == sha256_file(toy_artifacts / f"{stage}.onnx")
    assert m.stages["decoder"]["precision"] == "int4-weight-only"
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    q = m.data["quantization"]
    assert q["visual"] is None and q["target"] is None and q["llm"]["precision"] == "int4"
    assert q["calibration_images"]["count"] == 0 and q["calibration_images"]["held_out"] == 24
    report = json.loads((out / "fidelity.json").read_text())
    # The same float visual graphs on both sides: the report measures the LLM alone.
    assert report["stages"]["vision"]["cosine_mean"] > 0.999999
    assert report["stages"]["qformer"]["cosine_mean"] > 0.999999
    assert report["stages"]["decoder"]["top1_agreement"] >= 0.98
    assert all(g["passed"] is not False for g in report["gates"])
    assert "calibrate vision" not in proc.stdout and "quantized vision" not in proc.stdout

    scenes = synthetic.make_scenes(8, seed=404)
    texts = [r.text for r in Blip2Pipeline.from_artifacts(out).caption([im for _, im in scenes])]
    assert sum(t == s.caption for t, (s, _) in zip(texts, scenes)) >= 7


def test_llm_only_on_a_t5_artifact_quantizes_each_llm_stage(t5_tiny_artifacts, tmp_path):
    out = tmp_path / "q"
    quantize(t5_tiny_artifacts, out, QuantizeOptions(num_calib=8, held_out=8, gate=False, visual=None,
                                                     llm=LLMOptions(precision="int8")), log=lambda s: None)
    m = load_manifest(out)
    for stage in ("vision", "qformer"):
        assert sha256_file(out / f"{stage}.onnx") == sha256_file(t5_tiny_artifacts / f"{stage}.onnx")
    assert {s: m.stages[s]["precision"] for s in ("encoder", "cross_kv", "decoder")} == \
        dict.fromkeys(("encoder", "cross_kv", "decoder"), "int8-weight-only")


def test_nothing_to_quantize_is_one_line_before_any_work(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", toy_artifacts, out, "--visual", "none", "--synthetic", "8"),
                          "nothing to quantize")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OptionError, match="nothing to quantize"):
        QuantizeOptions(visual=None)
    QuantizeOptions(visual=None, llm=LLMOptions(embed_fp16=True))  # the embedding table alone is something


@pytest.mark.parametrize("flags, named", [
    (["--method", "entropy"], "--method"),
    (["--activations", "int8", "--exclude", "x*"], "--activations, --exclude"),
    (["--no-per-channel"], "--per-channel"),
])
def test_visual_calibration_options_with_visual_none_are_refused(toy_artifacts, tmp_path, flags, named):
    out = tmp_path / "q"
    proc = run_cli("quantize", toy_artifacts, out, "--visual", "none", "--llm", "int4", "--synthetic", "8", *flags)
    assert_one_line_error(proc, f"{named}: ", "which --visual none skips")
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_without_visual_calibration(tiny_artifacts):
    m = load_manifest(tiny_artifacts)
    both, llm_only = quantize_peak(m, "int4"), quantize_peak(m, "int4", visual=False)
    assert set(llm_only["phases"]) == {"reference", "quantize decoder", "fidelity"}
    # No source vision stage is held while the decoder is quantized, and the fidelity phase holds
    # the float visual stages (larger than INT8 ones).
    assert llm_only["phases"]["quantize decoder"] < both["phases"]["quantize decoder"]
    assert llm_only["phases"]["fidelity"] > both["phases"]["fidelity"]


def test_int8_visual_stages_are_never_quantized_again(toy_artifacts, tmp_path):
    quantize(toy_artifacts, tmp_path / "q", QuantizeOptions(num_calib=8, held_out=8, gate=False), log=lambda s: None)
    out = tmp_path / "qq"
    assert_one_line_error(run_cli("quantize", tmp_path / "q", out, "--synthetic", "8", "--allow-requantize"),
                          "stage 'vision' is INT8 already", "--visual none")
    assert not out.exists()


def test_the_python_api_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(OptionError, match="--calibration-cache: .*--visual none skips"):
        QuantizeOptions(visual=None, llm=LLMOptions(precision="int4"), calibration_cache=tmp_path / "r.json")
    # no calibration image is read with --visual none: a count of none is no error
    assert QuantizeOptions(visual=None, llm=LLMOptions(precision="int4"), num_calib=0).calibration_images == 0


def test_a_non_finite_fidelity_is_not_recorded():
    """A broken calibration kept with --no-gate can measure NaN: the manifest's schema refuses a
    non-finite number, so recording it would make the kept directory unloadable."""
    from calibration.gates import Gates
    from calibration.quantize import record_stage_fidelity

    stages = {s: {"quantization": {"format": "QDQ"}} for s in ("vision", "qformer")}
    report = {"stages": {"vision": {"cosine_mean": float("nan"), "cosine_worst_1pct": 0.5},
                         "qformer": {"cosine_mean": 0.999, "cosine_worst_1pct": 0.99}}}
    record_stage_fidelity(stages, ("vision", "qformer"), report, Gates())
    assert "fidelity" not in stages["vision"]["quantization"]
    assert stages["qformer"]["quantization"]["fidelity"]["cosine_mean"] == 0.999
