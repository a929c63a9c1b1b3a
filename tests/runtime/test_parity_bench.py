"""One short parity case on the `bench` model (ViT-B/16 + 12-layer Q-Former + OPT-125m shapes)."""

from __future__ import annotations

import pytest

from runtime import synthetic
from runtime.pipeline import Blip2Pipeline
from tests.runtime.test_parity import hf_generate


@pytest.mark.slow
def test_bench_model_greedy_and_beam_token_identical(tmp_path_factory):
    from exporter.export import ExportOptions, export
    from exporter.loading import LoadOptions, load_model
    from exporter.random_models import make_model

    ckpt = make_model("bench", tmp_path_factory.mktemp("bench") / "ckpt")
    art = ckpt.parent / "art"
    # Export-time validation already compares greedy tokens; this test adds a batch and beams.
    export(str(ckpt), art, ExportOptions(validate=False), log=lambda s: None)
    hf = load_model(str(ckpt), LoadOptions())
    pipe = Blip2Pipeline.from_artifacts(art)
    images = [im for _, im in synthetic.make_scenes(2, seed=3)]
    prompts = ["", "Question: how many people are there? Answer:"]
    for kw in (dict(max_new_tokens=6, min_new_tokens=6), dict(max_new_tokens=5, num_beams=2)):
        got = [r.tokens for r in pipe.generate(images, prompts, stop_strings=(), **kw)]
        assert got == hf_generate(hf, images, prompts, pipe.defaults.eos_token_ids, **kw)
