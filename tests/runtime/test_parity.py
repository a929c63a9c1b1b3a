"""The torch-free pipeline gives transformers' `generate` token ids on the same weights."""

from __future__ import annotations

import pytest
import torch

from runtime import synthetic
from runtime.pipeline import Blip2Pipeline

PROMPTS_MIXED = ["", "Question: what colour is it? Answer:", "a photo of", "Question: where is it? Answer:"]


def images(n, seed=77):
    return [im for _, im in synthetic.make_scenes(n, seed=seed)]


def hf_generate(hf, ims, prompts, eos, **kw):
    model, processor = hf
    inputs = processor(images=ims, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    rows = []
    for r in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def ours(artifacts, ims, prompts, **kw):
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    return [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), **kw)], pipe


CASES = [
    pytest.param(dict(max_new_tokens=10), id="greedy"),
    pytest.param(dict(max_new_tokens=10, num_beams=3), id="beam3"),
    pytest.param(dict(max_new_tokens=8, num_beams=4, length_penalty=0.6, early_stopping=True), id="beam4-early"),
    pytest.param(dict(max_new_tokens=8, num_beams=2, early_stopping="never", length_penalty=1.3), id="beam2-never"),
    pytest.param(dict(max_new_tokens=10, repetition_penalty=1.3, min_new_tokens=3), id="greedy-penalties"),
    # Beams reorder the whole id history the penalty reads (runtime/generation/id_history.py keeps it all then).
    pytest.param(dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.5), id="beam3-penalty"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kv_cache", ["shared", "concat"])
def test_tiny_token_identical(request, tiny_hf, kw, batch, kv_cache):
    """Both KV cache forms (exporter --kv-cache): the shared one moves each row's padding to the
    right of its cache, so batch 4's mixed prompt lengths are the case that tells."""
    artifacts = request.getfixturevalue("tiny_artifacts" if kv_cache == "shared" else "tiny_concat_artifacts")
    ims, prompts = images(batch), PROMPTS_MIXED[:batch]
    got, pipe = ours(artifacts, ims, prompts, **kw)
    assert got == hf_generate(tiny_hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)


@pytest.mark.parametrize("kw", CASES[:3])
def test_toy_token_identical_batch4(toy_artifacts, toy_hf, kw):
    ims, prompts = images(4, seed=5), PROMPTS_MIXED
    got, pipe = ours(toy_artifacts, ims, prompts, **kw)
    assert got == hf_generate(toy_hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)


def test_toy_captions_and_answers_are_right(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    scenes = synthetic.make_scenes(24, seed=31337)
    ims = [im for _, im in scenes]
    captions = [r.text for r in pipe.caption(ims)]
    assert sum(c == s.caption for c, (s, _) in zip(captions, scenes)) >= 22
    for attribute, question in synthetic.QUESTIONS.items():
        answers = [r.text for r in pipe.ask(ims, question)]
        assert sum(a == s.answer(attribute) for a, (s, _) in zip(answers, scenes)) >= 21, attribute


def test_sampling_reproducible_with_seed(tiny_artifacts):
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    ims = images(2)
    kw = dict(do_sample=True, temperature=1.5, top_k=0, top_p=0.95, max_new_tokens=12, min_new_tokens=12)
    a = [r.tokens for r in pipe.caption(ims, seed=7, **kw)]
    b = [r.tokens for r in pipe.caption(ims, seed=7, **kw)]
    c = [r.tokens for r in pipe.caption(ims, seed=8, **kw)]
    assert a == b
    assert a != c
    greedy = [r.tokens for r in pipe.caption(ims, max_new_tokens=12, min_new_tokens=12)]
    assert a != greedy
