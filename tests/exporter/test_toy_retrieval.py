"""The committed toy retrieval model, through the runtime: search quality on a held-out gallery
(one fresh scene per distinct caption, all 144), ITM on near-miss captions, and parity with
transformers on trained weights. And its training script's bars."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.toy import CHECKPOINT_RETRIEVAL_DIR
from exporter.toy.train_retrieval import gallery, main, near_miss
from runtime.retriever import Blip2Retriever

BAR = 0.90


@pytest.fixture(scope="module")
def toy(retrieval_toy_artifacts):
    return Blip2Retriever.from_artifacts(retrieval_toy_artifacts)


@pytest.fixture(scope="module")
def held_out():
    return gallery(seed=20_000)  # not the training images, nor the script's own acceptance gallery


def test_text_to_image_and_image_to_text_recall(toy, held_out):
    images = [im for _, im in held_out]
    captions = [s.caption for s, _ in held_out]
    assert len(set(captions)) == len(captions) == 144
    scores = toy.itc(images, captions)  # (images, texts); image i's caption is text i
    truth = np.arange(len(images))
    t2i = float(np.mean(scores.argmax(0) == truth))
    i2t = float(np.mean(scores.argmax(1) == truth))
    assert t2i >= BAR and i2t >= BAR, (t2i, i2t)


def test_itm_tells_the_caption_from_a_near_miss(toy, held_out):
    rng = np.random.default_rng(3)
    subset = held_out[::3]
    vision = toy.vision_embeds([im for _, im in subset])
    right = np.array([toy.itm_from_vision(vision[i:i + 1], [s.caption])[0, 0] for i, (s, _) in enumerate(subset)])
    wrong = np.array([toy.itm_from_vision(vision[i:i + 1], [near_miss(s, rng).caption])[0, 0]
                      for i, (s, _) in enumerate(subset)])
    assert np.mean(right > 0.5) >= BAR and np.mean(wrong < 0.5) >= BAR, (np.mean(right > 0.5), np.mean(wrong < 0.5))


def test_toy_parity_with_transformers(toy, held_out):
    from exporter.families.retrieval import compare_with_transformers
    from exporter.loading import LoadOptions, load_model

    hf_model, processor = load_model(str(CHECKPOINT_RETRIEVAL_DIR), LoadOptions())
    subset = held_out[:: 24]
    texts = ["", "a small red striped square", subset[0][0].caption, "a big blue dotted square at the top"]
    report = compare_with_transformers(hf_model, processor, toy, [im for _, im in subset], texts)
    assert report["max_abs_diff"] <= 1e-4, report["diffs"]


def test_committed_training_record_meets_the_bars():
    record = json.loads((CHECKPOINT_RETRIEVAL_DIR / "training.json").read_text())
    assert record["text_to_image_recall_at_1"] >= BAR and record["image_to_text_recall_at_1"] >= BAR
    assert record["gallery"] == 144


def test_a_checkpoint_below_the_bars_is_not_saved(tmp_path, capsys):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text("the committed checkpoint")
    assert main(["--out", str(out), "--steps", "1", "--train-images", "64", "--batch-size", "8"]) == 1
    assert "below the acceptance bars" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
