"""An artifact loaded with some of its stages (LoadedArtifact(stages=...)) runs those alone:
export's generate parity runs the visual stages, frees them, then the LLM's."""

from __future__ import annotations

import pytest

from runtime import synthetic
from runtime.artifact.manifest import load_manifest
from runtime.errors import OptionError
from runtime.loaded_artifact import LoadedArtifact
from runtime.pipeline import Blip2Pipeline


@pytest.mark.parametrize("artifacts", ["tiny_artifacts", "t5_tiny_artifacts"])
def test_the_visual_half_then_the_llm_half_give_the_whole_pipelines_tokens(request, artifacts):
    manifest = load_manifest(request.getfixturevalue(artifacts))
    images = [im for _, im in synthetic.make_scenes(2, seed=4)]
    prompts = ["", "a photo of"]
    visual = LoadedArtifact(manifest, "generation", stages=("vision", "qformer"))
    assert set(visual.runners) == {"vision", "qformer"}
    query = Blip2Pipeline(visual).encode(images, {}, prompts)
    llm_stages = tuple(s for s in visual.family.stage_names(manifest.model) if s not in ("vision", "qformer"))
    llm = Blip2Pipeline(LoadedArtifact(manifest, "generation", stages=llm_stages))
    assert set(llm.runners) == set(llm_stages)
    halves = llm.generate_from_queries(query, prompts, max_new_tokens=6, stop_strings=())
    whole = Blip2Pipeline(manifest).generate(images, prompts, max_new_tokens=6, stop_strings=())
    assert [r.tokens for r in halves] == [r.tokens for r in whole]
    assert all(r.tokens for r in whole)


def test_a_stage_the_artifact_does_not_have_is_refused_by_name(tiny_artifacts):
    with pytest.raises(OptionError, match="stages names no stage of this model: encoder; stages: vision"):
        LoadedArtifact(load_manifest(tiny_artifacts), "generation", stages=("vision", "encoder"))
