"""runtime.serving.jobs without a server: the per-request checks and the grouping of a dynamic
batch, on the toy model's real pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from runtime.errors import Blip2EdgeError, ImageError, OptionError
from runtime.serving.jobs import Job, RequestError, group_key, parse, run_batch
from runtime.synthetic import make_scenes
from tests.runtime.serving_support import png_bytes


@pytest.fixture(scope="module")
def pipe(toy_artifacts):
    from runtime.pipeline import Blip2Pipeline

    return Blip2Pipeline.from_artifacts(toy_artifacts)


@pytest.fixture(scope="module")
def scenes():
    return [im for _, im in make_scenes(3, seed=21)]


def request(image: Image.Image | bytes, prompt: str | None = None) -> dict:
    data = png_bytes(image) if isinstance(image, Image.Image) else image
    out = {"image": np.array([[data]], dtype=np.object_)}
    if prompt is not None:
        out["prompt"] = np.array([[prompt.encode()]], dtype=np.object_)
    return out


def test_a_mixed_batch_equals_each_request_alone(pipe, scenes):
    """Different prompts and options in one dynamic batch: each answer is the pipeline's for that
    request alone; requests with equal options shared one pipeline batch."""
    reqs = [(request(scenes[0]), {}), (request(scenes[1], "a photo of"), {}), (request(scenes[2]), {"num_beams": 2}),
            (request(scenes[0], "Question: what colour is it? Answer:"), {"num_beams": 2, "max_new_tokens": 6})]
    jobs = [parse(pipe, r, p) for r, p in reqs]
    assert len({group_key(i, j) for i, j in enumerate(jobs)}) == 3
    results = run_batch(pipe, jobs)
    for job, (r, params), result in zip(jobs, reqs, results):
        alone = pipe.generate([job.image], [job.prompt], **params)[0]
        assert (result.text, result.tokens) == (alone.text, alone.tokens)


def test_sampling_requests_run_alone(pipe, scenes):
    """A sampled answer must not depend on the traffic beside it: sampled jobs never share."""
    jobs = [parse(pipe, request(scenes[0]), {"do_sample": True, "seed": 3}) for _ in range(3)]
    assert len({group_key(i, j) for i, j in enumerate(jobs)}) == 3
    texts = [r.text for r in run_batch(pipe, jobs)]
    alone = pipe.generate([jobs[0].image], [jobs[0].prompt], do_sample=True, seed=3)[0].text
    assert texts == [alone] * 3


def test_a_default_max_new_tokens_is_fitted_per_request(pipe, scenes):
    """A long prompt shrinks only its own default max_new_tokens, not its batch neighbours'."""
    limit = pipe.family.position_limit(pipe.model)
    long_prompt = "red"
    while pipe.model["num_query_tokens"] + len(pipe.tokenizer.encode(long_prompt + " red")) < limit - 4:
        long_prompt += " red"
    short, long = parse(pipe, request(scenes[0]), {}), parse(pipe, request(scenes[1], long_prompt), {})
    assert short.options.max_new_tokens == pipe.defaults.max_new_tokens
    assert long.options.max_new_tokens < short.options.max_new_tokens


@pytest.mark.parametrize("inputs, params, error, words", [
    ({"prompt": np.array([[b"x"]], dtype=object)}, {}, RequestError, "'image' is missing"),
    ({"image": np.array([[b"a"], [b"b"]], dtype=object)}, {}, RequestError, "one value per request"),
    ({"image": np.array([[b"GIF89a broken"]], dtype=object)}, {}, ImageError, "image"),
    ({"image": np.array([[5]], dtype=np.int32)}, {}, RequestError, "BYTES"),
    (None, {"num_beams": 0}, OptionError, "num_beams"),
    (None, {"temperature": "hot"}, OptionError, "temperature"),
    (None, {"early_stopping": "sometimes"}, RequestError, "early_stopping"),
    (None, {"max_tokens": 3}, RequestError, "max_tokens"),
    ("prompt", {}, RequestError, "not valid UTF-8"),
    (None, {"num_beams": 200000}, RequestError, "num_beams=200000 is over this server's limit"),
    (None, {"max_new_tokens": 100000}, RequestError, "max_new_tokens=100000 is over this server's limit"),
    (None, {"stop_strings": "Question:"}, RequestError, "stop_strings must be a JSON list of non-empty strings"),
    (None, {"stop_strings": '"Question:"'}, RequestError, "stop_strings must be a JSON list"),
    (None, {"stop_strings": '["a", ""]'}, RequestError, "stop_strings must be a JSON list"),
    (None, {"stop_strings": '{"a": 1}'}, RequestError, "stop_strings must be a JSON list"),
    (None, {"stop_strings": 3}, RequestError, "stop_strings must be a JSON list"),
    (None, {"stop_strings": '["\\ud800"]'}, RequestError, "stop_strings: not valid text"),
    (None, {"stop_strings": '["x"]' * 2}, RequestError, "stop_strings must be a JSON list"),
    (None, {"stop_strings": json.dumps(["x"] * 17)}, RequestError, "17 strings is over the limit of 16"),
    (None, {"stop_strings": json.dumps(["x" * 65])}, RequestError, "65 characters is over the limit of 64"),
])
def test_bad_requests_raise_user_errors_naming_the_fault(pipe, scenes, inputs, params, error, words):
    if inputs is None:
        inputs = request(scenes[0])
    elif inputs == "prompt":
        inputs = {**request(scenes[0]), "prompt": np.array([[b"\xff\xfe"]], dtype=object)}
    with pytest.raises(error) as info:
        parse(pipe, inputs, params)
    assert isinstance(info.value, Blip2EdgeError) and words in str(info.value)


