"""Export: artifact contract, parity with PyTorch/transformers, external data, atomicity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter import export as export_mod
from exporter.export import ExportOptions, export
from exporter.loading import LoadOptions
from exporter.validate import validate_artifacts, validate_stages
from runtime.artifact.manifest import MANIFEST, SCHEMA_VERSION, load_manifest, sha256_file
from runtime.pipeline import Blip2Pipeline
from runtime.stages import kv_names


def test_tiny_export_validates(tiny_artifacts):
    report = json.loads((tiny_artifacts / "validation.json").read_text())
    assert report["ok"]
    assert [s["stage"] for s in report["stages"]] == ["vision", "qformer", "decoder"]
    for s in report["stages"]:
        assert s["max_abs_diff"] <= 1e-4
    assert report["generation"]["ok"]
    assert all(c["reference"] == c["exported"] for c in report["generation"]["cases"])


# The decoder's inputs in each KV cache form (exporter --kv-cache); fp32 exports default to shared.
DECODER_INPUTS = {"shared": ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"],
                  "concat": ["inputs_embeds", "attention_mask", "position_ids"]}


@pytest.mark.parametrize("fixture, kv_cache", [("tiny_artifacts", "shared"), ("tiny_concat_artifacts", "concat")])
def test_manifest_contract(request, fixture, kv_cache, tiny_hf):
    tiny_artifacts = request.getfixturevalue(fixture)
    model, _ = tiny_hf
    m = json.loads((tiny_artifacts / MANIFEST).read_text())
    assert m["model"]["kv_cache"] == kv_cache
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["architecture"] == "blip-2" and m["llm_family"] == "opt"
    for rel, digest in m["files"].items():
        assert sha256_file(tiny_artifacts / rel) == digest
    assert {"vision.onnx", "qformer.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json",
            "preprocessor_config.json", "generation_config.json"} <= set(m["files"])
    layers = model.config.text_config.num_hidden_layers
    dec = m["stages"]["decoder"]
    first = DECODER_INPUTS[kv_cache]
    assert [i["name"] for i in dec["inputs"]] == [*first, *kv_names(layers, "past")]
    assert dec["inputs"][0]["shape"] == ["batch", "sequence", model.config.text_config.hidden_size]
    assert dec["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", model.config.text_config.vocab_size]}
    # The graph's own dims match the manifest's (symbolic names included).
    graph = onnx.load(str(tiny_artifacts / "decoder.onnx"), load_external_data=False)
    past = len(first)
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[past].type.tensor_type.shape.dim]
    assert dims == dec["inputs"][past]["shape"]
    assert dims[2] == ("cache_capacity" if kv_cache == "shared" else "past_sequence")
    # Only the shared form holds ONNX Runtime's contrib op (and imports its domain).
    ops = {n.op_type for n in graph.graph.node}
    assert ("GroupQueryAttention" in ops) == (kv_cache == "shared")
    for stage in ("vision", "qformer"):
        visual = onnx.load(str(tiny_artifacts / f"{stage}.onnx"), load_external_data=False)
        assert {o.domain for o in visual.opset_import} <= {"", "ai.onnx"}
    assert m["preprocessing"]["size"] == [32, 32] and m["preprocessing"]["resample"] == "bicubic"
    assert m["prompts"]["vqa"] == "Question: {} Answer:"
    assert m["generation"]["eos_token_ids"] == [2] and m["generation"]["stop_strings"] == ["\n"]
    assert m["tools"]["opset"] >= 17 and m["tools"]["torch"]
    # What the export used, whatever else is installed (optimum is not used).
    assert set(m["tools"]) == {"opset", "blip2-edge", "torch", "transformers", "onnx"}
    assert m["stages"]["vision"]["precision"] == "fp32"


def test_one_layernorm_op_per_layernorm(tiny_artifacts):
    graph = onnx.load(str(tiny_artifacts / "vision.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert "LayerNormalization" in ops and "ReduceMean" not in ops


def test_toy_export_validates(toy_artifacts):
    report = json.loads((toy_artifacts / "validation.json").read_text())
    assert report["ok"], report


@pytest.mark.parametrize("variant", ["post-ln", "no-bias"])
def test_opt_variants_export_with_parity(tmp_path, variant):
    from exporter.random_models import make_model

    ckpt = make_model("tiny", tmp_path / "ckpt", variant=variant)
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    if variant == "post-ln":
        assert cfg["do_layer_norm_before"] is False
    report = export(str(ckpt), tmp_path / "art", log=lambda s: None)
    assert report["ok"]
    assert report["generation"]["ok"]


def test_external_data_path(tmp_path, tiny_checkpoint, tiny_artifacts):
    out = tmp_path / "ext"
    export(str(tiny_checkpoint), out, ExportOptions(external_data_threshold=1), log=lambda s: None)
    m = load_manifest(out)
    for stage in ("vision", "qformer", "decoder"):
        data = f"{stage}.onnx.data"
        assert (out / data).is_file() and data in m.data["files"]
        assert m.stages[stage]["external_data"] == [data]
        graph = onnx.load(str(out / f"{stage}.onnx"), load_external_data=False)
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {data}  # one data file per graph, named relative to it
    # Same tokens as the inline export, from a copy elsewhere (paths are relative).
    moved = shutil.copytree(out, tmp_path / "moved")
    images = [np.full((40, 40, 3), 120, np.uint8)]
    from PIL import Image

    ims = [Image.fromarray(a) for a in images]
    a = Blip2Pipeline.from_artifacts(moved).generate(ims, ["hello"], max_new_tokens=6, stop_strings=())
    b = Blip2Pipeline.from_artifacts(tiny_artifacts).generate(ims, ["hello"], max_new_tokens=6, stop_strings=())
    assert a[0].tokens == b[0].tokens


def corrupt_one_weight(path, pick) -> None:
    """Adds 0.5 to the first value of the initializer `pick(graph)` returns, in place."""
    graph = onnx.load(str(path))
    target = pick(graph.graph)
    w = numpy_helper.to_array(target).copy()
    w.flat[0] += 0.5
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    onnx.save(graph, str(path))


def test_validator_catches_a_corrupted_weight(tmp_path, tiny_artifacts, tiny_hf):
    bad = shutil.copytree(tiny_artifacts, tmp_path / "bad")
    corrupt_one_weight(bad / "qformer.onnx", lambda g: max(g.initializer, key=lambda t: int(np.prod(t.dims))))
    model, processor = tiny_hf
    reports = {r["stage"]: r for r in validate_stages(model, processor, bad, atol=1e-4)}
    assert reports["vision"]["ok"]
    assert not reports["qformer"]["ok"] and reports["qformer"]["max_abs_diff"] > 1e-4
    full = validate_artifacts(model, processor, bad, atol=1e-4, check_generation=False)
    assert not full["ok"]


def test_failed_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    real = export_mod.export_stage

    def failing(module, spec, *args, **kwargs):
        if spec.name == "decoder":
            raise RuntimeError("injected failure")
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(export_mod, "export_stage", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        export(str(tiny_checkpoint), out, log=lambda s: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial sibling either


def test_failed_validation_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    from exporter.validate import ValidationError

    out = tmp_path / "out"
    with pytest.raises(ValidationError, match="validation failed: stage"):
        export(str(tiny_checkpoint), out, ExportOptions(atol=0.0), log=lambda s: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    export(str(tiny_checkpoint), out, ExportOptions(validate=False), log=lambda s: None)
    (out / "stale.txt").write_text("old")
    export(str(tiny_checkpoint), out, ExportOptions(validate=False, overwrite=True), log=lambda s: None)
    assert not (out / "stale.txt").exists()
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fp16_export(tmp_path, tiny_checkpoint, tiny_artifacts):
    """fp16 graphs take and give float16 (manifest and graphs agree), stay within fp16 error of
    the FP32 export on the same weights, and generate the same greedy tokens."""
    from onnx import TensorProto

    from runtime import synthetic

    out = tmp_path / "fp16"
    report = export(str(tiny_checkpoint), out, ExportOptions(load=LoadOptions(dtype="fp16")), log=lambda s: None)
    assert report["ok"]
    m = load_manifest(out)
    assert all(m.stages[s]["precision"] == "fp16" for s in ("vision", "qformer", "decoder"))
    elem = {"float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
    for stage in ("vision", "qformer", "decoder"):
        spec = m.stages[stage]
        declared = {t["name"]: t["dtype"] for t in spec["inputs"] + spec["outputs"]}
        assert {d for d in declared.values()} <= {"float16", "int64"} and "float16" in declared.values()
        graph = onnx.load(str(out / spec["file"]), load_external_data=False).graph
        actual = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
        assert actual == {name: elem[d] for name, d in declared.items()}, stage
    assert np.load(out / "embed_tokens.npy").dtype == np.float16

    fp16, fp32 = Blip2Pipeline.from_artifacts(out), Blip2Pipeline.from_artifacts(tiny_artifacts)
    images = [im for _, im in synthetic.make_scenes(6, seed=3)]
    pixels = fp32.preprocessing.batch(images)
    ref_v = fp32.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
    got_v = fp16.runners["vision"].infer({"pixel_values": pixels.astype(np.float16)})["image_embeds"]
    ref_q = fp32.runners["qformer"].infer({"image_embeds": ref_v})["query_embeds"]
    got_q = fp16.runners["qformer"].infer({"image_embeds": ref_v.astype(np.float16)})["query_embeds"]
    for ref, got in ((ref_v, got_v), (ref_q, got_q)):
        assert got.dtype == np.float16
        assert np.abs(ref - got.astype(np.float32)).max() <= 1e-2 * np.abs(ref).max()
    gen = dict(max_new_tokens=8, min_new_tokens=8, stop_strings=())
    a = [r.tokens for r in fp32.generate(images, [""] * len(images), **gen)]
    b = [r.tokens for r in fp16.generate(images, [""] * len(images), **gen)]
    assert all(len(t) == 8 for t in b)
    assert all(x[:3] == y[:3] for x, y in zip(a, b))  # exact on the first tokens
    assert np.mean([u == v for x, y in zip(a, b) for u, v in zip(x, y)]) >= 0.9  # near-ties may flip later


def test_tolerance_is_absolute_below_one_and_relative_above():
    from exporter.validate import compare

    logits = {"logits": np.array([[40.0, -3.0]], np.float32)}
    assert compare("decoder", logits, {"logits": logits["logits"] + 1e-3}, 1e-4)["ok"]  # allowed 4e-3
    assert not compare("decoder", logits, {"logits": logits["logits"] + 1e-2}, 1e-4)["ok"]
    small = {"x": np.array([0.5, -0.25], np.float32)}
    report = compare("s", small, {"x": small["x"] + 2e-4}, 1e-4)
    assert not report["ok"] and report["outputs"][0]["tolerance"] == 1e-4


@pytest.mark.parametrize("checkpoint, dtype", [("tiny_checkpoint", "fp32"), ("t5_tiny_checkpoint", "fp32"),
                                               ("llama_tiny_checkpoint", "fp16")])
def test_validation_runs_the_graphs_after_the_model_is_freed(request, tmp_path, monkeypatch, checkpoint, dtype):
    """PyTorch's references first, then the graphs, one stage's session at a time, with the torch
    model gone (issue 21: the two never hold the weights side by side); float16 graphs on sessions
    that keep one copy of the weights. The report is the one-pass validation's (every stage, the
    generate parity)."""
    import weakref

    import onnxruntime as ort

    import exporter.validate as validate_mod

    model_alive, sessions, opened, pipelines, loaded = [], [], [], [], []
    real_load, real_session, real_artifact = export_mod.load_model_staged, validate_mod.validation_session, \
        validate_mod.LoadedArtifact

    def load(*args, **kwargs):
        model, processor, weights = real_load(*args, **kwargs)
        model_alive.append(weakref.ref(model))
        return model, processor, weights

    def session(manifest, stage):
        opened.append((stage, model_alive[0]() is not None, sum(s() is not None for s in sessions)))
        runner = real_session(manifest, stage)
        sessions.append(weakref.ref(runner))
        level = runner.session.get_session_options().graph_optimization_level
        assert (level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) == (dtype == "fp16")
        return runner

    def artifact(*args, **kwargs):
        # (model alive, one-copy sessions, the stages loaded, an earlier pipeline's artifact alive)
        pipelines.append((model_alive[0]() is not None, kwargs["threads"].low_memory, kwargs["stages"],
                          any(a() is not None for a in loaded)))
        out = real_artifact(*args, **kwargs)
        loaded.append(weakref.ref(out))
        return out

    monkeypatch.setattr(export_mod, "load_model_staged", load)
    monkeypatch.setattr(validate_mod, "validation_session", session)
    monkeypatch.setattr(validate_mod, "LoadedArtifact", artifact)
    out = tmp_path / "out"
    report = export(str(request.getfixturevalue(checkpoint)), out, ExportOptions(load=LoadOptions(dtype=dtype)),
                    log=lambda s: None)
    stages = list(load_manifest(out).stages)
    assert report["ok"] and [s["stage"] for s in report["stages"]] == stages
    assert len(report["generation"]["cases"]) == 2
    assert [s for s, _, _ in opened] == stages  # each stage's session once, in order
    assert all(not alive and others == 0 for _, alive, others in opened), opened
    # The generate parity: the visual stages, freed, then the LLM's.
    visual = tuple(s for s in stages if s in ("vision", "qformer"))
    llm = tuple(s for s in stages if s not in visual)
    assert pipelines == [(False, dtype == "fp16", visual, False), (False, dtype == "fp16", llm, False)]


def test_a_corrupted_shared_cache_decoder_fails_its_deferred_check(tmp_path, tiny_artifacts, tiny_hf):
    """The shared KV cache's decoder runs through the runtime's decoder after the references pass:
    a wrong weight there still fails the decoder stage, by how much."""
    bad = shutil.copytree(tiny_artifacts, tmp_path / "bad")
    assert load_manifest(bad).model["kv_cache"] == "shared"

    def first_matmul_weight(graph):
        inits = {t.name: t for t in graph.initializer}
        return next(inits[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits)

    corrupt_one_weight(bad / "decoder.onnx", first_matmul_weight)
    model, processor = tiny_hf
    reports = {r["stage"]: r for r in validate_stages(model, processor, bad, atol=1e-4)}
    assert reports["vision"]["ok"] and reports["qformer"]["ok"]
    assert not reports["decoder"]["ok"] and reports["decoder"]["max_abs_diff"] > 1e-4
    assert any(o["name"].startswith("step.") for o in reports["decoder"]["outputs"])
