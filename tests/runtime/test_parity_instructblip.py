"""InstructBLIP: the torch-free pipeline gives `InstructBlipForConditionalGeneration.generate`'s
token ids on the same weights, with the instruction fed to both tokenizers as
InstructBlipProcessor does, different instructions per image in one batch, greedy / beams /
sampling; and the instruction-aware Q-Former stage matches PyTorch with padding inside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.pipeline import Blip2Pipeline
from runtime.stages import IMAGE_EMBEDS, PIXEL_VALUES, QUERY_EMBEDS
from tests.runtime.test_parity import images

# Different lengths in the Q-Former's tokens and in the LLM's: padding in both.
INSTRUCTIONS = ["A short image description:", "what colour is it?",
                "Describe the picture in detail, and say where the square is.", "where is it?"]
# (make_model llm, variant, seed): Flan-T5 (gated-GELU, untied); LLaMA with grouped-query
# attention (2 KV heads for 4) and an untied lm_head; LLaMA with full multi-head attention (Vicuna);
# OPT (transformers' own InstructBLIP test LLM: learned positions, `</s>` as BOS, shared KV cache).
VARIANTS = [("t5", "default", 3), ("llama", "default", 5), ("llama", "mha", 6), ("opt", "default", 7)]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{llm}-{v}" for llm, v, _ in VARIANTS])
def instructblip(request, tmp_path_factory):
    """(artifacts, (hf model, processor)) of a tiny random InstructBLIP, exported once."""
    from exporter.export import export
    from exporter.loading import LoadOptions, load_model
    from exporter.random_models import make_model

    llm, variant, seed = request.param
    name = f"{llm}-{variant}"
    ckpt = make_model("tiny", tmp_path_factory.mktemp("ibckpt") / name, variant=variant, llm=llm, seed=seed,
                      arch="instructblip")
    out = tmp_path_factory.mktemp("ibart") / name
    report = export(str(ckpt), out, log=lambda s: None)
    assert report["ok"] and report["stages"][1]["stage"] == "qformer"
    return out, load_model(str(ckpt), LoadOptions())


def hf_generate(hf, ims, prompts, eos, **kw):
    model, processor = hf
    inputs = processor(images=ims, text=prompts, return_tensors="pt", padding=True)
    assert {"qformer_input_ids", "qformer_attention_mask"} <= set(inputs)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    start = 1 if model.config.text_config.is_encoder_decoder else inputs["input_ids"].shape[1]
    rows = []
    for r in out[:, start:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


CASES = [
    pytest.param(dict(max_new_tokens=10), id="greedy"),
    pytest.param(dict(max_new_tokens=10, num_beams=3), id="beam3"),
    pytest.param(dict(max_new_tokens=8, num_beams=4, length_penalty=0.6, early_stopping=True), id="beam4-early"),
    pytest.param(dict(max_new_tokens=10, repetition_penalty=1.3, min_new_tokens=3), id="greedy-penalties"),
    # Sampling with one candidate left is deterministic: the sampling path's processors
    # (temperature, top-k) are compared token for token.
    pytest.param(dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=1), id="sample-top1"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_token_identical(instructblip, kw, batch):
    artifacts, hf = instructblip
    ims, prompts = images(batch), INSTRUCTIONS[-batch:]
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    got = [r.tokens for r in pipe.generate(ims, prompts, stop_strings=(), seed=0, **kw)]
    assert got == hf_generate(hf, ims, prompts, pipe.defaults.eos_token_ids, **kw)
    assert any(len(r) > 1 for r in got)


def test_defaults_are_instructblips_over_the_llm_familys(instructblip):
    """The manifest's prompts are the instruction as written and no stop string is set (the answer
    ends at the LLM's eos, as generate ends it), whatever the LLM: BLIP-2 OPT's newline stop is
    not inherited. The LLM's own ids (eos, pad) and KV layout are."""
    artifacts, (model, _) = instructblip
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    assert pipe.prompts["vqa"] == "{}" and pipe.prompts["caption"] == "A short image description:"
    assert pipe.manifest.data["generation"]["stop_strings"] == [] and pipe.defaults.stop_strings == ()
    assert pipe.defaults.eos_token_ids == (model.config.text_config.eos_token_id,)
    assert pipe.family.llm_stages == (("encoder", "cross_kv", "decoder") if model.config.text_config.is_encoder_decoder
                                      else ("decoder",))


