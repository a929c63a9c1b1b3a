"""Stop strings and streaming across the searches: (greedy, beams, sampling) x (no stop string,
a one-token stop string, a stop string spanning tokens) x (generate, stream), against
transformers' `generate(stop_strings=..., tokenizer=...)`; and a stream the caller abandons or
interrupts stops its work."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from runtime import synthetic
from runtime.generation.stopping import clip
from runtime.pipeline import Blip2Pipeline
from tests.conftest import REPO

MODES = {
    "greedy": dict(max_new_tokens=14),
    "beam3": dict(max_new_tokens=14, num_beams=3),
    "sample": dict(max_new_tokens=14, do_sample=True, seed=5, top_k=0, temperature=1.4),
}
IMAGE_SEEDS = (12, 14)


@pytest.fixture(scope="module")
def toy_pipe(toy_artifacts):
    return Blip2Pipeline.from_artifacts(toy_artifacts)


def derive_stops(pipe, tokens: list[int], kind: str) -> tuple[str, ...]:
    """Stop strings that the unstopped output contains: one token's whole text, or a string that
    starts inside one token and ends inside the next (overhanging both)."""
    if kind == "none":
        return ()
    texts = [pipe.tokenizer.token_text(t) or "" for t in tokens]
    for i in range(2, len(texts) - 1):
        a, b = texts[i], texts[i + 1]
        if kind == "single" and len(a.strip()) >= 2:
            return (a,)
        if kind == "multi" and len(a) >= 2 and len(b) >= 2 and a.strip() and b.strip():
            return (a[-2:] + b[:1],)
    pytest.skip(f"no {kind} stop string in {texts}")


def hf_tokens(hf, image, prompt: str, stops, **kw) -> list[int]:
    model, processor = hf
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    extra = dict(stop_strings=list(stops), tokenizer=processor.tokenizer) if stops else dict(stop_strings=None)
    with torch.no_grad():
        out = model.generate(**inputs, **kw, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_stop_point(hf, image, prompt: str, tokens: list[int], stops) -> list[int]:
    """Where transformers' StopStringCriteria would end `tokens` (prompt ids included)."""
    model, processor = hf
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    if not stops:
        return tokens
    criteria = StopStringCriteria(processor.tokenizer, list(stops))
    for k in range(1, len(tokens) + 1):
        if criteria(torch.tensor([ids + tokens[:k]]), None)[0]:
            return tokens[:k]
    return tokens


def check_stream(pipe, image, prompt_kw, result, **kw) -> None:
    pieces = list(pipe.stream(image, **prompt_kw, **kw))
    # The stream only appends: joined pieces equal to the final text means nothing it showed
    # was taken back (a partial stop string, an unsettled beam).
    assert "".join(pieces) == result.text
    assert all(pieces)
    if kw.get("num_beams", 1) == 1 and len(result.text.split()) > 2:
        assert len(pieces) > 1  # greedy and sampling stream token by token


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("stop", ["none", "single", "multi"])
@pytest.mark.parametrize("mode", list(MODES))
def test_stop_strings_and_streaming_cross_product(toy_pipe, toy_hf, mode, stop, stream):
    pipe, kw = toy_pipe, MODES[mode]
    for seed in IMAGE_SEEDS:
        _, image = synthetic.make_scenes(1, seed=seed)[0]
        plain = pipe.caption([image], stop_strings=(), **kw)[0]
        stops = derive_stops(pipe, plain.tokens, stop)
        got = pipe.caption([image], stop_strings=stops, **kw)[0]
        if mode == "sample":
            # transformers samples with torch's generator: compare against our own unstopped
            # draw (same seed, same draws) cut where transformers' StopStringCriteria cuts.
            want = hf_stop_point(toy_hf, image, "", plain.tokens, stops)
        else:
            want = hf_tokens(toy_hf, image, "", stops, **kw)
        assert got.tokens == want, (stops, pipe.tokenizer.decode(got.tokens), pipe.tokenizer.decode(want))
        assert got.text == clip(pipe.tokenizer.decode(got.tokens), stops).strip()
        if stops:
            assert all(s not in got.text for s in stops)
            assert len(got.tokens) < len(plain.tokens)
        if stream:
            check_stream(pipe, image, {}, got, stop_strings=stops, **kw)


