"""The trained toy InstructBLIP (Vicuna-style LLaMA decoder) through the torch-free runtime:
its answers follow the instruction on held-out scenes, token-identical to transformers."""

from __future__ import annotations

import pytest

from runtime import synthetic
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.runtime.test_parity_instructblip import hf_generate


@pytest.fixture(scope="module")
def toy_ib(tmp_path_factory):
    from exporter.export import export
    from exporter.loading import LoadOptions, load_model
    from exporter.toy import INSTRUCTBLIP_CHECKPOINT

    out = tmp_path_factory.mktemp("art") / "toy-instructblip"
    report = export(str(INSTRUCTBLIP_CHECKPOINT), out, log=lambda s: None)
    assert report["ok"]
    return out, load_model(str(INSTRUCTBLIP_CHECKPOINT), LoadOptions())


def test_toy_manifest(toy_ib):
    artifacts, _ = toy_ib
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    assert (pipe.family.architecture, pipe.family.name) == ("instructblip", "llama")
    assert pipe.qformer_tokenizer is not None


def test_answers_follow_the_instruction_on_held_out_scenes(toy_ib):
    """Each image is asked every question in one batch (different instructions per row): the
    answer is the attribute the instruction asks for."""
    artifacts, _ = toy_ib
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    scenes = synthetic.make_scenes(40, seed=31337)
    right, total = {}, 0
    for scene, image in scenes:
        attributes = list(synthetic.QUESTIONS)
        results = pipe.generate([image] * len(attributes), [synthetic.QUESTIONS[a] for a in attributes])
        for a, r in zip(attributes, results):
            right[a] = right.get(a, 0) + (r.text == scene.answer(a))
        total += 1
    accuracy = sum(right.values()) / (total * len(right))
    assert accuracy >= 0.9, right
    assert min(right.values()) / total >= 0.8, right
    captions = [r.text for r in pipe.caption([im for _, im in scenes[:20]])]
    assert sum(c == s.caption for c, (s, _) in zip(captions, scenes[:20])) >= 17


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3)],
                         ids=["greedy", "beam3"])
def test_toy_token_identical_batch4(toy_ib, kw):
    artifacts, hf = toy_ib
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    ims = [im for _, im in synthetic.make_scenes(4, seed=5)]
    prompts = [pipe.prompts["caption"], *list(synthetic.QUESTIONS.values())[:3]]
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)


def test_ask_cli_streams_the_answer(toy_ib, tmp_path):
    artifacts, _ = toy_ib
    scene, image = synthetic.make_scenes(1, seed=424242)[0]
    image.save(tmp_path / "scene.png")
    proc = run_cli("ask", artifacts, tmp_path / "scene.png", "-q", "what colour is it?", "--stream")
    assert proc.returncode == 0, proc.stderr
    assert scene.colour in proc.stdout
