"""Blip2Retriever's API around the scores (parity itself: tests/exporter/test_retrieval_export.py):
inputs refused in one line, threads, pre-computed features, and `blip2-edge match`."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from runtime import synthetic
from runtime.errors import ImageError, OptionError
from runtime.retriever import Blip2Retriever, match_probability, similarity
from tests.conftest import run_cli

TEXTS = ["a red square", "a big blue dotted square at the top", ""]


@pytest.fixture(scope="module")
def retriever(retrieval_tiny_artifacts):
    return Blip2Retriever.from_artifacts(retrieval_tiny_artifacts, batch_size=4)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    synthetic.make_scenes(1, seed=8)[0][1].save(path)
    return path


def test_shapes_and_empty_inputs(retriever, image_file):
    q, d = retriever.num_query_tokens, retriever.embed_dim
    assert retriever.embed_images([str(image_file), image_file]).shape == (2, q, d)
    assert retriever.embed_images([]).shape == (0, q, d)
    assert retriever.embed_texts([]).shape == (0, d)
    assert retriever.itc([image_file], []).shape == (1, 0)
    assert retriever.itm([], TEXTS).shape == (0, 3)
    assert len(retriever.artifact_sha256) == 64


def test_scores_from_precomputed_features_equal_the_direct_ones(retriever):
    images = [im for _, im in synthetic.make_scenes(5, seed=2)]
    vision = retriever.vision_embeds(images)
    embeds = retriever.embed_images_from_vision(vision)
    assert np.array_equal(embeds, retriever.embed_images(images))
    assert np.allclose(similarity(embeds, retriever.embed_texts(TEXTS)), retriever.itc(images, TEXTS), atol=1e-6)
    assert np.array_equal(retriever.itc_from_embeds(embeds, retriever.embed_texts(TEXTS)),
                          similarity(embeds, retriever.embed_texts(TEXTS)))
    assert np.allclose(retriever.itm_from_vision(vision[3:], TEXTS), retriever.itm(images[3:], TEXTS), atol=1e-6)


def test_match_probability_is_the_softmax_of_index_1():
    logits = np.array([[0.0, 0.0], [3.0, -2.0], [-800.0, 800.0]], np.float32)
    assert np.allclose(match_probability(logits), [0.5, 1 / (1 + np.exp(5.0)), 1.0])


@pytest.mark.parametrize("call, error, message", [
    (lambda r: r.embed_texts("a single string"), OptionError, "texts must be a list of strings"),
    (lambda r: r.embed_texts(["ok", 3]), OptionError, "text 1: a int; expected a string"),
    (lambda r: r.embed_texts(["word " * 80]), OptionError, r"text 0: \d+ tokens; the model takes at most 64"),
    (lambda r: r.embed_images("scene.png"), ImageError, "images must be a list of images"),
    (lambda r: r.embed_images([np.zeros((4, 4), np.float32)]), ImageError, "image 0: numpy array of dtype float32"),
    (lambda r: r.itm_from_vision(np.zeros((1, 3, 3), np.float32), ["x"]), OptionError, "vision features of shape"),
])
def test_bad_inputs_are_one_line_errors(retriever, call, error, message):
    with pytest.raises(error, match=message):
        call(retriever)


def test_ids_outside_the_models_vocabulary_are_refused(retriever):
    import copy

    small = copy.copy(retriever)
    small.model = {**retriever.model, "vocab_size": 4}  # [PAD] [UNK] [CLS] [SEP]: any word is outside
    with pytest.raises(OptionError, match=r"text 0: contains a token \('.*'\) outside the model's vocabulary of 4 ids"):
        small.embed_texts(["a red square"])


def test_bad_batch_size(retrieval_tiny_artifacts):
    with pytest.raises(OptionError, match="batch_size must be a positive integer"):
        Blip2Retriever.from_artifacts(retrieval_tiny_artifacts, batch_size=0)


def test_one_retriever_serves_many_threads(retriever):
    images = [im for _, im in synthetic.make_scenes(6, seed=3)]
    expected = {i: (retriever.embed_images(images[i:i + 3]), retriever.itm(images[i:i + 2], TEXTS)) for i in range(4)}
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = (retriever.embed_images(images[i:i + 3]), retriever.itm(images[i:i + 2], TEXTS))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, (embeds, itm) in expected.items():
        assert np.allclose(results[i][0], embeds, atol=1e-6) and np.allclose(results[i][1], itm, atol=1e-6)


def test_match_cli(retrieval_tiny_artifacts, image_file):
    r = run_cli("match", retrieval_tiny_artifacts, image_file, *TEXTS[:2], "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    retriever = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)
    assert [m["text"] for m in out["matches"]] == TEXTS[:2]
    assert np.allclose([m["itm"] for m in out["matches"]], retriever.itm([image_file], TEXTS[:2])[0], atol=1e-6)
    assert np.allclose([m["itc"] for m in out["matches"]], retriever.itc([image_file], TEXTS[:2])[0], atol=1e-6)
    assert out["artifact_sha256"] == retriever.artifact_sha256
    plain = run_cli("match", retrieval_tiny_artifacts, image_file, TEXTS[0])
    assert plain.returncode == 0 and f"ITM {out['matches'][0]['itm']:.4f}" in plain.stdout


@pytest.mark.parametrize("args, message", [
    (lambda a, i, t: (a, t / "missing.png", "x"), "missing.png: cannot decode image"),
    (lambda a, i, t: (a, i, "word " * 80), "the model takes at most 64"),
    (lambda a, i, t: (t / "nowhere", i, "x"), "not an artifact directory"),
    (lambda a, i, t: (a, a / "manifest.json", "x"), "not an image Pillow can read"),
    (lambda a, i, t: (a, i, "a red square", " "), "text 1 is empty"),  # as `search` refuses it
])
def test_match_cli_errors(retrieval_tiny_artifacts, image_file, tmp_path, args, message):
    r = run_cli("match", *args(retrieval_tiny_artifacts, image_file, tmp_path))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_match_cli_refuses_a_generation_artifact(tiny_artifacts, image_file):
    r = run_cli("match", tiny_artifacts, image_file, "x")
    assert r.returncode == 2 and "has no retrieval heads" in r.stderr and r.stderr.count("\n") == 1

