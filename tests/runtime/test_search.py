"""The search's parts: stop strings against transformers' StopStringCriteria, what a stream may
show, option validation, and the position limit against transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.stopping_criteria import StopStringCriteria

from exporter.toy import CHECKPOINT_DIR
from runtime import synthetic
from runtime.errors import Blip2EdgeError, OptionError
from runtime.generation.options import GenerationOptionError, GenerationOptions
from runtime.generation.stopping import StopStrings, clip, stable_prefix
from runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def toy_tokenizers():
    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR), TextTokenizer(CHECKPOINT_DIR / "tokenizer.json",
                                                                       {"prefix_ids": [], "suffix_ids": []})


STOPS = [(" yellow",), ("ll",), ("w",), ("low dot",), (" square at",), ("re", "ed pl"), ("</s>",), ("e\n",),
         ("bottom",), ("a big y", "ow")]


def test_token_text_is_transformers_clean_vocabulary(toy_tokenizers):
    hf, ours = toy_tokenizers
    clean, ids = StopStringCriteria.clean_tokenizer_vocab(hf)
    assert [ours.token_text(i) for i in ids] == list(clean)
    assert ours.token_text(max(ids) + 5) is None


def test_token_texts_are_computed_once_per_tokenizer(toy_tokenizers):
    """Each request builds its own StopStrings; the token texts live on the tokenizer."""
    _, ours = toy_tokenizers
    first = {i: ours.token_text(i) for i in range(320)}
    stops = StopStrings(("x",), ours.token_text)
    long = [i for i, t in first.items() if t is not None and len(t) > 1]  # CPython shares 1-char strings
    assert len(long) > 10 and all(stops.clean(i) is first[i] for i in long)


def _tokenizers(cleanup: bool):
    from exporter.toy import CHECKPOINTS

    return {name: TextTokenizer(d / "tokenizer.json", {"prefix_ids": [], "suffix_ids": [],
                                                       "clean_up_tokenization_spaces": cleanup})
            for name, d in CHECKPOINTS.items()}


NATURAL = " ".join(scene.caption for scene, _ in synthetic.make_scenes(30, seed=1))
# The clean-up's patterns, punctuation and multi-byte characters.
AWKWARD = "it 's naïve , isn't it ? yes ! don 't ' quote ' café ☕ we 're , they 've n't 'm . ? ! , ' "


@pytest.mark.parametrize("cleanup", [False, True], ids=["raw", "clean-up"])
def test_growing_text_is_decode_of_every_prefix(cleanup):
    """ByteLevel (OPT toy: all 256 bytes, so random ids split UTF-8 characters) and Metaspace
    (T5 toy), special tokens and unknown ids included: every prefix decodes as a whole does,
    growing one id at a time (greedy) or several (beams settle in jumps)."""
    for name, tok in _tokenizers(cleanup).items():
        natural = tok.encode(AWKWARD + NATURAL)
        pool = natural + list(range(tok._tok.get_vocab_size() + 4))
        rng = np.random.default_rng(2)
        rows = [natural] + [[pool[i] for i in rng.integers(0, len(pool), 40)] for _ in range(150)]
        rows += [[natural[i] for i in rng.integers(0, len(natural), 40)] for _ in range(150)]
        for row in rows:
            for ends in (range(len(row) + 1), np.cumsum(rng.integers(0, 5, len(row) // 2))):
                growing = tok.growing_text()
                for k in ends:
                    assert growing(row[:k]) == tok.decode(row[:k]), (name, row[:k])


@pytest.mark.parametrize("cleanup", [False, True], ids=["raw", "clean-up"])
def test_growing_text_decodes_a_window_not_the_row(cleanup, monkeypatch):
    for name, tok in _tokenizers(cleanup).items():
        row = tok.encode("naïve café ☕ " + NATURAL)  # characters split across tokens first
        decoded: list[int] = []
        raw = tok._raw_text
        monkeypatch.setattr(tok, "_raw_text", lambda ids: decoded.append(len(ids)) or raw(ids))
        growing = tok.growing_text()
        for k in range(len(row) + 1):
            growing(row[:k])
        assert len(row) > 200 and max(decoded) <= 16, (name, max(decoded))


@pytest.mark.parametrize("stops", STOPS, ids=lambda s: "|".join(s))
def test_stop_string_hits_match_transformers(toy_tokenizers, stops):
    """Every prefix of real captions (matches with overhangs at both ends, a stop string inside
    one token, across the prompt) and of random id sequences (out-of-vocabulary ids included)."""
    hf, ours = toy_tokenizers
    ids_of = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = []
    for scene, _ in synthetic.make_scenes(12, seed=3):
        full = [hf.bos_token_id] + ids_of(" " + scene.caption) + [hf.eos_token_id]
        rows += [full[:k] for k in range(1, len(full) + 1)]
    rng = np.random.default_rng(0)
    rows += [rng.integers(0, len(hf) + 8, rng.integers(1, 12)).tolist() for _ in range(300)]
    criteria = StopStringCriteria(hf, list(stops))
    ours_stops = StopStrings(stops, ours.token_text)
    for row in rows:
        want = bool(criteria(torch.tensor([row]), None)[0])
        assert ours_stops.row_hits(row) == want, (row, hf.convert_ids_to_tokens(row))
    width = max(len(r) for r in rows)
    batch = np.array([[0] * (width - len(r)) + r for r in rows[:50]])  # left-padded, as histories are
    want = criteria(torch.from_numpy(batch), None).numpy()
    np.testing.assert_array_equal(ours_stops.hits(batch), want)
    assert StopStrings((), ours.token_text).hits(batch).tolist() == [False] * 50


def test_clip_cuts_at_the_earliest_stop_string():
    assert clip("a big yellow square", (" square", "yel")) == "a big "
    assert clip("a big yellow square", ()) == "a big yellow square"
    assert clip("a big", None) == "a big"
    assert clip("stop", ("stop",)) == ""


@pytest.mark.parametrize("text,stops,rewrites,shown", [
    ("a big y", (" yellow",), (), "a big"),                  # could become " yellow": held back
    ("a big ye", (" yellow",), (), "a big"),
    ("a big yo", (" yellow",), (), "a big yo"),             # cannot any more
    ("a big yellow sq", (" yellow",), (), "a big"),         # completed: cut there
    ("a big yellow", (" yellow", "big"), (), "a"),
    ("a big ", (), (), "a big"),                             # trailing space: the final text is stripped
    ("naïve caf\ufffd", (), (), "naïve caf"),               # half a UTF-8 character
    ("it '", (), (" 's", " '"), "it"),                      # " 's" would become "'s"
    ("it's", (), (" 's",), "it's"),                        # clean-up done: nothing pending
    ("do n", (), (" n't",), "do"),
    ("", ("x",), (), ""),
    ("abc", ("c", "bcd"), (), "a"),                         # "abcd" would cut at "bcd", before "c"
])
def test_stable_prefix(text, stops, rewrites, shown):
    assert stable_prefix(text, stops, rewrites) == shown


@pytest.mark.parametrize("name,value", [
    ("length_penalty", math.nan), ("length_penalty", math.inf), ("temperature", math.nan),
    ("temperature", -math.inf), ("temperature", 0), ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", math.nan), ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
    ("max_new_tokens", True), ("max_new_tokens", 2.0), ("max_new_tokens", 0), ("max_new_tokens", "5"),
    ("min_new_tokens", -1), ("min_new_tokens", 31), ("min_new_tokens", 1.5), ("num_beams", 0), ("num_beams", False),
    ("top_k", -1), ("top_k", 3.0), ("seed", -1), ("seed", True), ("seed", 1.0), ("do_sample", 1),
    ("do_sample", "yes"), ("early_stopping", 1), ("early_stopping", "sometimes"), ("early_stopping", None),
    ("temperature", True), ("length_penalty", "1"), ("stop_strings", ("",)), ("stop_strings", (3,)),
    ("stop_strings", 7), ("eos_token_ids", (-1,)), ("eos_token_ids", ("2",)), ("eos_token_ids", 2.0),
])
def test_invalid_option_names_itself(name, value):
    with pytest.raises(GenerationOptionError) as err:
        GenerationOptions(**{name: value})
    assert str(err.value).startswith(f"{name} must be ")
    assert repr(value) in str(err.value)
    assert err.value.option == name
    assert isinstance(err.value, ValueError) and isinstance(err.value, OptionError)
    assert isinstance(err.value, Blip2EdgeError)
    assert str(err.value.as_flag()).startswith(f"--{name.replace('_', '-')} must be ")


def test_beam_sampling_is_refused():
    with pytest.raises(GenerationOptionError, match="num_beams > 1 with do_sample"):
        GenerationOptions(num_beams=2, do_sample=True)


@pytest.mark.parametrize("name,value,stored", [
    ("max_new_tokens", np.int64(5), 5), ("max_new_tokens", 1, 1), ("min_new_tokens", 30, 30), ("num_beams", 1, 1),
    ("length_penalty", -2, -2.0), ("length_penalty", np.float32(0.5), 0.5), ("temperature", 1e-3, 1e-3),
    ("top_p", 1, 1.0), ("top_k", 0, 0), ("seed", 0, 0), ("seed", None, None), ("seed", 2**70, 2**70),
    ("repetition_penalty", 0.5, 0.5), ("early_stopping", "never", "never"), ("early_stopping", True, True),
    ("early_stopping", False, False), ("do_sample", True, True), ("stop_strings", "\n", ("\n",)),
    ("stop_strings", ["a", "b"], ("a", "b")), ("stop_strings", (), ()), ("eos_token_ids", 2, (2,)),
    ("eos_token_ids", [np.int32(2), 3], (2, 3)),
])
def test_valid_option_values(name, value, stored):
    opts = GenerationOptions(**{name: value})
    got = getattr(opts, name)
    assert got == stored and type(got) is type(stored)


def test_defaults_are_transformers_defaults():
    """Every default but max_new_tokens (the manifest's) is GenerationConfig's."""
    from transformers import GenerationConfig

    ours, theirs = GenerationOptions(), GenerationConfig()
    for name in ("num_beams", "length_penalty", "early_stopping", "do_sample", "temperature", "top_k", "top_p",
                 "repetition_penalty"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.min_new_tokens == (theirs.min_new_tokens or 0)
    assert ours.seed is None and ours.stop_strings is None and ours.eos_token_ids is None


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 0.3, 2.0])
@pytest.mark.parametrize("which", ["toy", "tiny"])
def test_beam_search_matches_transformers_across_length_penalties(request, which, length_penalty, early_stopping):
    """The toy ends its captions (EOS), so finished hypotheses compete; the tiny random model
    rarely does, so length-penalised running beams do."""
    from runtime.pipeline import Blip2Pipeline

    model, processor = request.getfixturevalue(f"{which}_hf")
    pipe = Blip2Pipeline.from_artifacts(request.getfixturevalue(f"{which}_artifacts"))
    ims = [im for _, im in synthetic.make_scenes(2, seed=45)]
    prompts = ["", "Question: what colour is it? Answer:"]
    kw = dict(num_beams=3, max_new_tokens=16, length_penalty=length_penalty, early_stopping=early_stopping)
    results = pipe.generate(ims, prompts, stop_strings=(), **kw)
    inputs = processor(images=ims, text=prompts, return_tensors="pt", padding=True)
    runs = []  # transformers' decoder runs: its early-stopping heuristic decides how many
    hook = model.language_model.register_forward_hook(lambda *_: runs.append(1))
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **kw)
    finally:
        hook.remove()
    eos = pipe.defaults.eos_token_ids
    for ours, theirs in zip(results, out[:, inputs["input_ids"].shape[1]:].tolist()):
        cut = next((i + 1 for i, t in enumerate(theirs) if t in eos), len(theirs))
        assert ours.tokens == theirs[:cut]
    assert len(results[0].timings["decode_steps"]) + 1 == len(runs)  # + prefill: the search stops when theirs does


@pytest.mark.parametrize("stop", [" ", "e"])
def test_beam_search_with_a_stop_string_most_tokens_hit(toy_artifacts, toy_hf, stop):
    """When most of the 2 * num_beams continuations finish at once, which continue is
    transformers' choice (it keeps 2 * num_beams per step, finished ones included)."""
    from runtime.pipeline import Blip2Pipeline

    model, processor = toy_hf
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    for seed in (12, 14, 15):
        image = synthetic.make_scenes(1, seed=seed)[0][1]
        kw = dict(num_beams=4, max_new_tokens=10)
        got = pipe.caption([image], stop_strings=(stop,), **kw)[0].tokens
        inputs = processor(images=[image], text=[""], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **kw, stop_strings=[stop], tokenizer=processor.tokenizer)
        assert got == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_updated_keeps_values_for_none_but_seed():
    base = GenerationOptions(max_new_tokens=7, seed=3)
    assert base.updated(max_new_tokens=None).max_new_tokens == 7
    assert base.updated(seed=None).seed is None
    assert base.updated(num_beams=2).num_beams == 2
    with pytest.raises(OptionError, match="unknown generation option.*beams.*valid: max_new_tokens"):
        base.updated(beams=2)
    with pytest.raises(GenerationOptionError, match="length_penalty must be a finite number, got nan"):
        base.updated(length_penalty=float("nan"))


def test_position_limit_is_transformers(tiny_hf, tiny_artifacts):
    """transformers' OPT generates exactly max_position_embeddings - (queries + prompt) + 1 new
    tokens (the last is never fed back) and fails one further; the pipeline allows the same."""
    from runtime.pipeline import Blip2Pipeline

    model, processor = tiny_hf
    pipe = Blip2Pipeline.from_artifacts(tiny_artifacts)
    image = synthetic.make_scenes(1, seed=1)[0][1]
    inputs = processor(images=[image], text=["a b c"], return_tensors="pt")
    room = model.config.text_config.max_position_embeddings - inputs["input_ids"].shape[1] + 1
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=room, min_new_tokens=room)
        assert out.shape[1] - inputs["input_ids"].shape[1] == room
        with pytest.raises(IndexError):
            model.generate(**inputs, max_new_tokens=room + 1, min_new_tokens=room + 1)
    got = pipe.caption([image], prompt="a b c", max_new_tokens=room, min_new_tokens=room, stop_strings=())[0]
    assert got.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()
    with pytest.raises(GenerationOptionError, match=f"at most {room} here"):
        pipe.caption([image], prompt="a b c", max_new_tokens=room + 1)


def test_cli_option_errors_name_the_flag(toy_artifacts, tmp_path):
    from tests.conftest import run_cli

    synthetic.make_scenes(1, seed=1)[0][1].save(tmp_path / "x.png")
    cases = [
        (["--max-new-tokens", "1e9"], "error: --max-new-tokens must be at most 56 here, got 1000000000"),
        (["--seed", "-1"], "error: --seed must be a non-negative integer, got -1"),
        (["--num-beams", "3", "--length-penalty", "nan"], "error: --length-penalty must be a finite number, got nan"),
        (["--top-p", "2"], "error: --top-p must be a number in (0, 1], got 2.0"),
        (["--max-new-tokens", "2.5"], "--max-new-tokens: expected an integer, got '2.5'"),
    ]
    for flags, message in cases:
        proc = run_cli("caption", toy_artifacts, tmp_path / "x.png", *flags)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
        assert proc.stdout == ""
