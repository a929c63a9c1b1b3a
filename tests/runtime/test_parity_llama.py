"""LLaMA (Vicuna) under BLIP-2: the torch-free pipeline gives transformers' `generate` token ids
on the same weights, with grouped-query attention and an untied lm_head (and without GQA),
greedy and beams, batch 1 and batch 4 with different prompts (left padding, so rotary positions
start later in the shorter rows), stop strings and streaming with beams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import synthetic
from runtime.pipeline import Blip2Pipeline
from tests.conftest import exported
from tests.runtime.test_parity import CASES, PROMPTS_MIXED, hf_generate, images
from tests.runtime.test_streaming import check_stream, derive_stops


@pytest.fixture(scope="module")
def llama_concat_artifacts(tmp_path_factory, llama_tiny_checkpoint):
    """The session's tiny GQA model exported with the concat KV cache (fp32 defaults to shared)."""
    return exported(tmp_path_factory, llama_tiny_checkpoint, "llama-concat", kv_cache="concat")


@pytest.fixture(scope="module", params=["default", "mha", "concat", "head16"])
def llama(request, tmp_path_factory, llama_tiny_checkpoint, llama_tiny_artifacts):
    """(artifacts, (hf model, processor)): "default" is the session's tiny GQA + untied model
    (shared KV cache, heads of 8: rotary in the graph), "mha" the same shapes with as many KV
    heads as query heads, "concat" the default model with the concat KV cache, "head16" heads of
    16, which GroupQueryAttention rotates itself (its graph reads no position ids)."""
    from exporter.loading import LoadOptions, load_model
    from exporter.random_models import make_model

    if request.param == "default":
        ckpt, out = llama_tiny_checkpoint, llama_tiny_artifacts
    elif request.param == "concat":
        ckpt, out = llama_tiny_checkpoint, request.getfixturevalue("llama_concat_artifacts")
    else:
        variant = request.param
        ckpt = make_model("tiny", tmp_path_factory.mktemp("llamackpt") / variant, variant=variant, llm="llama", seed=6)
        out = exported(tmp_path_factory, ckpt, f"llama-{variant}")  # export raises unless validation passed
        inputs = [t["name"] for t in Blip2Pipeline.from_artifacts(out).manifest.stages["decoder"]["inputs"]]
        assert ("position_ids" in inputs) == (variant != "head16")
    return out, load_model(str(ckpt), LoadOptions())


def test_tiny_llama_has_gqa_and_an_untied_lm_head(llama_tiny_artifacts, llama_tiny_checkpoint):
    from exporter.loading import LoadOptions, load_model

    model, _ = load_model(str(llama_tiny_checkpoint), LoadOptions())
    lm = model.language_model
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads
    assert not torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    pipe = Blip2Pipeline.from_artifacts(llama_tiny_artifacts)
    assert pipe.family.name == "llama" and pipe.manifest.data["architecture"] == "blip-2"
    past = next(i for i in pipe.manifest.stages["decoder"]["inputs"] if i["name"] == "past_key_0")
    assert past["shape"] == ["batch", lm.config.num_key_value_heads, "cache_capacity", 8]  # the KV heads only


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_llama_token_identical(llama, kw, batch):
    artifacts, hf = llama
    ims, prompts = images(batch), PROMPTS_MIXED[:batch]
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)]
    assert got == hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)
    assert all(len(r) > 1 for r in got)


def test_left_padding_gives_each_row_its_own_result(llama_tiny_artifacts):
    """A row's tokens in a padded batch are its tokens alone: positions skip the padding."""
    pipe = Blip2Pipeline.from_artifacts(llama_tiny_artifacts)
    ims, prompts = images(4), PROMPTS_MIXED
    batch = [r.tokens for r in pipe.generate(ims, prompts, max_new_tokens=8, stop_strings=())]
    alone = [pipe.generate([im], [p], max_new_tokens=8, stop_strings=())[0].tokens for im, p in zip(ims, prompts)]
    assert batch == alone


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3)], ids=["greedy", "beam3"])
@pytest.mark.parametrize("stop", ["single", "multi"])
def test_llama_stop_strings_and_streaming(llama_tiny_artifacts, llama_tiny_checkpoint, kw, stop):
    """Stop strings (one token's text, or one spanning two tokens) against transformers'
    StopStringCriteria, greedy and beams; the stream of the same request joins to its text."""
    from exporter.loading import LoadOptions, load_model

    model, processor = load_model(str(llama_tiny_checkpoint), LoadOptions())
    pipe = Blip2Pipeline.from_artifacts(llama_tiny_artifacts)
    _, image = synthetic.make_scenes(1, seed=12)[0]
    prompt = "Question: what is it? Answer:"
    plain = pipe.generate([image], [prompt], stop_strings=(), **kw)[0]
    stops = derive_stops(pipe, plain.tokens, stop)
    got = pipe.generate([image], [prompt], stop_strings=stops, **kw)[0]
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **kw, stop_strings=list(stops), tokenizer=processor.tokenizer)
    assert got.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()
    assert all(s not in got.text for s in stops)
    if "num_beams" not in kw:  # beams may finish on another hypothesis, of any length
        assert len(got.tokens) < len(plain.tokens)
    check_stream(pipe, image, {"prompt": prompt}, got, stop_strings=stops, **kw)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)], ids=["greedy", "beam3"])
def test_llama_io_binding_path_gives_the_same_tokens(llama_concat_artifacts, kw):
    """The concat form's I/O binding (its cache kept as OrtValues); the shared form always binds."""
    ims, prompts = images(2), PROMPTS_MIXED[:2]
    plain = Blip2Pipeline.from_artifacts(llama_concat_artifacts, io_binding=False)
    bound = Blip2Pipeline.from_artifacts(llama_concat_artifacts, io_binding=True)
    assert [r.tokens for r in bound.generate(ims, prompts, **kw)] == \
        [r.tokens for r in plain.generate(ims, prompts, **kw)]


def test_llama_defaults_are_instructblips(llama_tiny_artifacts):
    """The instruction is the prompt as written, </s> ends the answer, no stop string."""
    pipe = Blip2Pipeline.from_artifacts(llama_tiny_artifacts)
    assert pipe.vqa_prompt("What is unusual about this image?") == "What is unusual about this image?"
    assert pipe.defaults.stop_strings == () and pipe.defaults.eos_token_ids == (2,)
    assert pipe.tokenizer.encode("hi")[0] == 1  # <s> first, as LlamaTokenizer adds it
    ids = pipe.layout(np.zeros((2, 8, 32), np.float32), ["a", "a photo of"])
    assert ids.mask[0].tolist()[:8] == [1] * 8 and ids.mask[0, 8] == 0  # [query][left padding][prompt]