def test_stop_strings_parameter_is_the_pipelines_option(pipe, scenes):
    """A JSON list (sent as a string) becomes the pipeline's stop_strings: the answer is the
    pipeline's with them, cut before the first; requests with other stop strings are another
    group; "[]" is the pipeline's empty tuple (the model's own stop strings off)."""
    full = pipe.generate([scenes[0]], [pipe.caption_prompt(None)])[0].text
    stop = full.split()[2]
    job = parse(pipe, request(scenes[0]), {"stop_strings": json.dumps([stop, "Question:"])})
    assert job.options.stop_strings == (stop, "Question:") and job.kwargs["stop_strings"] == (stop, "Question:")
    plain = parse(pipe, request(scenes[0]), {})
    assert group_key(0, job) != group_key(1, plain)
    result, alone = run_batch(pipe, [job, plain])
    assert result.text == pipe.generate([job.image], [job.prompt], stop_strings=[stop, "Question:"])[0].text
    assert stop not in result.text and len(result.text) < len(full) and alone.text == full
    assert parse(pipe, request(scenes[0]), {"stop_strings": "[]"}).options.stop_strings == ()
    assert parse(pipe, request(scenes[0]), {"stop_strings": [stop]}).options.stop_strings == (stop,)


def test_a_failing_group_fails_only_its_own_requests(pipe, scenes):
    good = parse(pipe, request(scenes[0]), {})
    broken = Job(image=Image.new("RGB", (0, 0)), prompt="", options=pipe.options(num_beams=3), kwargs={})
    refused = RequestError("bad")
    results = run_batch(pipe, [good, broken, refused])
    assert results[0].text == pipe.generate([good.image], [good.prompt])[0].text
    assert isinstance(results[1], Exception) and results[2] is refused


def test_an_instruction_too_long_for_the_qformer_is_refused_alone(instructblip_t5_tiny_artifacts, scenes):
    """InstructBLIP: the Q-Former's positions are checked per request, so an over-long
    instruction never reaches (and fails) the batch it would have joined."""
    from runtime.generation.options import PromptTooLongError
    from runtime.pipeline import Blip2Pipeline

    ib = Blip2Pipeline.from_artifacts(instructblip_t5_tiny_artifacts)
    good = parse(ib, request(scenes[0], "what colour is it?"), {"max_new_tokens": 3})
    long_text = "red " * (ib.model["qformer_max_positions"] + 1)
    with pytest.raises(PromptTooLongError, match="instruction too long for the Q-Former"):
        parse(ib, request(scenes[1], long_text), {"max_new_tokens": 3})
    assert run_batch(ib, [good])[0].text == ib.generate([good.image], [good.prompt], max_new_tokens=3)[0].text


def test_a_manifest_default_over_a_cap_is_lowered_not_refused(toy_artifacts, scenes, tmp_path):
    """The client never sent max_new_tokens: the manifest's large default is not its fault."""
    import json
    import shutil

    from runtime.pipeline import Blip2Pipeline
    from runtime.serving.jobs import SERVER_CAPS

    art = shutil.copytree(toy_artifacts, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["generation"]["max_new_tokens"] = 4 * SERVER_CAPS["max_new_tokens"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    big = Blip2Pipeline.from_artifacts(art)
    job = parse(big, request(scenes[0]), {})
    assert job.options.max_new_tokens <= SERVER_CAPS["max_new_tokens"]
    with pytest.raises(RequestError, match="over this server's limit"):
        parse(big, request(scenes[0]), {"max_new_tokens": 4 * SERVER_CAPS["max_new_tokens"]})