@pytest.mark.parametrize("mode", list(MODES))
def test_stop_string_of_one_character_tokens(toy_pipe, toy_hf, mode):
    """' y' is two one-character tokens (' ', 'y'): transformers looks back exactly len(stop)
    tokens, the most a match can need."""
    _, image = synthetic.make_scenes(1, seed=12)[0]  # "a big yellow ..."
    kw = MODES[mode]
    got = toy_pipe.caption([image], stop_strings=(" y",), **kw)[0]
    plain = toy_pipe.caption([image], stop_strings=(), **kw)[0]
    assert " y" in toy_pipe.tokenizer.decode(plain.tokens)
    want = hf_stop_point(toy_hf, image, "", plain.tokens, (" y",)) if mode == "sample" else \
        hf_tokens(toy_hf, image, "", (" y",), **kw)
    assert got.tokens == want and [toy_pipe.tokenizer.token_text(t) for t in got.tokens[-2:]] == [" ", "y"]
    assert "".join(toy_pipe.stream(image, stop_strings=(" y",), **kw)) == got.text == "a big"


@pytest.mark.parametrize("mode", ["greedy", "beam3"])
def test_padded_batch_with_stop_strings_matches_transformers(toy_pipe, toy_hf, mode):
    """Rows stop at different steps (one at a stop string, one at EOS): transformers pads the
    finished row, we return it as it ended."""
    ims = [im for _, im in synthetic.make_scenes(2, seed=41)]
    prompts = ["", "Question: what colour is it? Answer:"]
    kw = MODES[mode]
    plain = toy_pipe.generate(ims, prompts, stop_strings=(), **kw)
    stops = derive_stops(toy_pipe, plain[0].tokens, "multi")
    got = [r.tokens for r in toy_pipe.generate(ims, prompts, stop_strings=stops, **kw)]
    model, processor = toy_hf
    inputs = processor(images=ims, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kw, stop_strings=list(stops), tokenizer=processor.tokenizer)
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    pad = toy_pipe.pad_id
    for ours, theirs in zip(got, rows):
        assert theirs[: len(ours)] == ours
        assert all(t == pad for t in theirs[len(ours):])
    assert len(got[0]) < len(plain[0].tokens)


def drain(steps) -> tuple[list, list]:
    """Runs a `_generate_steps` generator to its end: (what each step yielded, the Results)."""
    seen = []
    while True:
        try:
            seen.append(next(steps))
        except StopIteration as end:
            return seen, end.value


@pytest.mark.parametrize("mode", list(MODES))
def test_each_step_yields_a_prefix_of_the_result(toy_pipe, mode):
    """What a search yields per step is settled: a prefix of the row's final ids that never
    shrinks; greedy and sampling settle one token a step, beams as soon as they agree."""
    ims = [im for _, im in synthetic.make_scenes(2, seed=43)]
    steps = toy_pipe._generate_steps(ims, ["", "Question: what colour is it? Answer:"], **MODES[mode])
    seen, results = drain(steps)
    for i, result in enumerate(results):
        rows = [step[i] for step in seen]
        assert all(result.tokens[: len(row)] == row for row in rows)
        assert all(len(a) <= len(b) for a, b in zip(rows, rows[1:]))
        assert rows[-1] == result.tokens
        if mode != "beam3":
            assert [len(row) for row in rows] == [min(k + 1, len(result.tokens)) for k in range(len(rows))]


@pytest.mark.parametrize("mode", list(MODES))
def test_only_a_stream_pays_for_settled_ids(toy_pipe, monkeypatch, mode):
    """generate() drops what each step settles, so the searches do not compute it; greedy and
    sampling snapshot their rows without copying them."""
    from runtime.generation import search

    ims = [im for _, im in synthetic.make_scenes(2, seed=43)]
    prompts = ["", "Question: what colour is it? Answer:"]
    streamed, results = drain(toy_pipe._generate_steps(ims, prompts, **MODES[mode]))
    assert all(isinstance(row, search.Prefix) for step in streamed for row in step) == (mode != "beam3")

    def refused(*args):
        raise AssertionError("settled ids computed for a caller that does not stream")

    monkeypatch.setattr(search, "_settled", refused)
    monkeypatch.setattr(search, "Prefix", refused)
    seen, quiet = drain(toy_pipe._generate_steps(ims, prompts, settle=False, **MODES[mode]))
    assert len(seen) == len(streamed) and all(step is None for step in seen)
    assert [r.tokens for r in quiet] == [r.tokens for r in results]
    assert [r.tokens for r in toy_pipe.generate(ims, prompts, **MODES[mode])] == [r.tokens for r in results]


