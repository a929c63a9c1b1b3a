"""BLIP-2 Flan-T5: the torch-free pipeline gives transformers' `generate` token ids on the same
weights, for the T5 variants real checkpoints use (gated-GELU / ReLU feed-forward, untied / tied
embeddings, fewer decoder layers than encoder layers), and computes the cross-attention K/V once
per request."""

from __future__ import annotations

import pytest
import torch

from exporter.memory_estimate import estimate, stage_parameters
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.exporter.test_memory_estimate import initializer_bytes
from tests.runtime.test_parity import PROMPTS_MIXED, images

# default = Flan-T5: gated-GELU, untied; shallow-decoder: 2 encoder layers, 1 decoder layer.
VARIANTS = ("default", "relu", "tied", "shallow-decoder")


@pytest.fixture(scope="module", params=VARIANTS)
def t5(request, tmp_path_factory):
    """(variant, artifacts, (hf model, processor)) of a tiny random BLIP-2 T5, exported once."""
    from exporter.export import export
    from exporter.loading import LoadOptions, load_model
    from exporter.random_models import make_model

    ckpt = make_model("tiny", tmp_path_factory.mktemp("t5ckpt") / request.param, variant=request.param, llm="t5",
                      seed=3)
    out = tmp_path_factory.mktemp("t5art") / request.param
    report = export(str(ckpt), out, log=lambda s: None)
    assert report["ok"] and [s["stage"] for s in report["stages"]] == [
        "vision", "qformer", "encoder", "cross_kv", "decoder"]
    return request.param, out, load_model(str(ckpt), LoadOptions())


def hf_generate(hf, ims, prompts, eos, **kw):
    model, processor = hf
    assert processor.tokenizer.padding_side == "right"  # as the T5 family lays prompts out
    inputs = processor(images=ims, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    rows = []
    for r in out[:, 1:].tolist():  # an encoder-decoder's output starts with decoder_start_token_id
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


CASES = [
    pytest.param(dict(max_new_tokens=10), id="greedy"),
    pytest.param(dict(max_new_tokens=10, num_beams=3), id="beam3"),
    pytest.param(dict(max_new_tokens=8, num_beams=4, length_penalty=0.6, early_stopping=True), id="beam4-early"),
    pytest.param(dict(max_new_tokens=10, repetition_penalty=1.3, min_new_tokens=3), id="greedy-penalties"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_t5_token_identical(t5, kw, batch):
    _, artifacts, hf = t5
    ims, prompts = images(batch), PROMPTS_MIXED[:batch]
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    want = hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)
    assert got == want
    assert any(len(r) > 1 for r in got)  # the decoder ran past its first token


def test_the_decoder_depth_sizes_the_cache_and_cross_kv(t5):
    """model.num_layers is the decoder's depth (the self-attention cache and cross K/V have one
    key/value pair per decoder layer), num_encoder_layers the encoder's; the weight estimate from
    the config (exporter.memory_estimate) matches every LLM graph's initializers, so each stage
    holds the layers it should."""
    variant, artifacts, (model, _) = t5
    text = model.config.text_config
    m = load_manifest(artifacts)
    depths = (m.model["num_layers"], m.model["num_encoder_layers"])
    assert depths == (text.num_decoder_layers, text.num_layers)
    assert depths == ((1, 2) if variant == "shallow-decoder" else (2, 2))
    dec = depths[0]
    assert [t["name"] for t in m.stages["cross_kv"]["outputs"]] == [
        f"cross_{kind}_{i}" for i in range(dec) for kind in ("key", "value")]
    inputs = [t["name"] for t in m.stages["decoder"]["inputs"]]
    assert sum(n.startswith("past_") for n in inputs) == sum(n.startswith("cross_") for n in inputs) == 2 * dec
    est = estimate(stage_parameters(model.config), "fp32")["stages"]
    for stage in ("encoder", "cross_kv", "decoder"):
        real = initializer_bytes(m.stage_file(stage))
        assert abs(est[stage] - real) <= 0.02 * real, (stage, est[stage], real)


class Counting:
    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def infer(self, feeds):
        self.calls += 1
        return self.runner.infer(feeds)


def test_cross_kv_computed_once_per_request(t5):
    _, artifacts, _ = t5
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    for stage in ("encoder", "cross_kv", "decoder"):
        pipe.runners[stage] = Counting(pipe.runners[stage])
    pipe.generate(images(2), PROMPTS_MIXED[:2], num_beams=3, max_new_tokens=6, min_new_tokens=6, stop_strings=())
    assert pipe.runners["encoder"].calls == 1
    assert pipe.runners["cross_kv"].calls == 1
    assert pipe.runners["decoder"].calls == 6  # the start token, then one per new token but the last


def test_encoder_is_its_own_timed_stage(t5):
    _, artifacts, _ = t5
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    assert pipe.timed_stages.index("encoder") == pipe.timed_stages.index("prefill") - 1
    timings = pipe.caption(images(1), max_new_tokens=3)[0].timings
    assert timings["encoder"] > 0 and timings["prefill"] > 0


def test_t5_sampling_reproducible_with_seed(t5):
    _, artifacts, _ = t5
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    kw = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=8, min_new_tokens=8)
    a = [r.tokens for r in pipe.caption(images(2), seed=7, **kw)]
    assert a == [r.tokens for r in pipe.caption(images(2), seed=7, **kw)]
    assert a != [r.tokens for r in pipe.caption(images(2), seed=8, **kw)]


@pytest.mark.parametrize("kw", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)], ids=["greedy", "beam3"])
def test_t5_io_binding_path_gives_the_same_tokens(t5, kw):
    """The device-resident path (OrtValues for the caches and cross K/V; on the CPU here)."""
    _, artifacts, _ = t5
    ims, prompts = images(2), PROMPTS_MIXED[:2]
    plain = Blip2Pipeline.from_artifacts(artifacts, io_binding=False)
    bound = Blip2Pipeline.from_artifacts(artifacts, io_binding=True)
    assert [r.tokens for r in bound.generate(ims, prompts, **kw)] == \
        [r.tokens for r in plain.generate(ims, prompts, **kw)]


