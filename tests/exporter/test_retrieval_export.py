"""Retrieval (Blip2ForImageTextRetrieval) export: the artifact's form, and the runtime's
embeddings, ITC matrix and ITM probabilities against transformers' own forward on the same
weights, with texts of different lengths in one batch, for both input layouts transformers has
(query placeholders from the processor, image_token_index set; text ids alone, unset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime import synthetic
from runtime.errors import ArtifactError
from runtime.retriever import Blip2Retriever

ATOL = 1e-4
# Different lengths in one padded batch: empty, short, long, with punctuation and capitals.
TEXTS = ["", "a photo", "A big RED striped square on the left, next to nothing at all.", "two dogs in the snow"]


def _images(n=3, seed=21):
    return [im for _, im in synthetic.make_scenes(n, seed=seed)]


def transformers_scores(hf_model, processor, images, texts) -> dict:
    """transformers' ITC outputs over all images and texts at once, and its ITM probability for
    every (image, text) pair, one image against the padded batch of texts."""
    with torch.no_grad():
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
        itc = hf_model(**enc, use_image_text_matching_head=False)
        itm = []
        for i in range(len(images)):
            out = hf_model(pixel_values=enc["pixel_values"][i:i + 1].expand(len(texts), -1, -1, -1),
                           input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           use_image_text_matching_head=True)
            itm.append(torch.softmax(out.logits_per_image, dim=1)[:, 1])
    return {"itc": itc.logits_per_image.numpy(), "image_embeds": itc.image_embeds.numpy(),
            "text_embeds": itc.text_embeds.numpy(), "itm": torch.stack(itm).numpy()}


def runtime_scores(retriever, images, texts) -> dict:
    return {"itc": retriever.itc(images, texts), "image_embeds": retriever.embed_images(images),
            "text_embeds": retriever.embed_texts(texts), "itm": retriever.itm(images, texts)}


def assert_parity(ref: dict, got: dict) -> None:
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        assert got[key].dtype == np.float32, key
        diff = float(np.abs(got[key].astype(np.float64) - ref[key]).max())
        assert diff <= ATOL, f"{key}: max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def tiny_retrieval_hf(retrieval_tiny_checkpoint):
    from exporter.loading import LoadOptions, load_model

    return load_model(str(retrieval_tiny_checkpoint), LoadOptions())


def test_manifest_has_the_retrieval_stages_and_no_llm(retrieval_tiny_artifacts):
    m = json.loads((retrieval_tiny_artifacts / "manifest.json").read_text())
    assert m["architecture"] == "blip-2-retrieval" and "llm_family" not in m
    assert list(m["stages"]) == ["vision", "image_embed", "text_embed", "itm"]
    assert not {"embeddings", "prompts", "generation"} & set(m)
    assert m["tokenizer"]["prefix_ids"] == [2] and m["tokenizer"]["suffix_ids"] == [3]  # [CLS] ... [SEP]
    assert {"tokenizer.json", "itm.onnx", "text_embed.onnx"} <= set(m["files"])
    assert m["stages"]["text_embed"]["inputs"][0]["shape"] == ["batch", "sequence"]  # text length dynamic
    report = json.loads((retrieval_tiny_artifacts / "validation.json").read_text())
    assert report["ok"] and report["retrieval"]["max_abs_diff"] <= ATOL
    assert [s["stage"] for s in report["stages"]] == ["vision", "image_embed", "text_embed", "itm"]


def test_tiny_parity_with_transformers(tiny_retrieval_hf, retrieval_tiny_artifacts):
    hf_model, processor = tiny_retrieval_hf
    images = _images()
    ref = transformers_scores(hf_model, processor, images, TEXTS)
    # Scores that differ between texts and images: a dropped mask or a wrong layout shows.
    assert np.ptp(ref["itc"]) > 0.05 and np.ptp(ref["itm"]) > 1e-3
    for batch_size in (1, 3, 16):  # one pair at a time, chunks, one batch
        got = runtime_scores(Blip2Retriever.from_artifacts(retrieval_tiny_artifacts, batch_size=batch_size),
                             images, TEXTS)
        assert_parity(ref, got)


def test_parity_without_image_token_index(tmp_path):
    """transformers' other branch: no placeholders, the ITM head adds the queries' mask itself."""
    from exporter.export import export
    from exporter.loading import LoadOptions, load_model
    from exporter.random_models import make_retrieval_model

    ckpt = make_retrieval_model("tiny", tmp_path / "ckpt", seed=9, image_tokens=False)
    export(str(ckpt), tmp_path / "art", log=lambda s: None)
    hf_model, processor = load_model(str(ckpt), LoadOptions())
    assert hf_model.config.image_token_index is None and processor.num_query_tokens is None
    images = _images(2, seed=4)
    assert_parity(transformers_scores(hf_model, processor, images, TEXTS),
                  runtime_scores(Blip2Retriever.from_artifacts(tmp_path / "art"), images, TEXTS))


def test_scores_do_not_depend_on_the_batch_a_text_is_padded_in(retrieval_tiny_artifacts):
    r = Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)
    together = r.embed_texts(TEXTS)
    alone = np.concatenate([r.embed_texts([t]) for t in TEXTS])
    assert np.abs(together - alone).max() <= 1e-5
    norms = np.linalg.norm(together, axis=-1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    images = _images(2)
    assert np.allclose(np.linalg.norm(r.embed_images(images), axis=-1), 1.0, atol=1e-5)
    assert np.abs(r.itm(images, TEXTS)[:, 2] - r.itm(images, [TEXTS[2]])[:, 0]).max() <= 1e-5


def test_generation_and_retrieval_runtimes_refuse_each_others_artifacts(retrieval_tiny_artifacts, tiny_artifacts):
    from runtime.pipeline import Blip2Pipeline

    with pytest.raises(ArtifactError, match="blip-2-retrieval artifact has no language model"):
        Blip2Pipeline.from_artifacts(retrieval_tiny_artifacts)
    with pytest.raises(ArtifactError, match="has no retrieval heads"):
        Blip2Retriever.from_artifacts(tiny_artifacts)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(llm_family="opt"), "llm_family: expected null or absent"),
    (lambda m: m["stages"].pop("itm"), r"stages\.itm: expected a value \(required stage is missing\)"),
    (lambda m: m["stages"].update(qformer=m["stages"]["vision"]), "stages.qformer: expected only the stages of "
                                                                 "architecture 'blip-2-retrieval'"),
    (lambda m: m["model"].pop("embed_dim"), r"model\.embed_dim: expected a value"),
    (lambda m: m["stages"]["text_embed"]["outputs"][0]["shape"].__setitem__(1, 7),
     r"stages\.text_embed\.outputs\[0\]\.shape\[1\]: expected 16 \(model\.embed_dim\)"),
    (lambda m: m["tokenizer"].update(prefix_ids=[10 ** 6]), r"tokenizer\.prefix_ids\[0\]: expected an integer"),
])
def test_schema_checks_retrieval_manifests(retrieval_tiny_artifacts, change, message):
    from runtime.artifact.schema import check_manifest

    m = json.loads((retrieval_tiny_artifacts / "manifest.json").read_text())
    check_manifest(json.loads(json.dumps(m)), "manifest.json")  # the exported one is valid
    change(m)
    with pytest.raises(ArtifactError, match=message):
        check_manifest(m, "manifest.json")
