"""The pipeline's API, dependencies, streaming, threads and prompt limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime import synthetic
from runtime.generation.options import GenerationOptionError, GenerationOptions, PromptTooLongError
from runtime.pipeline import Blip2Pipeline
from tests.conftest import REPO


def test_runtime_imports_no_torch_transformers_or_onnx(tiny_artifacts, tmp_path):
    image = tmp_path / "x.png"
    synthetic.make_scenes(1, seed=3)[0][1].save(image)
    code = textwrap.dedent(f"""
        import sys
        from runtime.pipeline import Blip2Pipeline
        pipe = Blip2Pipeline.from_artifacts({str(tiny_artifacts)!r})
        r = pipe.caption([{str(image)!r}], max_new_tokens=4)[0]
        assert isinstance(r.text, str) and r.tokens
        for name in ("torch", "transformers", "onnx", "optimum", "exporter", "calibration"):
            assert name not in sys.modules, name
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


def test_result_carries_text_tokens_and_timings(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    scene, image = synthetic.make_scenes(1, seed=11)[0]
    r = pipe.caption([image])[0]
    assert r.text == scene.caption
    assert r.tokens[-1] in pipe.defaults.eos_token_ids
    assert pipe.tokenizer.decode(r.tokens).strip() == r.text
    for stage in ("preprocess", "vision", "qformer", "prefill", "decode", "detokenize", "total"):
        assert r.timings[stage] >= 0
    assert len(r.timings["decode_steps"]) == len(r.tokens) - 1  # the first token comes from prefill


def test_stream_yields_the_same_text(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    _, image = synthetic.make_scenes(1, seed=12)[0]
    pieces = list(pipe.stream(image))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe.caption([image])[0].text
    q = "what colour is it?"
    assert "".join(pipe.stream(image, question=q)) == pipe.ask([image], q)[0].text


def test_eight_threads_match_sequential(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    images = [im for _, im in synthetic.make_scenes(8, seed=13)]
    sequential = [pipe.caption([im], num_beams=2)[0].tokens for im in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda im: pipe.caption([im], num_beams=2)[0].tokens, images))
    assert threaded == sequential


def test_prompt_too_long_names_the_limit(tiny_artifacts):
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    limit = pipe.model["max_position_embeddings"]
    image = synthetic.make_scenes(1, seed=1)[0][1]
    with pytest.raises(PromptTooLongError, match=f"exceed the model's {limit} positions"):
        pipe.caption([image], prompt="word " * limit)
    q = pipe.model["num_query_tokens"]
    prompt_len = len(pipe.tokenizer.encode("a b c"))
    # The last new token is never fed back: transformers generates limit - q - prompt_len + 1
    # tokens here and fails with an IndexError one further (tests/runtime/test_search.py checks).
    room = limit - q - prompt_len + 1
    with pytest.raises(GenerationOptionError, match=f"max_new_tokens must be at most {room} here, got {room + 1}"):
        pipe.caption([image], prompt="a b c", max_new_tokens=room + 1)
    r = pipe.caption([image], prompt="a b c", max_new_tokens=room, min_new_tokens=room)[0]
    assert len(r.tokens) == room
    # The default max_new_tokens shrinks to the positions left; generation fills them exactly.
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts, defaults=GenerationOptions(max_new_tokens=10_000))
    r = pipe.caption([image], prompt="a b c", min_new_tokens=10_000)[0]
    assert len(r.tokens) == room
    # None means "the default", not an explicit request that does not fit.
    r = pipe.caption([image], prompt="a b c", max_new_tokens=None, min_new_tokens=10_000)[0]
    assert len(r.tokens) == room


def test_invalid_options_name_valid_values(tiny_artifacts):
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    image = synthetic.make_scenes(1, seed=1)[0][1]
    with pytest.raises(ValueError, match="valid: max_new_tokens"):
        pipe.caption([image], beams=3)
    with pytest.raises(ValueError, match="early_stopping must be one of"):
        pipe.caption([image], num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="unknown device 'tpu'; valid: cpu, cuda, auto"):
        Blip2Pipeline.from_artifacts(tiny_artifacts, device="tpu")


def test_stop_string_ends_generation(toy_artifacts):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    scene, image = synthetic.make_scenes(1, seed=14)[0]
    word = scene.caption.split()[2]  # the colour
    r = pipe.caption([image], stop_strings=(f" {word}",))[0]
    assert r.text == " ".join(scene.caption.split()[:2])
    assert len(r.tokens) < len(pipe.caption([image])[0].tokens)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)])
def test_io_binding_path_gives_the_same_tokens(tiny_artifacts, kw):
    """The bound-KV path used on CUDA, run on the CPU provider: same tokens as plain run()."""
    images = [im for _, im in synthetic.make_scenes(2, seed=4)]
    plain = Blip2Pipeline.from_artifacts(tiny_artifacts)
    bound = Blip2Pipeline.from_artifacts(tiny_artifacts, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    a = [r.tokens for r in plain.generate(images, ["", "a photo of"], min_new_tokens=8, **kw)]
    b = [r.tokens for r in bound.generate(images, ["", "a photo of"], min_new_tokens=8, **kw)]
    assert a == b and all(len(t) == 8 for t in a)


def test_generation_options_record_what_the_caller_set(toy_artifacts):
    """A max_new_tokens the caller asked for must fit the positions; a default one shrinks: the
    options carry which fields were set, not the call sites."""
    base = GenerationOptions()
    opts = base.updated(max_new_tokens=5, num_beams=None, seed=None)
    assert opts.set_fields == {"max_new_tokens", "seed"}  # None keeps a value, except seed's "unseeded"
    assert opts.updated(num_beams=2).set_fields == {"max_new_tokens", "seed", "num_beams"}
    assert opts == base.updated(max_new_tokens=5) and hash(opts) == hash(base.updated(max_new_tokens=5))
    assert opts.as_defaults().set_fields == frozenset() and opts.as_defaults() == opts
    kwargs = opts.as_kwargs()
    assert GenerationOptions().updated(**kwargs).set_fields == {n for n, v in kwargs.items() if v is not None or n == "seed"}
    assert {"stop_strings", "eos_token_ids"} - GenerationOptions().updated(**kwargs).set_fields  # None: not given
    assert "set_fields" not in GenerationOptions.names()

    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    assert pipe.defaults.set_fields == frozenset() and pipe.options().set_fields == frozenset()
    assert pipe.options(max_new_tokens=3, stop_strings=None).set_fields == {"max_new_tokens"}
