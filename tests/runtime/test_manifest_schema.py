"""A malformed manifest is refused before anything is allocated, in one line naming the field."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from runtime.artifact.manifest import load_manifest
from runtime.artifact.schema import ARCHITECTURES, FAMILIES, validate
from runtime.errors import ArtifactError
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error

DELETE = object()


def _set(data: dict, path: str, value) -> None:
    """path: dotted keys and [i] indices, e.g. stages.vision.inputs[0].shape[2]."""
    keys: list = []
    for part in path.split("."):
        name, *idx = part.replace("]", "").split("[")
        keys.append(name)
        keys += [int(i) for i in idx]
    target = data
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


# (field to change, new value, text the one-line error must contain)
MALFORMED = [
    ("stages", DELETE, "stages: expected a value (required key is missing)"),
    ("model.num_layers", DELETE, "model.num_layers: expected a value (required key is missing)"),
    ("model", [], "model: expected an object"),
    ("model.num_heads", "4", "model.num_heads: expected an integer"),
    ("model.num_heads", -4, "model.num_heads: expected an integer in [1, 1024], got -4"),
    ("model.head_dim", 9, "model.head_dim: expected text_hidden / num_heads"),
    ("model.vocab_size", 1e30, "model.vocab_size: expected an integer"),
    ("model.max_position_embeddings", True, "model.max_position_embeddings: expected an integer"),
    ("model.image_token_id", 512, "model.image_token_id: expected an integer in [0, 511]"),
    ("preprocessing.size", [8000, 8000], "preprocessing.size[0]: expected an integer in [1, 4096], got 8000"),
    ("preprocessing.size", [-1, 32], "preprocessing.size[0]: expected an integer in [1, 4096], got -1"),
    ("preprocessing.size", [16, 16], "preprocessing.size: expected [32, 32] (model.image_size)"),
    ("preprocessing.mean", [0.5, 0.5], "preprocessing.mean: expected a list of 3 items"),
    ("preprocessing.std[1]", 0, "preprocessing.std[1]: expected a finite number > 0"),
    ("preprocessing.rescale_factor", "1/255", "preprocessing.rescale_factor: expected a finite number"),
    ("preprocessing.resample", "magic", "preprocessing.resample: expected one of bicubic, bilinear"),
    ("preprocessing.channels", "last", 'preprocessing.channels: expected "first"'),
    ("embeddings.dtype", "int8", "embeddings.dtype: expected one of float16, float32"),
    ("embeddings.shape", [512, 33], "embeddings.shape: expected [model.vocab_size, model.text_hidden] = [512, 32]"),
    ("embeddings.file", 7, "embeddings.file = 7: expected a relative path"),
    ("stages.vision.file", "", "stages.vision.file = '': expected a relative path of 1 to 1024 characters"),
    ("tokenizer.file", "tok\0.json", "tokenizer.file = 'tok\\x00.json': a path may not contain a NUL"),
    ("stages.vision.inputs[0].dtype", "float128", "stages.vision.inputs[0].dtype: expected one of"),
    ("stages.vision.inputs[0].dtype", "int64", "stages.vision.inputs[0].dtype: expected float16 or float32"),
    ("stages.vision.inputs[0].shape[2]", 8000, "stages.vision.inputs[0].shape[2]: expected 32 (model.image_size)"),
    ("stages.vision.inputs[0].shape[0]", -1, "stages.vision.inputs[0].shape[0]: expected a non-negative integer or"),
    ("stages.vision.inputs[0].shape", [1, 2, 3], "stages.vision.inputs[0].shape: expected 4 dims"),
    ("stages.decoder.inputs", [], "stages.decoder.inputs: expected a list of 1 to 4096 items"),
    ("stages.decoder.outputs[0].name", "probs", "stages.decoder.outputs: expected tensors named logits, present_key_0"),
    ("stages.decoder.inputs[4].shape[1]", 5, "stages.decoder.inputs[4].shape[1]: expected 4 (model.num_heads)"),
    ("stages.qformer", DELETE, "stages.qformer: expected a value (required stage is missing)"),
    ("stages.encoder", {}, "stages.encoder: expected only the stages of llm_family 'opt'"),
    ("stages.vision.precision", None, "stages.vision.precision: expected a non-empty string"),
    ("stages.vision.external_data", "vision.onnx.data", "stages.vision.external_data: expected a list"),
    ("llm_family", "gpt5", "llm_family: expected one of "),
    ("architecture", "blip-3", "architecture: expected one of blip-2"),
    ("generation.eos_token_ids[0]", -1, "generation.eos_token_ids[0]: expected an integer in [0, 511], got -1"),
    ("generation.pad_token_id", 10**9, "generation.pad_token_id: expected an integer in [0, 511]"),
    ("generation.stop_strings", [""], "generation.stop_strings[0]: expected a non-empty string"),
    ("generation.max_new_tokens", 0, "generation.max_new_tokens: expected an integer in [1, "),
    ("tokenizer.prefix_ids", "2", "tokenizer.prefix_ids: expected a list"),
    ("tokenizer.file", DELETE, "tokenizer.file: expected a value (required key is missing)"),
    ("prompts.vqa", "{0} {1}", "prompts.vqa: expected a template with at most one '{}' placeholder"),
    ("prompts.vqa", "Q: {} A: {}", "prompts.vqa: expected a template with at most one '{}' placeholder"),
    ("prompts.caption_prefix", "{0.__class__}", "prompts.caption_prefix: expected a template with at most one"),
    ("prompts.caption_prefix", "{!r}", "prompts.caption_prefix: expected a template with at most one"),
    ("prompts.caption_prefix", "{:>99999999}", "prompts.caption_prefix: expected a template with at most one"),
    ("prompts.caption_prefix", "{", "prompts.caption_prefix: expected a template with at most one"),
    ("prompts.caption", ["a"], "prompts.caption: expected a string"),
    ("files", ["vision.onnx"], "files: expected an object mapping relative paths to sha256 digests"),
    ("files.vision\\.onnx", "abc", "files['vision.onnx']: expected a sha256 digest"),
    # InstructBLIP's section in a BLIP-2 manifest: its file would be read, never verified.
    ("qformer_tokenizer", {"file": "unlisted.json"}, "qformer_tokenizer: expected absent (architecture 'blip-2'"),
    ("model.num_kv_heads", -1, "model.num_kv_heads: expected absent (not a model key of this blip-2 artifact)"),
]


@pytest.fixture(scope="module")
def manifest_data(tiny_artifacts) -> dict:
    return json.loads((tiny_artifacts / "manifest.json").read_text())


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_artifacts):
    return shutil.copytree(tiny_artifacts, tmp_path_factory.mktemp("schema") / "art")


def _write(art, data) -> None:
    (art / "manifest.json").write_text(json.dumps(data))


def test_the_exporters_manifest_is_valid(manifest_data):
    loaded = dict(validate(copy.deepcopy(manifest_data)))
    assert loaded == {"stages.vision.file": "vision.onnx", "stages.qformer.file": "qformer.onnx",
                      "stages.decoder.file": "decoder.onnx", "embeddings.file": "embed_tokens.npy",
                      "tokenizer.file": "tokenizer.json"}


@pytest.mark.parametrize("field, value, message", MALFORMED, ids=[f"{f}={v!r}"[:60] for f, v, _ in MALFORMED])
def test_malformed_manifest_names_the_field(art, manifest_data, field, value, message):
    data = copy.deepcopy(manifest_data)
    if field.startswith("files."):
        data["files"]["vision.onnx"] = value
    else:
        _set(data, field, value)
    _write(art, data)
    with pytest.raises(ArtifactError) as err:
        load_manifest(art)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"{art / 'manifest.json'}: ")
    if value is DELETE:
        assert text.endswith(message)  # nothing to show of a missing value


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "not a blip2-edge manifest"),
    ('{"format": "blip2-edge-artifacts", "schema_version": "1"}', "schema version '1' is not supported"),
    ('{"format": "blip2-edge-artifacts", "schema_version": true}', "schema version True is not supported"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ("{not json", "not valid JSON"),
])
def test_unreadable_manifests(art, text, message):
    (art / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(art)


def test_family_registry_is_one_lookup():
    assert "opt" in FAMILIES and "blip-2" in ARCHITECTURES


def test_cli_on_a_malformed_manifest_exits_2_without_traceback(tmp_path, tiny_artifacts, manifest_data):
    art = shutil.copytree(tiny_artifacts, tmp_path / "art")
    data = copy.deepcopy(manifest_data)
    data["preprocessing"]["size"] = [8000, 8000]
    _write(art, data)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    proc = run_cli("caption", art, tmp_path / "x.png")
    assert_one_line_error(proc, "preprocessing.size[0]", "8000")
    assert "Traceback" not in proc.stderr


def test_oversized_manifest_is_refused_unread(art, manifest_data):
    from runtime.artifact.manifest import MAX_MANIFEST_BYTES

    text = json.dumps(manifest_data)
    (art / "manifest.json").write_text(text + " " * (MAX_MANIFEST_BYTES + 1 - len(text)))
    assert (art / "manifest.json").stat().st_size == MAX_MANIFEST_BYTES + 1
    with pytest.raises(ArtifactError, match="larger than 16 MB"):
        load_manifest(art)
    (art / "manifest.json").write_text(text + " " * (MAX_MANIFEST_BYTES - len(text)))  # at the limit: fine
    assert load_manifest(art).model["vocab_size"] == 512
    _write(art, manifest_data)


def test_a_family_declares_its_own_stages(monkeypatch, manifest_data):
    """Adding a family is an entry in FAMILIES (here: OPT plus an `encoder` stage, as Flan-T5 has)."""
    import dataclasses

    from runtime.artifact.schema import FamilySchema
    from runtime.stages import QFORMER

    opt = FAMILIES["opt"]
    encoder = dataclasses.replace(QFORMER, name="encoder", file="encoder.onnx")
    schema = FamilySchema(model=opt.model, checks=opt.checks, optional_model=opt.optional_model,
                          stage_specs=lambda m: {**opt.stage_specs(m), "encoder": encoder})
    monkeypatch.setitem(FAMILIES, "toy-encoder", schema)
    data = copy.deepcopy(manifest_data)
    data["llm_family"] = "toy-encoder"
    data["stages"]["encoder"] = {**copy.deepcopy(data["stages"]["qformer"]), "file": "encoder.onnx"}
    data["files"]["encoder.onnx"] = data["files"]["qformer.onnx"]
    assert ("stages.encoder.file", "encoder.onnx") in validate(copy.deepcopy(data))
    del data["stages"]["encoder"]
    with pytest.raises(Exception, match=r"stages\.encoder: expected a value \(required stage is missing\)"):
        validate(data)
