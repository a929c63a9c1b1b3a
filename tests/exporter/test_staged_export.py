"""Stage-by-stage export (exporter/staged_weights.py) writes the same artifact, byte for byte, as
an export of the model loaded whole; a checkpoint it cannot read that way is loaded whole, and
the export says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.export import ExportOptions, export
from exporter.loading import LoadOptions, load_model, load_model_staged
from exporter.staged_weights import parameters_on_meta
from runtime.artifact.manifest import load_manifest

FAMILIES = [
    pytest.param("tiny_checkpoint", "fp32", {}, id="opt-fp32"),
    pytest.param("tiny_checkpoint", "fp16", {}, id="opt-fp16"),
    pytest.param("llama_tiny_checkpoint", "fp32", {}, id="llama-shared-cache"),
    pytest.param("llama_tiny_checkpoint", "fp16", {}, id="llama-fp16"),
    pytest.param("t5_tiny_checkpoint", "fp32", {}, id="flan-t5-fp32"),
    pytest.param("t5_tiny_checkpoint", "fp16", {}, id="flan-t5-fp16"),  # `wo` kept in float32
    pytest.param("instructblip_t5_tiny_checkpoint", "fp16", {}, id="instructblip-flan-t5-fp16"),
    pytest.param("instructblip_llama_tiny_checkpoint", "fp32", {"kv_cache": "concat"}, id="instructblip-vicuna"),
    pytest.param("retrieval_tiny_checkpoint", "fp32", {}, id="retrieval"),
]


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def export_both(source: Path, tmp_path: Path, dtype: str, **extra) -> tuple[Path, Path, list[str]]:
    """(staged export, whole-model export, the staged one's log), neither validated."""
    log: list[str] = []
    staged, whole = tmp_path / "staged", tmp_path / "whole"
    load = LoadOptions(dtype=dtype)
    export(str(source), staged, ExportOptions(load=load, validate=False, **extra), log=log.append)
    export(str(source), whole, ExportOptions(load=load, validate=False, staged=False, **extra), log=lambda s: None)
    return staged, whole, log


def assert_same_files(staged: Path, whole: Path) -> None:
    a, b = files_of(staged), files_of(whole)
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"files that differ between the staged and the whole-model export: {differ}"


@pytest.mark.parametrize("checkpoint, dtype, extra", FAMILIES)
def test_a_staged_export_is_byte_identical_to_a_whole_model_export(request, tmp_path, checkpoint, dtype, extra):
    staged, whole, log = export_both(request.getfixturevalue(checkpoint), tmp_path, dtype, **extra)
    assert any("each stage's weights read as it is exported" in line for line in log), log
    assert_same_files(staged, whole)
    assert any(p.suffix == ".onnx" for p in staged.iterdir())


def test_a_sharded_fp16_checkpoint_exported_in_fp32_is_the_same_staged(tmp_path):
    """The hub's layout (fp16 shards and an index), cast to float32 stage by stage."""
    from exporter.random_models import make_model

    ckpt = make_model("tiny", tmp_path / "ckpt", dtype="fp16", max_shard_size=200_000)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
    staged, whole, log = export_both(ckpt, tmp_path, "fp32")
    assert any("each stage's weights read as it is exported" in line for line in log), log
    assert_same_files(staged, whole)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_language_model_config_in_another_dtype_is_built_in_the_export_dtype(tmp_path, tiny_checkpoint, dtype):
    """blip2-opt-2.7b's config.json says float16 for its text_config under a float32 top level:
    from_pretrained builds every part in the dtype asked for, and so must the staged model."""
    ckpt = tmp_path / "mixed"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["torch_dtype"] = "float16" if dtype == "fp32" else "float32"
    config["vision_config"]["torch_dtype"] = "float16" if dtype == "fp32" else "float32"
    (ckpt / "config.json").write_text(json.dumps(config))
    staged, whole, log = export_both(ckpt, tmp_path, dtype)
    assert any("each stage's weights read as it is exported" in line for line in log), log
    assert_same_files(staged, whole)


def test_the_staged_weights_are_those_from_pretrained_gives(t5_tiny_checkpoint):
    """Every parameter and buffer, with its dtype (T5's `wo` and the Q-Former kept in float32 in
    an fp16 load), and the generation config, as from_pretrained gives them."""
    for dtype in ("fp32", "fp16"):
        whole, _ = load_model(str(t5_tiny_checkpoint), LoadOptions(dtype=dtype))
        model, _, weights = load_model_staged(str(t5_tiny_checkpoint), LoadOptions(dtype=dtype), log=lambda s: None)
        weights.load(model)
        a, b = whole.state_dict(), model.state_dict()
        assert sorted(a) == sorted(b)
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert any(v.dtype == torch.float32 for v in b.values()) and \
            any(v.dtype == (torch.float16 if dtype == "fp16" else torch.float32) for v in b.values())
        assert model.generation_config.to_dict() == whole.generation_config.to_dict()


def test_a_tensor_of_the_wrong_shape_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    """from_pretrained refuses a size mismatch; the staged load must not take the stored shape."""
    from runtime.errors import Blip2EdgeError

    ckpt = tmp_path / "wrong-shape"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in tensors if k.startswith("vision_model.") and k.endswith("fc1.weight"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Blip2EdgeError, match=f"{key} has shape"):
        load_model_staged(str(ckpt), LoadOptions(), log=lambda s: None)


def test_the_staged_model_holds_only_the_stage_being_exported(tiny_checkpoint):
    """Outside a stage's block every parameter is on the meta device (no memory); inside it, that
    stage's and no other's are real, and a weight two stages share is one object in both."""
    from exporter.families import export_family

    model, _, weights = load_model_staged(str(tiny_checkpoint), LoadOptions(), log=lambda s: None)
    assert weights is not None and all(p.is_meta for p in model.parameters())
    modules = export_family(model.config).modules(model)
    whole, _ = load_model(str(tiny_checkpoint), LoadOptions())
    reference = dict(whole.named_parameters())
    with weights.loaded(modules["vision"]):
        real = {n for n, p in model.named_parameters() if not p.is_meta}
        assert real and all(n.startswith("vision_model.") for n in real)
        assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters() if n in real)
    assert all(p.is_meta for p in model.parameters())
    with weights.loaded(modules["decoder"]):
        lm = model.language_model
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # OPT ties them
        assert not lm.get_input_embeddings().weight.is_meta
        assert model.vision_model.embeddings.patch_embedding.weight.is_meta
    assert all(p.is_meta for p in model.parameters())


