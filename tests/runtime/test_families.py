"""The family registry, and artifacts written before families existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.validate import validation_images
from runtime.artifact.manifest import load_manifest
from runtime.errors import ArtifactError
from runtime.families import family_for, get_family, known_families
from runtime.pipeline import Blip2Pipeline

# An OPT artifact directory written by the exporter of commit 07e04dc (before families): its
# manifest has schema_version 1, no family-specific keys, and validation.json records the
# greedy tokens that exporter's pipeline produced.
OLD_OPT = Path(__file__).resolve().parents[1] / "fixtures" / "opt_tiny_v1"


def test_registry_knows_every_family():
    assert known_families() == ("llama", "opt", "retrieval", "t5")
    assert get_family("t5").llm_stages == ("encoder", "cross_kv", "decoder")
    for name in ("opt", "t5"):  # the names stage_names() gives are those of the specs
        assert tuple(get_family(name).llm_specs({"num_layers": 2})) == get_family(name).llm_stages


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ArtifactError, match=r"unknown LLM family 'gpt2' \(known: llama, opt, t5"):
        family_for({"architecture": "blip-2", "llm_family": "gpt2"})
    with pytest.raises(ArtifactError, match=r"unknown architecture 'blip-3'"):
        family_for({"architecture": "blip-3", "llm_family": "opt"})
    with pytest.raises(ArtifactError, match=r"'instructblip' with LLM family 'retrieval' is not supported "
                                            r"\(InstructBLIP LLM families: llama, opt, t5\)"):
        family_for({"architecture": "instructblip", "llm_family": "retrieval"})


def test_instructblip_over_opt_is_opts_layout_with_instructblips_defaults():
    """InstructBLIP's OPT family inherits OPT's stages, layout, cache and position limit; its
    prompts and (no) stop string are InstructBLIP's, while BLIP-2 OPT keeps its newline stop."""
    opt, ib = get_family("opt"), family_for({"architecture": "instructblip", "llm_family": "opt"})
    assert isinstance(ib, type(opt)) and ib.name == "opt" and ib.architecture == "instructblip"
    model = {"num_layers": 2, "max_position_embeddings": 128, "kv_cache": "shared"}
    assert (ib.llm_stages, ib.padding_side, ib.position_limit(model)) == (("decoder",), "left", 128)
    assert ib.llm_specs(model)["decoder"] == opt.llm_specs(model)["decoder"]
    assert list(ib.stage_specs(model)) == ["vision", "qformer", "decoder"]
    assert ib.stage_specs(model)["qformer"] != opt.stage_specs(model)["qformer"]  # reads the instruction
    assert opt.stop_strings == ("\n",) and ib.stop_strings == ()
    assert ib.prompts["vqa"] == "{}" and opt.prompts["vqa"] == "Question: {} Answer:"


def test_pre_family_opt_manifest_matches_the_family_specs():
    m = load_manifest(OLD_OPT).data
    family = family_for(m)
    assert family.name == "opt"
    specs = family.stage_specs(m["model"])
    assert list(specs) == list(m["stages"])
    for name, spec in specs.items():
        want = spec.to_manifest(m["embeddings"]["dtype"], m["model"])
        assert {k: m["stages"][name][k] for k in want} == want


def test_pre_family_opt_artifacts_still_load_and_run():
    pipe = Blip2Pipeline.from_artifacts(OLD_OPT)
    cases = json.loads((OLD_OPT / "validation.json").read_text())["generation"]["cases"]
    for case in cases:
        got = pipe.generate(validation_images(), [case["prompt"]] * 2, max_new_tokens=12, stop_strings=())
        assert [r.tokens for r in got] == case["exported"]


def test_unknown_family_in_a_manifest_is_an_artifact_error(tmp_path):
    from runtime.artifact.manifest import write_manifest

    art = tmp_path / "art"
    shutil.copytree(OLD_OPT, art)
    data = json.loads((art / "manifest.json").read_text())
    data["llm_family"] = "gpt2"
    data["files"] = list(data["files"])
    write_manifest(art, data)
    with pytest.raises(ArtifactError, match='llm_family: expected one of .*opt, t5, got "gpt2"'):
        Blip2Pipeline.from_artifacts(art)


def test_tensorrt_profiles_cover_every_t5_stage():
    from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile

    model = {"num_layers": 2, "num_heads": 4, "head_dim": 8, "text_hidden": 32, "vocab_size": 512,
             "image_size": 32, "num_patches": 17, "vision_hidden": 32, "num_query_tokens": 8}
    ranges = ProfileRanges(encoder=Range(8, 20, 40))
    for name, spec in get_family("t5").stage_specs(model).items():
        stage = spec.to_manifest("float32", model)
        profile = stage_profile(stage, ranges)  # every dynamic dim has a range
        assert set(profile) == set(spec.input_names), name
    decoder = stage_profile(get_family("t5").stage_specs(model)["decoder"].to_manifest("float32", model), ranges)
    assert decoder["encoder_attention_mask"] == ((1, 8), (1, 20), (4, 40))
    assert decoder["cross_key_1"] == ((1, 4, 8, 8), (1, 4, 20, 8), (4, 4, 40, 8))


def test_build_engines_refuses_llm_stages_and_checks_instruction_ranges(tiny_artifacts):
    from tests.conftest import run_cli
    from tests.exporter.test_export_errors import assert_one_line_error

    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--stages", "encoder"),
                          "runs only vision and qformer as engines")
    assert_one_line_error(run_cli("build-engines", tiny_artifacts, "--min-instruction", "50",
                                  "--max-instruction", "10"), "min <= opt <= max")


def test_importing_one_family_module_first_keeps_the_other_registered():
    import subprocess
    import sys

    code = "import runtime.families.opt; from runtime.families import get_family; print(get_family('t5').name)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "t5", proc.stderr


def test_tensorrt_profiles_of_the_llama_decoder_use_the_kv_heads():
    from runtime.backends.tensorrt.profiles import ProfileRanges, stage_profile

    model = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "text_hidden": 32, "vocab_size": 512}
    stage = get_family("llama").stage_specs(model)["decoder"].to_manifest("float16", model)
    profile = stage_profile(stage, ProfileRanges())
    assert set(profile) == set(get_family("llama").stage_specs(model)["decoder"].input_names)
    assert all(shape[1] == 2 for shape in profile["past_value_1"])  # (batch, KV heads, past, head_dim)
