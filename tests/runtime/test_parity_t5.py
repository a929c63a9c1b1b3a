"""BLIP-2 Flan-T5: the torch-free pipeline gives transformers' `generate` token ids on the same
weights, for the T5 variants real checkpoints use (gated-GELU / ReLU feed-forward, untied / tied
embeddings, fewer decoder layers than encoder layers), and computes the cross-attention K/V once
per request."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from exporter.loading import LoadOptions, load_model
from exporter.memory_estimate import estimate, stage_parameters
from exporter.toy import CHECKPOINT_T5_DIR
from runtime.artifact.manifest import load_manifest
from runtime.pipeline import Blip2Pipeline
from tests.conftest import exported, scaled_t5_toy
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


# fp16, as transformers runs T5 in it: wo (the feed-forward output projection) in float32, its input
# cast up before it, T5Block's clamp while the hidden states are float16 (exporter/families/t5.py).

@pytest.fixture(scope="module")
def toy_t5_fp16(tmp_path_factory):
    from exporter.loading import LoadOptions, load_model
    fp16 = LoadOptions(dtype="fp16")
    return exported(tmp_path_factory, CHECKPOINT_T5_DIR, "toy-t5-fp16", load=fp16), \
        load_model(str(CHECKPOINT_T5_DIR), fp16)


@pytest.mark.parametrize("kw", CASES[:3])
def test_t5_toy_fp16_gives_the_fp32_exports_tokens(toy_t5, toy_t5_fp16, kw):
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    fp32 = Blip2Pipeline.from_artifacts(toy_t5[0])
    fp16 = Blip2Pipeline.from_artifacts(toy_t5_fp16[0])
    assert fp16.runners["decoder"].session.get_inputs()[0].type == "tensor(float16)"
    got = [r.tokens for r in fp16.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == [r.tokens for r in fp32.generate(ims, prompts, stop_strings=(), **kw)]
    assert any(len(r) > 3 for r in got)


@pytest.mark.parametrize("kw", CASES[:2])
def test_t5_toy_fp16_gives_transformers_fp16_generates_tokens(toy_t5_fp16, kw):
    """transformers' own fp16 generate (on the CPU: torch runs every op T5 needs in float16 here),
    on the model as exporter.loading loads it (wo float32)."""
    artifacts, hf = toy_t5_fp16
    assert hf[0].language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)


# The T5 toy with every wo weight scaled up: its outputs reach several times float16's largest
# value (65504) while its inputs, the attention and the embeddings stay well inside it. The
# float32 model is the truth; transformers' float16 T5 keeps wo in float32 for exactly this.
WO_SCALE = 20000.0
FP16_MAX = 65504.0


@pytest.fixture(scope="module")
def scaled_t5(tmp_path_factory):
    """(checkpoint, {dtype: artifacts}): the scaled toy exported (and validated) in fp32 and fp16."""
    ckpt = scaled_t5_toy(tmp_path_factory.mktemp("ckpt") / "t5-wo-scaled", (".wo.weight",), WO_SCALE)
    return ckpt, {dt: exported(tmp_path_factory, ckpt, f"t5-wo-scaled-{dt}", load=LoadOptions(dtype=dt))
                  for dt in ("fp32", "fp16")}


def test_the_scaled_wo_overflows_an_unguarded_fp16_feed_forward(scaled_t5):
    """The premise: in the float32 model, wo's outputs exceed float16's range while its inputs fit;
    the same projection computed in float16 gives inf."""
    model, processor = load_model(str(scaled_t5[0]), LoadOptions())
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out)))
             for n, m in model.language_model.named_modules() if n.endswith("DenseReluDense.wo")]
    hf_generate((model, processor), images(4, seed=5), PROMPTS_MIXED, (1,), max_new_tokens=6)
    for h in hooks:
        h.remove()
    assert max(float(out.abs().max()) for _, _, out in seen) > 3 * FP16_MAX
    assert max(float(x.abs().max()) for _, x, _ in seen) < FP16_MAX / 10
    unguarded = [torch.nn.functional.linear(x.half(), mod.weight.half()) for mod, x, _ in seen]
    assert any(torch.isinf(y).any() for y in unguarded)


def test_scaled_t5_fp16_export_validates_finite(scaled_t5):
    report = json.loads((scaled_t5[1]["fp16"] / "validation.json").read_text())
    assert report["ok"] and report["generation"]["ok"]  # greedy tokens = transformers' fp16 generate's
    assert all(not o["nonfinite"] for s in report["stages"] for o in s["outputs"])


class FiniteLogits:
    """A decoder runner that checks every step's logits are finite."""

    def __init__(self, runner):
        self.runner, self.steps = runner, 0

    def infer(self, feeds):
        out = self.runner.infer(feeds)
        assert np.isfinite(out["logits"]).all()
        self.steps += 1
        return out


@pytest.mark.parametrize("kw", CASES[:2])
def test_scaled_t5_fp16_gives_the_fp32_tokens(scaled_t5, kw):
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    fp32 = Blip2Pipeline.from_artifacts(scaled_t5[1]["fp32"])
    fp16 = Blip2Pipeline.from_artifacts(scaled_t5[1]["fp16"])
    fp16.runners["decoder"] = FiniteLogits(fp16.runners["decoder"])
    got = [r.tokens for r in fp16.generate(ims, prompts, stop_strings=(), **kw)]
    assert fp16.runners["decoder"].steps > 3
    assert got == [r.tokens for r in fp32.generate(ims, prompts, stop_strings=(), **kw)]


def test_scaled_t5_transformers_fp16_generate_gives_the_fp32_tokens(scaled_t5):
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    pipe = Blip2Pipeline.from_artifacts(scaled_t5[1]["fp32"])
    want = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), max_new_tokens=10)]
    hf16 = load_model(str(scaled_t5[0]), LoadOptions(dtype="fp16"))
    assert hf_generate(hf16, ims, prompts, pipe.defaults.eos_token_ids, max_new_tokens=10) == want


class Float16Arithmetic:
    """A runner on onnx's reference evaluator, which computes each op in its declared type: float16
    values round (and overflow) after every op, as on a GPU. ONNX Runtime's CPU provider computes
    most float16 ops in float32 and would not show an overflow of the graph's float16 arithmetic."""

    def __init__(self, path):
        self.evaluator = ReferenceEvaluator(onnx.load(str(path)))
        self.names = [o.name for o in self.evaluator.proto_.graph.output]

    def infer(self, feeds):
        return dict(zip(self.names, self.evaluator.run(None, feeds)))


def test_scaled_t5_fp16_graphs_in_float16_arithmetic_give_the_fp32_tokens(scaled_t5):
    artifacts = scaled_t5[1]["fp16"]
    m = load_manifest(artifacts)
    ims, prompts = images(2, seed=5), PROMPTS_MIXED[:2]
    fp32 = Blip2Pipeline.from_artifacts(scaled_t5[1]["fp32"])
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    for stage in ("encoder", "cross_kv", "decoder"):
        pipe.runners[stage] = Float16Arithmetic(m.stage_file(stage))
    pipe.runners["decoder"] = FiniteLogits(pipe.runners["decoder"])
    with warnings.catch_warnings():  # numpy's notes on the -inf of masked positions
        warnings.simplefilter("ignore", RuntimeWarning)
        got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), max_new_tokens=8)]
    assert got == [r.tokens for r in fp32.generate(ims, prompts, stop_strings=(), max_new_tokens=8)]