@pytest.fixture(scope="module")
def toy_t5(tmp_path_factory):
    from exporter.export import export
    from exporter.loading import LoadOptions, load_model
    from exporter.toy import CHECKPOINT_T5_DIR

    out = tmp_path_factory.mktemp("art") / "toy-t5"
    export(str(CHECKPOINT_T5_DIR), out, log=lambda s: None)
    return out, load_model(str(CHECKPOINT_T5_DIR), LoadOptions())


@pytest.mark.parametrize("kw", CASES[:3])
def test_t5_toy_token_identical_batch4(toy_t5, kw):
    artifacts, hf = toy_t5
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)


def test_t5_toy_captions_and_answers_are_right(toy_t5):
    from runtime import synthetic

    pipe = Blip2Pipeline.from_artifacts(toy_t5[0])
    scenes = synthetic.make_scenes(24, seed=31337)
    ims = [im for _, im in scenes]
    captions = [r.text for r in pipe.caption(ims)]
    assert sum(c == s.caption for c, (s, _) in zip(captions, scenes)) >= 22, captions
    for attribute, question in synthetic.QUESTIONS.items():
        answers = [r.text for r in pipe.ask(ims, question)]
        assert sum(a == s.answer(attribute) for a, (s, _) in zip(answers, scenes)) >= 21, (attribute, answers)


def test_t5_toy_stream_yields_the_caption_and_the_answer(toy_t5):
    from runtime import synthetic

    pipe = Blip2Pipeline.from_artifacts(toy_t5[0])
    scene, image = synthetic.make_scenes(1, seed=4242, image_size=128)[0]
    pieces = list(pipe.stream(image))
    assert len(pieces) > 1 and "".join(pieces) == pipe.caption([image])[0].text == scene.caption
    assert "".join(pipe.stream(image, question="what colour is it?")) == scene.answer("colour")