def test_a_stream_computes_its_options_once(toy_pipe, monkeypatch):
    calls = []
    real = toy_pipe.options
    monkeypatch.setattr(toy_pipe, "options", lambda **kw: calls.append(kw) or real(**kw))
    _, image = synthetic.make_scenes(1, seed=12)[0]
    text = "".join(toy_pipe.stream(image, max_new_tokens=9, stop_strings=("zz",)))
    assert text and calls == [dict(max_new_tokens=9, stop_strings=("zz",))]


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 2.0])
def test_beam_settled_ids_are_sound_on_random_weights(tiny_artifacts, length_penalty, early_stopping):
    """Random weights keep beams apart: the ids a beam search calls settled (what it streams)
    must still be a prefix of its answer under every length penalty and stopping rule."""
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    ims = [im for _, im in synthetic.make_scenes(3, seed=44)]
    steps = pipe._generate_steps(ims, ["", "a photo of", "Question: where is it? Answer:"], num_beams=4,
                                 max_new_tokens=12, length_penalty=length_penalty, early_stopping=early_stopping)
    seen, results = drain(steps)
    for i, result in enumerate(results):
        assert all(result.tokens[: len(step[i])] == step[i] for step in seen)
        assert seen[-1][i] == result.tokens


def test_stream_holds_back_a_partial_multi_token_stop_string(toy_pipe):
    """The issue's case: ' yellow' is four tokens (' ', 'y', 'ell', 'ow'); while they arrive the
    stream must not show ' y', ' yell' ... that the final text drops."""
    for seed in range(40):
        scene, image = synthetic.make_scenes(1, seed=seed)[0]
        if scene.colour == "yellow":
            break
    else:
        pytest.skip("no yellow scene")
    for kw in (MODES["greedy"], MODES["beam3"]):
        pieces = list(toy_pipe.stream(image, stop_strings=(" yellow",), **kw))
        final = toy_pipe.caption([image], stop_strings=(" yellow",), **kw)[0]
        assert "".join(pieces) == final.text == scene.caption.split(" yellow")[0]
        assert toy_pipe.tokenizer.decode(final.tokens).endswith(" yellow")


def test_beam_stream_prints_the_answer(toy_artifacts, tmp_path):
    from tests.conftest import run_cli

    scene, image = synthetic.make_scenes(1, seed=12)[0]
    image.save(tmp_path / "x.png")
    proc = run_cli("ask", toy_artifacts, tmp_path / "x.png", "-q", "what colour is it?", "--stream", "--num-beams", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(": ", 1)[1] == scene.colour


def count_decoder_runs(pipe) -> list:
    """Counts the decoder graph's runs, whichever way its KV cache form runs it."""
    runs: list = []
    runner = pipe.runners["decoder"]
    for name in ("infer", "infer_bound", "infer_in_place"):
        real = getattr(runner, name)
        setattr(runner, name, lambda *a, real=real, **kw: runs.append(1) or real(*a, **kw))
    return runs


@pytest.mark.parametrize("how", ["close", "garbage-collected", "keyboard-interrupt"])
def test_abandoned_stream_stops_its_work(toy_artifacts, how):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    runs = count_decoder_runs(pipe)
    _, image = synthetic.make_scenes(1, seed=12)[0]
    threads = threading.active_count()
    long = dict(max_new_tokens=50, min_new_tokens=50)
    stream = pipe.stream(image, **long)
    if how == "keyboard-interrupt":
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                raise KeyboardInterrupt
    else:
        next(stream)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    after = len(runs)
    assert after < 50  # it stopped early, not after the 50 steps
    # Another full request: a worker left running in the background would add runs meanwhile.
    pipe.caption([image], max_new_tokens=5, min_new_tokens=5)
    assert len(runs) == after + 5  # the new request's prefill and 4 steps, nothing else
    assert threading.active_count() == threads


def test_abandoned_stream_exits_cleanly(toy_artifacts):
    """A program that leaves a stream half-read exits normally (the old worker thread was still
    inside onnxruntime at exit: 'terminate called without an active exception')."""
    code = textwrap.dedent(f"""
        from runtime import synthetic
        from runtime.pipeline import Blip2Pipeline
        pipe = Blip2Pipeline.from_artifacts({str(toy_artifacts)!r})
        stream = pipe.stream(synthetic.make_scenes(1, seed=12)[0][1], max_new_tokens=50, min_new_tokens=50)
        print(next(stream), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr


def test_ctrl_c_during_caption_stream_exits_130(toy_artifacts, tmp_path):
    """SIGINT at twelve different moments of a streaming run: each exits 130 with "interrupted".
    (The thread-and-queue stream aborted with SIGABRT in about one run of three here: its
    worker was still inside onnxruntime when the interpreter exited.)"""
    _, image = synthetic.make_scenes(1, seed=12)[0]
    image.save(tmp_path / "x.png")
    # Many images keep the run going long after the first output: the signal lands mid-run.
    cmd = [sys.executable, "-m", "runtime.cli", "caption", str(toy_artifacts), *[str(tmp_path / "x.png")] * 500,
           "--stream", "--min-new-tokens", "50", "--max-new-tokens", "50"]
    for chars in range(1, 85, 7):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdout.read(chars)  # some streamed output first
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == 130, (chars, proc.returncode, err[-2000:])
        assert "interrupted" in err and "terminate called" not in err and "Traceback" not in err
