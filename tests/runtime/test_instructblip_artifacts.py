"""InstructBLIP artifacts across the consumers of a manifest: the schema accepts the exporter's
and refuses broken ones naming the field; the family registry selects by architecture +
llm_family; TensorRT profiles take the instruction length as a dynamic dim; the profiler and
make-model know the architecture."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from runtime.artifact.manifest import load_manifest
from runtime.artifact.schema import validate
from runtime.errors import ArtifactError
from runtime.families import family_for, get_family
from tests.conftest import run_cli
from tests.runtime.test_manifest_schema import DELETE, _set


@pytest.fixture(scope="module")
def manifest_data(instructblip_t5_tiny_artifacts):
    return json.loads((instructblip_t5_tiny_artifacts / "manifest.json").read_text())


def test_the_exporters_instructblip_manifest_is_valid(manifest_data):
    assert manifest_data["architecture"] == "instructblip" and manifest_data["llm_family"] == "t5"
    loaded = dict(validate(copy.deepcopy(manifest_data)))
    assert loaded["qformer_tokenizer.file"] == "qformer_tokenizer/tokenizer.json"
    assert loaded["stages.qformer.file"] == "qformer.onnx"
    q = manifest_data["stages"]["qformer"]["inputs"]
    assert [(t["name"], t["shape"]) for t in q[1:]] == [("qformer_input_ids", ["batch", "instruction"]),
                                                       ("qformer_attention_mask", ["batch", "instruction"])]
    assert manifest_data["prompts"]["vqa"] == "{}"  # the instruction itself, as the processor takes it


# (field to change, new value, text the one-line error must contain)
MALFORMED = [
    ("qformer_tokenizer", DELETE, "qformer_tokenizer: expected a value (required key is missing)"),
    ("qformer_tokenizer.padding_side", "middle", "qformer_tokenizer.padding_side: expected one of left, right"),
    ("qformer_tokenizer.pad_token_id", 300, "qformer_tokenizer.pad_token_id: expected an integer in [0, 299]"),
    ("qformer_tokenizer.prefix_ids", [5000], "qformer_tokenizer.prefix_ids[0]: expected an integer in [0, 299]"),
    ("qformer_tokenizer.file", "../tokenizer.json", "'..' is not allowed"),
    ("model.qformer_max_positions", DELETE, "model.qformer_max_positions: expected a value"),
    ("llm_family", "gpt2", 'llm_family: expected one of llama, opt, t5, got "gpt2"'),
    # Another LLM family's manifest under the same stages: that family's model keys are missing.
    ("llm_family", "opt", "model.max_position_embeddings: expected a value (required key is missing)"),
    ("stages.qformer.inputs", [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 17, 32]}],
     "stages.qformer.inputs: expected tensors named image_embeds, qformer_input_ids, qformer_attention_mask"),
    ("stages.qformer.inputs[1].shape[1]", "sequence",
     'stages.qformer.inputs[1].shape[1]: expected "instruction" (a dynamic dim)'),
    ("stages.qformer.inputs[2].dtype", "float32", "stages.qformer.inputs[2].dtype: expected int64"),
]


@pytest.mark.parametrize("field, value, message", MALFORMED, ids=[f"{f}={v!r}"[:50] for f, v, _ in MALFORMED])
def test_malformed_instructblip_manifest_names_the_field(tmp_path, instructblip_t5_tiny_artifacts, manifest_data,
                                                         field, value, message):
    art = shutil.copytree(instructblip_t5_tiny_artifacts, tmp_path / "art")
    data = copy.deepcopy(manifest_data)
    _set(data, field, value)
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as err:
        load_manifest(art)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_blip2_manifest_with_the_instructblip_qformer_is_refused(manifest_data):
    """The architecture decides the Q-Former's inputs: the same stages under 'blip-2' are wrong."""
    from runtime.artifact.schema import Invalid

    data = copy.deepcopy(manifest_data)
    data["architecture"] = "blip-2"
    with pytest.raises(Invalid, match="model.qformer_max_positions: expected absent"):
        validate(copy.deepcopy(data))
    for key in ("qformer_vocab_size", "qformer_max_positions"):
        del data["model"][key]
    with pytest.raises(Invalid, match="qformer_tokenizer: expected absent"):
        validate(copy.deepcopy(data))
    del data["qformer_tokenizer"]
    with pytest.raises(Invalid, match="stages.qformer.inputs: expected tensors named image_embeds, got"):
        validate(data)


