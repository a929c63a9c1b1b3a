"""Quantizing the toy model: gates, accuracy, the report's numbers, and a broken calibration."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration import gates as gates_mod
from calibration.fidelity import report_lines
from calibration.gates import GateError
from calibration.llm import LLMOptions
from calibration.quantize import QuantizeOptions, quantize
from calibration.sources import synthetic_source
from calibration.visual import WEIGHT_OPS, VisualOptions, write_qdq
from runtime.artifact.manifest import load_manifest, sha256_file
from runtime.pipeline import Blip2Pipeline
from runtime.preprocess import Preprocessing

QUIET = dict(log=lambda s: None)


def opts(**kw) -> QuantizeOptions:
    base = dict(num_calib=48, held_out=100)
    base.update(kw)
    return QuantizeOptions(**base)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("llm", ["int8", "int4"])
def test_toy_quantized_passes_gates(toy_artifacts, tmp_path, method, llm):
    out = tmp_path / "q"
    report = quantize(toy_artifacts, out, opts(visual=VisualOptions(method=method), llm=LLMOptions(precision=llm)),
                      **QUIET)
    assert all(g["passed"] for g in report["gates"])
    e2e = report["end_to_end"]
    assert e2e["fp32_accuracy"] >= 0.95
    assert e2e["fp32_accuracy"] - e2e["quantized_accuracy"] <= (0.03 if llm == "int4" else 0.01)
    assert report["stages"]["decoder"]["top1_agreement"] >= 0.98

    m = load_manifest(out)  # complete and intact
    assert m.stages["vision"]["precision"] == "int8" and m.stages["qformer"]["precision"] == "int8"
    assert m.stages["decoder"]["precision"] == f"{llm}-weight-only"
    q = m.data["quantization"]
    assert q["visual"]["method"] == method and q["llm"]["precision"] == llm
    assert q["calibration_images"] == {"source": "synthetic", "location": "runtime.synthetic", "count": 48,
                                       "held_out": 100, "seed": 0, "skipped_unreadable": 0}
    assert q["source_manifest_sha256"] == sha256_file(toy_artifacts / "manifest.json")
    ops = {n.op_type for n in onnx.load(str(out / "vision.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization", "Softmax"} <= ops
    dec_ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert "MatMulNBits" in dec_ops
    assert json.loads((out / "fidelity.json").read_text())["gates"] == report["gates"]


def test_layernorm_softmax_gelu_stay_float(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    quantize(toy_artifacts, out, opts(), **QUIET)
    graph = onnx.load(str(out / "vision.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            # Their inputs come straight from float ops, not from a DequantizeLinear.
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    quantized = [n for n in graph.node if n.op_type in ("MatMul", "Conv")
                 and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
    assert quantized


def test_report_numbers_recomputed_independently(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    report = quantize(toy_artifacts, out, opts(), **QUIET)
    held = synthetic_source(48, 0, 100).held_out_images()
    pre = Preprocessing.from_manifest(load_manifest(toy_artifacts).data["preprocessing"])
    pixels = np.stack([pre(im) for im in held])
    ref = ort.InferenceSession(str(toy_artifacts / "vision.onnx")).run(None, {"pixel_values": pixels})[0]
    got = ort.InferenceSession(str(out / "vision.onnx")).run(None, {"pixel_values": pixels})[0]
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    v = report["stages"]["vision"]
    assert v["tokens"] == cos.size
    assert v["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert v["cosine_worst_1pct"] == pytest.approx(np.percentile(cos, 1), abs=1e-6)
    assert v["max_abs_error"] == pytest.approx(np.abs(ref - got).max(), rel=1e-5)


def blank_folder(path, n=40):
    from PIL import Image

    path.mkdir()
    for i in range(n):
        Image.new("RGB", (96, 96), (i, i, i)).save(path / f"{i}.png")
    return path


def test_blank_image_ranges_fail_the_gate(toy_artifacts, tmp_path):
    blank = blank_folder(tmp_path / "blank")
    cache = tmp_path / "ranges.json"
    # Ranges from near-black images, kept in the cache...
    quantize(toy_artifacts, tmp_path / "blank_q", opts(images=blank, num_calib=32, calibration_cache=cache,
                                                     gate=False), **QUIET)
    data = json.loads(cache.read_text())
    assert set(data) == {"vision", "qformer"}
    assert data["vision"]["images"]["source"] == "folder" and data["vision"]["images"]["count"] == 32
    # ...relabelled as if computed on the synthetic scenes (only tampering can make them match),
    # then used for real scenes: the fidelity gate must catch them.
    synthetic_key = synthetic_source(48, 0, 100).calibration_identity()
    cache.write_text(json.dumps({stage: {**entry, "images": synthetic_key} for stage, entry in data.items()}))
    out = tmp_path / "q"
    with pytest.raises(GateError, match="fidelity gate failed: .*cosine"):
        quantize(toy_artifacts, out, opts(calibration_cache=cache), **QUIET)
    assert not out.exists()
    kept = json.loads((tmp_path / "q.fidelity.json").read_text())
    assert not all(g["passed"] for g in kept["gates"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")] == []


def test_ranges_from_other_images_are_not_reused(toy_artifacts, tmp_path):
    blank = blank_folder(tmp_path / "blank")
    cache = tmp_path / "ranges.json"
    quantize(toy_artifacts, tmp_path / "blank_q", opts(images=blank, num_calib=32, calibration_cache=cache,
                                                     gate=False), **QUIET)
    lines = []
    report = quantize(toy_artifacts, tmp_path / "q", opts(calibration_cache=cache), log=lines.append)
    assert not any("ranges from cache" in line for line in lines)  # recomputed on the scenes
    assert all(g["passed"] for g in report["gates"])
    recorded = load_manifest(tmp_path / "q").data["quantization"]["calibration_images"]
    entry = json.loads(cache.read_text())["vision"]["images"]
    assert entry == {k: recorded[k] for k in ("source", "location", "count", "seed")}  # the cache now says so


def test_cache_reuse_gives_identical_graphs(toy_artifacts, tmp_path):
    cache = tmp_path / "ranges.json"
    quantize(toy_artifacts, tmp_path / "a", opts(calibration_cache=cache), **QUIET)
    lines = []
    quantize(toy_artifacts, tmp_path / "b", opts(calibration_cache=cache), log=lines.append)  # same images
    assert sum("ranges from cache" in line for line in lines) == 2
    assert sha256_file(tmp_path / "a" / "vision.onnx") == sha256_file(tmp_path / "b" / "vision.onnx")
    lines = []
    quantize(toy_artifacts, tmp_path / "c", opts(calibration_cache=cache, num_calib=8), log=lines.append)
    assert not any("ranges from cache" in line for line in lines)  # 8 images are not the 48 the cache saw
    assert sha256_file(tmp_path / "c" / "vision.onnx") != sha256_file(tmp_path / "a" / "vision.onnx")
    assert not (tmp_path / "a" / "calibration").exists()  # no implicit-INT8 table: TensorRT reads the QDQ graph


def test_the_manifest_is_written_last(toy_artifacts, tmp_path, monkeypatch):
    """While the fidelity report runs (and until the gates pass) the new directory has no
    manifest on disk: a run killed there leaves nothing loadable."""
    from calibration import quantize as quantize_mod
    from runtime.errors import ArtifactError

    seen = {}
    real = quantize_mod.fidelity_against

    def inspecting(refs, quant):
        root = quant.manifest.root
        seen["root"], seen["on_disk"] = root, (root / "manifest.json").exists()
        with pytest.raises(ArtifactError, match="manifest.json: missing"):
            Blip2Pipeline.from_artifacts(root)
        return real(refs, quant)

    monkeypatch.setattr(quantize_mod, "fidelity_against", inspecting)
    quantize(toy_artifacts, tmp_path / "q", opts(num_calib=8, held_out=10, gate=False), **QUIET)
    assert seen["root"].name.startswith(".q.partial-") and seen["on_disk"] is False
    load_manifest(tmp_path / "q")


def test_quantized_artifacts_run_in_the_runtime_unchanged(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    quantize(toy_artifacts, out, opts(llm=LLMOptions(precision="int4", embed_fp16=True)), **QUIET)
    assert np.load(out / "embed_tokens.npy").dtype == np.float16
    from runtime import synthetic

    scenes = synthetic.make_scenes(8, seed=404)
    pipe = Blip2Pipeline.from_artifacts(out)
    texts = [r.text for r in pipe.caption([im for _, im in scenes])]
    assert sum(t == s.caption for t, (s, _) in zip(texts, scenes)) >= 7


def _activation_zero_point_types(graph_path) -> set[int]:
    graph = onnx.load(str(graph_path)).graph
    inits = {t.name: t for t in graph.initializer}
    return {inits[n.input[2]].data_type for n in graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


# Where TensorRT wants a weight's per-channel scales: its output channels (Conv [Cout, Cin, kh, kw];
# MatMul [K, N]; Gemm [N, K] with transB=1, else [K, N]).
def _output_channel_axis(node) -> int:
    if node.op_type == "Conv":
        return 0
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if node.op_type == "Gemm" and trans_b else 1


def dequantize_report(graph_path) -> dict:
    """Every DequantizeLinear of a graph: what it reads (the initializer's type, or the type of
    the QuantizeLinear feeding it), its zero points, its axis and scales, and who reads it."""
    graph = onnx.load(str(graph_path)).graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n, i))
    rows = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        x = n.input[0]
        zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if x in inits:
            dtype = inits[x].data_type
        else:  # an activation: the QuantizeLinear before it says its type
            q = producers[x]
            assert q.op_type == "QuantizeLinear"
            dtype = inits[q.input[2]].data_type if len(q.input) > 2 else onnx.TensorProto.UINT8
        rows.append({"dtype": dtype, "weight": inits.get(x),
                     "zero_points": onnx.numpy_helper.to_array(inits[zero]) if zero else np.zeros(1),
                     "axis": next((a.i for a in n.attribute if a.name == "axis"), 1),
                     "scales": onnx.numpy_helper.to_array(inits[n.input[1]]),
                     "readers": readers.get(n.output[0], [])})
    return {"rows": rows}


def check_tensorrt_readable(graph_path) -> None:
    """What TensorRT's IDequantizeLayer takes: int8 in, zero point 0 (no INT32 bias anywhere); each
    weight per channel on its output-channel axis."""
    from onnx import TensorProto

    report = dequantize_report(graph_path)
    assert report["rows"]
    for row in report["rows"]:
        assert row["dtype"] == TensorProto.INT8, TensorProto.DataType.Name(row["dtype"])
        assert not row["zero_points"].any()
        weight = row["weight"]
        if weight is None or weight.data_type != TensorProto.INT8:
            continue
        for node, index in row["readers"]:
            assert node.op_type in WEIGHT_OPS and index == 1, (node.op_type, index)  # a weight, never a bias
            axis = _output_channel_axis(node)
            assert row["axis"] == axis and row["scales"].shape == (weight.dims[axis],), (node.name, row["axis"])


def int32_biases(graph_path) -> list[str]:
    """The weight nodes whose bias is an INT32 initializer behind a DequantizeLinear."""
    from onnx import TensorProto

    return [node.op_type for row in dequantize_report(graph_path)["rows"] if row["dtype"] == TensorProto.INT32
            for node, index in row["readers"] if index == 2]


def test_default_target_is_the_cpu_with_uint8_activations(toy_artifacts, tmp_path):
    from onnx import TensorProto

    out = tmp_path / "q"
    report = quantize(toy_artifacts, out, opts(), **QUIET)
    assert all(g["passed"] for g in report["gates"])
    m = load_manifest(out)
    assert m.data["quantization"]["target"] == "cpu" and m.data["quantization"]["visual"]["activations"] == "uint8"
    for stage in ("vision", "qformer"):
        q = m.stages[stage]["quantization"]
        assert q["target"] == "cpu" and q["activations"] == "uint8 asymmetric per-tensor"
        assert q["tensorrt_compatible"] is False and q["bias"] == "int32"
        assert _activation_zero_point_types(out / f"{stage}.onnx") == {TensorProto.UINT8}
    # The CPU target keeps ONNX Runtime's INT32 bias (its CPU kernels fuse it into QLinearConv):
    # the ViT's patch embedding.
    assert int32_biases(out / "vision.onnx") == ["Conv"]
    default = load_manifest(toy_artifacts)  # the FP32 source is untouched
    assert default.data["quantization"] is None


@pytest.mark.parametrize("target", ["gpu", "portable"])
def test_gpu_and_portable_targets_give_int8_graphs(request, tmp_path, target):
    """What TensorRT can read: every DequantizeLinear int8 with zero point 0 (the patch
    embedding's bias stays in float), weights per channel on their output channels.
    (The GPU target from a concat-cache export: CUDA cannot run an fp32 shared cache.)"""
    from onnx import TensorProto

    out = tmp_path / "q"
    source = request.getfixturevalue("toy_concat_artifacts" if target == "gpu" else "toy_artifacts")
    quantize(source, out, opts(num_calib=8, held_out=8, gate=False, visual=VisualOptions(target=target)),
             **QUIET)
    m = load_manifest(out)
    assert m.data["quantization"]["target"] == target
    for stage in ("vision", "qformer"):
        q = m.stages[stage]["quantization"]
        assert q["target"] == target and q["activations"] == "int8 symmetric per-tensor"
        assert q["tensorrt_compatible"] is True and q["bias"] == "float"
        assert _activation_zero_point_types(out / f"{stage}.onnx") == {TensorProto.INT8}
        check_tensorrt_readable(out / f"{stage}.onnx")
    conv = [n for n in onnx.load(str(out / "vision.onnx")).graph.node if n.op_type == "Conv"]
    assert len(conv) == 1 and len(conv[0].input) == 3  # the bias is there, in float


def test_gpu_artifacts_with_an_int32_bias_are_refused_for_tensorrt(toy_concat_artifacts, tmp_path):
    """A directory quantized for the GPU by an earlier blip2-edge (INT32 bias, no `bias` in its
    manifest): build-engines and both TensorRT backends refuse it in one line, naming the command."""
    from runtime.errors import Blip2EdgeError
    from tests.conftest import run_cli

    out = tmp_path / "q"
    quantize(toy_concat_artifacts, out, opts(num_calib=8, held_out=8, gate=False, visual=VisualOptions(target="gpu")),
             **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("vision", "qformer"):
        del manifest["stages"][stage]["quantization"]["bias"]  # what the earlier quantize wrote
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("build-engines", out, "--int8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "stage 'vision'" in proc.stderr and "INT32 bias" in proc.stderr and "--target gpu" in proc.stderr
    for backend in ("tensorrt", "onnxruntime-trt"):
        with pytest.raises(Blip2EdgeError, match="INT32 bias, which TensorRT cannot dequantize"):
            Blip2Pipeline.from_artifacts(out, backend=backend)


def _small_graph(path) -> list[str]:
    """Conv (with bias) -> Gemm (transB=1, bias) -> Gemm (transB=0, bias) -> MatMul: every weight op
    and layout the quantizer meets. Returns the node names."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", strides=[2, 2], kernel_shape=[2, 2]),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "g1w", "g1b"], ["g1"], name="gemm_tb", transB=1),
             helper.make_node("Relu", ["g1"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "g2w", "g2b"], ["g2"], name="gemm"),
             helper.make_node("MatMul", ["g2", "mw"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [init("cw", 6, 4, 2, 2), init("cb", 6), init("g1w", 10, 96), init("g1b", 10),
                               init("g2w", 10, 5), init("g2b", 5), init("mw", 5, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return ["conv", "gemm_tb", "gemm", "matmul"]


@pytest.mark.parametrize("target", ["gpu", "portable", "cpu"])
def test_every_weight_op_quantized_for_its_target(tmp_path, target):
    """A real quantize of a small graph with every weight op: for gpu/portable nothing INT32 and
    weights per channel on the output-channel axis (Gemm with and without transB); the cpu
    target keeps its INT32 biases. Each graph still computes what the float one does."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    src = tmp_path / "small.onnx"
    nodes = _small_graph(src)
    x = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    visual = VisualOptions(target=target)
    calibrator = create_calibrator(src, list(WEIGHT_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax,
                                   extra_options={"symmetric": visual.symmetric})
    calibrator.collect_data(_Batches([{"x": x}]))
    save_tensors_data(calibrator.compute_data(), tmp_path / "ranges.json")
    out = tmp_path / "q.onnx"
    write_qdq(str(src), out, nodes, visual, tmp_path / "ranges.json", external_data=False)
    if target == "cpu":
        assert sorted(int32_biases(out)) == ["Conv", "Gemm", "Gemm"]
    else:
        check_tensorrt_readable(out)
        assert int32_biases(out) == []
        weights = [r for r in dequantize_report(out)["rows"] if r["weight"] is not None]
        assert sorted((r["readers"][0][0].name, r["axis"]) for r in weights) == \
            [("conv", 0), ("gemm", 1), ("gemm_tb", 0), ("matmul", 1)]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > 0.99


class _Batches:
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("given, resolved", [
    ({}, ("cpu", "uint8")), ({"target": "gpu"}, ("gpu", "int8")), ({"target": "portable"}, ("portable", "int8")),
    ({"activations": "uint8"}, ("cpu", "uint8")), ({"activations": "int8"}, ("portable", "int8")),
    ({"target": "gpu", "activations": "int8"}, ("gpu", "int8")),
])
def test_target_and_activations_resolve_each_other(given, resolved):
    v = VisualOptions(**given)
    assert (v.target, v.activations) == resolved


@pytest.mark.parametrize("given", [{"target": "cpu", "activations": "int8"}, {"target": "gpu", "activations": "uint8"},
                                   {"target": "portable", "activations": "uint8"}, {"target": "tpu"}])
def test_contradicting_or_unknown_target_is_an_option_error(given):
    from runtime.errors import OptionError

    with pytest.raises(OptionError, match="--target"):
        VisualOptions(**given)


def test_a_gate_that_cannot_judge_says_so():
    """Random weights (FP32 itself wrong) or images without ground truth: the accuracy gate is
    'not judged' with the reason, never a pass, and never a failure."""
    stages = {s: {"cosine_mean": 1.0, "cosine_worst_1pct": 1.0, "max_abs_error": 0.0} for s in ("vision", "qformer")}
    random = {"stages": stages, "end_to_end": {"fp32_accuracy": 0.0, "quantized_accuracy": 0.0}}
    folder = {"stages": stages, "end_to_end": {"caption_exact_match_vs_fp32": 1.0}}
    random["end_to_end"]["caption_exact_match_vs_fp32"] = 1.0
    for report, reason in ((random, "random weights?"), (folder, "no ground-truth captions")):
        accuracy = [g for g in gates_mod.evaluate(report, gates_mod.Gates(), "int8") if g["name"].startswith("accuracy")]
        assert [(g["passed"], g["verdict"]) for g in accuracy] == [(None, "not judged")] and reason in accuracy[0]["reason"]
        assert gates_mod.failures(accuracy) == []
        assert "not judged: " in report_lines({**report, "held_out_images": 1, "gates": accuracy})[-1]


@pytest.mark.parametrize("fp32, quantized, passed", [(1.0, 0.99, True), (0.99, 0.98, True), (1.0, 0.98, False)])
def test_accuracy_gate_allows_exactly_its_points(fp32, quantized, passed):
    from calibration.gates import Gates, evaluate

    stage = {"cosine_mean": 1.0, "cosine_worst_1pct": 1.0}
    report = {"stages": {"vision": stage, "qformer": stage},
              "end_to_end": {"fp32_accuracy": fp32, "quantized_accuracy": quantized}}
    accuracy = [g for g in evaluate(report, Gates(), "int8") if g["name"].startswith("accuracy")]
    assert [g["passed"] for g in accuracy] == [passed]


def test_each_quantized_visual_stage_records_its_fidelity_against_fp32(toy_artifacts, tmp_path):
    """What --backend auto judges other engines by (runtime/backends/auto.py: stage_gate). A
    later `--allow-requantize --visual none` of the LLM keeps it: the visual graphs are the same."""
    first = quantize(toy_artifacts, tmp_path / "q", opts(num_calib=8, held_out=8, gate=False), **QUIET)
    recorded = {stage: {"cosine_mean": first["stages"][stage]["cosine_mean"],
                        "cosine_worst_1pct": first["stages"][stage]["cosine_worst_1pct"],
                        "gate_cosine_mean": 0.99, "gate_cosine_worst_1pct": 0.97} for stage in ("vision", "qformer")}
    m = load_manifest(tmp_path / "q")
    assert {s: m.stages[s]["quantization"]["fidelity"] for s in ("vision", "qformer")} == recorded
    quantize(tmp_path / "q", tmp_path / "qq", opts(num_calib=8, held_out=8, gate=False, allow_requantize=True,
                                                   visual=None, llm=LLMOptions(precision="int4")), **QUIET)
    again = load_manifest(tmp_path / "qq")
    assert {s: again.stages[s]["quantization"]["fidelity"] for s in ("vision", "qformer")} == recorded
    assert again.stages["decoder"]["precision"] == "int4-weight-only"