def test_a_validated_staged_export_validates(tmp_path, t5_tiny_checkpoint):
    """Validation loads every stage back (transformers' generate needs them all) and passes."""
    report = export(str(t5_tiny_checkpoint), tmp_path / "art", ExportOptions(), log=lambda s: None)
    assert report["ok"] and report["generation"]["ok"]
    assert load_manifest(tmp_path / "art").stages


def test_names_from_pretrained_renames_load_the_whole_model(tmp_path, tiny_checkpoint):
    """A checkpoint in an older layout, whose names from_pretrained renames on load (BERT-style
    `LayerNorm.gamma` / `.beta` in the Q-Former), is exported from the whole model, the log says
    why, and the artifact is the same as from the current names."""
    ckpt = tmp_path / "renamed"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in tensors if k.startswith("qformer.") and k.endswith("LayerNorm.weight"))
    tensors[key.replace("LayerNorm.weight", "LayerNorm.gamma")] = tensors.pop(key)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    log: list[str] = []
    model, _, weights = load_model_staged(str(ckpt), LoadOptions(), log=log.append)
    assert weights is None and not any(p.is_meta for p in model.parameters())
    assert len(log) == 1 and "cannot read it stage by stage" in log[0] and key in log[0]
    renamed = tmp_path / "from-renamed"
    export(str(ckpt), renamed, ExportOptions(validate=False), log=lambda s: None)
    original = tmp_path / "from-original"
    export(str(tiny_checkpoint), original, ExportOptions(validate=False), log=lambda s: None)
    a, b = files_of(renamed), files_of(original)
    assert {k: v for k, v in a.items() if k.endswith(".onnx")} == {k: v for k, v in b.items() if k.endswith(".onnx")}


def test_pickle_weights_load_the_whole_model(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, ckpt)
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    log: list[str] = []
    report = export(str(ckpt), tmp_path / "art", ExportOptions(load=LoadOptions(allow_pickle=True)), log=log.append)
    assert report["ok"]
    assert any("cannot read it stage by stage" in line for line in log), log
    assert json.loads((tmp_path / "art" / "validation.json").read_text())["ok"]


def test_parameters_registered_under_the_meta_context_take_no_memory():
    with parameters_on_meta():
        layer = torch.nn.Linear(4096, 4096)
        norm = torch.nn.BatchNorm1d(8)
    assert layer.weight.is_meta and layer.bias.is_meta and norm.weight.is_meta
    assert not norm.running_mean.is_meta and torch.equal(norm.running_var, torch.ones(8))  # buffers stay real
    after = torch.nn.Linear(2, 2)  # the context is over
    assert not after.weight.is_meta