def test_registry_selects_by_architecture_and_llm_family():
    t5 = get_family("t5")
    ib = family_for({"architecture": "instructblip", "llm_family": "t5"})
    assert ib is get_family("t5", "instructblip") and ib.architecture == "instructblip"
    assert ib.llm_stages == t5.llm_stages and ib.padding_side == t5.padding_side
    specs = ib.stage_specs({"num_layers": 2})
    assert specs["qformer"].input_names == ["image_embeds", "qformer_input_ids", "qformer_attention_mask"]
    assert t5.stage_specs({"num_layers": 2})["qformer"].input_names == ["image_embeds"]
    with pytest.raises(ArtifactError, match="'instructblip' with LLM family 'retrieval' is not supported"):
        family_for({"architecture": "instructblip", "llm_family": "retrieval"})
    with pytest.raises(ArtifactError, match="unknown architecture 'blip-3'"):
        family_for({"architecture": "blip-3", "llm_family": "t5"})


def test_tensorrt_profile_gives_the_instruction_its_own_range(instructblip_t5_tiny_artifacts):
    from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile

    m = load_manifest(instructblip_t5_tiny_artifacts)
    ranges = ProfileRanges(batch=Range(1, 2, 8), instruction=Range(2, 12, 48))
    q = stage_profile(m.stages["qformer"], ranges)
    assert q["qformer_input_ids"] == ((1, 2), (2, 12), (8, 48))
    assert q["qformer_attention_mask"] == q["qformer_input_ids"]
    assert q["image_embeds"] == ((1, 17, 32), (2, 17, 32), (8, 17, 32))


def test_build_engines_instruction_flags(instructblip_t5_tiny_artifacts):
    import argparse

    from runtime.backends.tensorrt import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["build-engines", str(instructblip_t5_tiny_artifacts), "--min-instruction", "4",
                              "--opt-instruction", "20", "--max-instruction", "96"])
    from runtime.backends.tensorrt.profiles import Range

    assert cli.build_options(args).ranges.instruction == Range(4, 20, 96)
    proc = run_cli("build-engines", instructblip_t5_tiny_artifacts, "--min-instruction", "9", "--max-instruction", "3")
    assert proc.returncode == 2 and "--min/opt/max-instruction" in proc.stderr and "Traceback" not in proc.stderr


def test_profiler_shows_the_instruction_aware_qformer(instructblip_t5_tiny_artifacts, tiny_artifacts, tmp_path):
    out = tmp_path / "p.json"
    proc = run_cli("profile", instructblip_t5_tiny_artifacts, tiny_artifacts, "--synthetic", "2", "--runs", "2",
                   "--warmup", "0", "--new-tokens", "3", "--json", out)
    assert proc.returncode == 0, proc.stderr
    ib, opt = json.loads(out.read_text())["profiles"]
    assert ib["architecture"] == "instructblip" and opt["architecture"] == "blip-2"
    assert ib["stages"]["qformer"]["n"] == 2 and ib["stages"]["qformer"]["mean"] > 0
    assert ib["stage_inputs"]["qformer"] == ["image_embeds", "qformer_input_ids", "qformer_attention_mask"]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "instruction-aware" in rows["qformer"]


def test_make_model_instructblip(tmp_path):
    proc = run_cli("make-model", "tiny", tmp_path / "ib", "--arch", "instructblip", "--llm", "t5")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "ib" / "config.json").read_text())
    assert config["model_type"] == "instructblip" and config["text_config"]["model_type"] == "t5"
    assert (tmp_path / "ib" / "qformer_tokenizer" / "tokenizer.json").is_file()
    proc = run_cli("make-model", "tiny", tmp_path / "ib-opt", "--arch", "instructblip", "--llm", "opt")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "ib-opt" / "config.json").read_text())
    assert config["model_type"] == "instructblip" and config["text_config"]["model_type"] == "opt"
    assert (tmp_path / "ib-opt" / "qformer_tokenizer" / "tokenizer.json").is_file()


def test_export_refuses_instructblip_with_an_unsupported_llm(tmp_path):
    """An InstructBLIP config around an LLM no family knows (GPT-2) is refused in one line before
    any weight is read."""
    from transformers import InstructBlipConfig

    ckpt = tmp_path / "ib-gpt2"
    InstructBlipConfig(text_config={"model_type": "gpt2", "n_embd": 16}, image_token_index=3).save_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"")
    proc = run_cli("export", ckpt, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "uses a 'gpt2' language model, which is not supported (supported LLM families: opt, t5, llama)" \
        in proc.stderr
    assert not (tmp_path / "out").exists()