def test_the_instruction_changes_the_queries(instructblip):
    """The same image under two instructions gives two different query embeddings (the
    instruction reaches the Q-Former). With right padding each row of a padded batch equals that
    row alone; left padding (what a Vicuna processor does) shifts the Q-Former's learned text
    positions in transformers too, which test_qformer_stage_matches_transformers covers."""
    artifacts, _ = instructblip
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    im = images(1)[0]
    batch = pipe.encode([im] * 4, {}, INSTRUCTIONS)
    assert not np.allclose(batch[0], batch[1], atol=1e-4)
    if pipe.qformer_tokenizer.padding_side == "left":
        return
    for i, prompt in enumerate(INSTRUCTIONS):
        alone = pipe.encode([im], {}, [prompt])
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


def test_qformer_stage_matches_transformers_with_padding_inside(instructblip):
    """The exported stage on a right-padded batch of different-length instructions against
    transformers' own get_image_features on the processor's padded inputs."""
    artifacts, (model, processor) = instructblip
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    ims = images(4, seed=9)
    inputs = processor(images=ims, text=INSTRUCTIONS, return_tensors="pt", padding=True)
    mask = inputs["qformer_attention_mask"]
    assert mask.min() == 0 and mask.sum(1).unique().numel() == 4  # four lengths, padded
    with torch.no_grad():
        want = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"], mask).numpy()
    image_embeds = pipe.runners["vision"].infer({PIXEL_VALUES: inputs["pixel_values"].numpy()})[IMAGE_EMBEDS]
    feeds = pipe.family.qformer_feeds(image_embeds, INSTRUCTIONS, pipe.qformer_tokenizer, pipe.model)
    np.testing.assert_array_equal(feeds["qformer_input_ids"], inputs["qformer_input_ids"].numpy())
    np.testing.assert_array_equal(feeds["qformer_attention_mask"], mask.numpy())
    got = pipe.runners["qformer"].infer(feeds)[QUERY_EMBEDS]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_caption_ask_and_stream_use_the_manifest_prompts(instructblip):
    artifacts, hf = instructblip
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    ims = images(2, seed=4)
    eos, kw = pipe.defaults.eos_token_ids, dict(max_new_tokens=8)
    caption = hf_generate(hf, ims, [pipe.prompts["caption"]] * 2, eos, **kw)
    assert [r.tokens for r in pipe.caption(ims, stop_strings=(), **kw)] == caption
    assert [r.tokens for r in pipe.ask(ims, "where is it?", stop_strings=(), **kw)] == \
        hf_generate(hf, ims, ["where is it?"] * 2, eos, **kw)
    for beams in (1, 3):
        pieces = list(pipe.stream(ims[0], question="what colour is it?", num_beams=beams, **kw))
        result = pipe.ask(ims[:1], "what colour is it?", num_beams=beams, **kw)[0]
        assert "".join(pieces) == result.text


def test_an_instruction_longer_than_the_qformer_positions_is_refused(instructblip):
    from runtime.generation.options import PromptTooLongError

    artifacts, _ = instructblip
    pipe = Blip2Pipeline.from_artifacts(artifacts)
    limit = pipe.model["qformer_max_positions"]
    with pytest.raises(PromptTooLongError, match=f"instruction too long for the Q-Former: .* it has {limit}"):
        pipe.ask(images(1), " ".join(["where"] * limit))
