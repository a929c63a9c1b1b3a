"""The committed toy BLIP-2 meets its acceptance bars with transformers' own generate."""

from __future__ import annotations

from exporter.toy import CHECKPOINT_DIR
from exporter.toy.train import CAPTION_BAR, RENDER_SIZE, VQA_BAR, evaluate
from runtime import synthetic


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in CHECKPOINT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir()) < 8_000_000


def test_held_out_accuracy(toy_hf):
    model, processor = toy_hf
    # Seed 10_000 is the training script's held-out set; these 200 were never trained on.
    held_out = synthetic.make_scenes(200, seed=10_000, image_size=RENDER_SIZE)
    metrics = evaluate(model, processor, held_out)
    assert metrics["caption_exact_match"] >= CAPTION_BAR, metrics
    assert metrics["vqa_accuracy"] >= VQA_BAR, metrics


def test_t5_toy_held_out_accuracy():
    from exporter.loading import LoadOptions, load_model
    from exporter.toy import CHECKPOINT_T5_DIR

    model, processor = load_model(str(CHECKPOINT_T5_DIR), LoadOptions())
    assert model.config.text_config.model_type == "t5" and model.config.text_config.is_gated_act
    held_out = synthetic.make_scenes(200, seed=10_000, image_size=RENDER_SIZE)
    metrics = evaluate(model, processor, held_out)
    assert metrics["caption_exact_match"] >= CAPTION_BAR, metrics
    assert metrics["vqa_accuracy"] >= VQA_BAR, metrics
