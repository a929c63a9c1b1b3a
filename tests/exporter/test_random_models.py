"""make-model's Flan-T5 shapes are the real checkpoints' (configs only: nothing is built)."""

from __future__ import annotations

import pytest

from exporter.random_models import build_config


def test_t5_full_is_blip2_flan_t5_xl_shaped():
    cfg = build_config("full", llm="t5")
    t = cfg.text_config
    assert (t.d_model, t.d_kv, t.num_heads, t.d_ff, t.num_layers, t.num_decoder_layers, t.vocab_size) == \
        (2048, 64, 32, 5120, 24, 24, 32128)
    assert t.is_gated_act and t.dense_act_fn == "gelu_new" and not t.tie_word_embeddings
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.num_query_tokens) == (1408, 39, 32)


def test_t5_bench_is_t5_base_shaped():
    t = build_config("bench", llm="t5").text_config
    assert (t.d_model, t.num_heads, t.d_ff, t.num_layers) == (768, 12, 2048, 12)


@pytest.mark.parametrize("variant, gated, tied", [("default", True, False), ("relu", False, False),
                                                  ("tied", True, True)])
def test_t5_variants(variant, gated, tied):
    t = build_config("tiny", variant, llm="t5").text_config
    assert (t.is_gated_act, t.tie_word_embeddings) == (gated, tied)


def test_variant_of_the_other_family_is_refused():
    with pytest.raises(ValueError, match="unknown t5 variant 'post-ln'; valid: default, relu, tied"):
        build_config("tiny", "post-ln", llm="t5")


def test_instructblip_flan_t5_full_is_instructblip_flan_t5_xl_shaped():
    cfg = build_config("full", llm="t5", arch="instructblip")
    assert cfg.model_type == "instructblip" and cfg.num_query_tokens == 32
    q = cfg.qformer_config
    assert (q.hidden_size, q.num_hidden_layers, q.cross_attention_frequency, q.vocab_size,
            q.max_position_embeddings, q.encoder_hidden_size) == (768, 12, 2, 30523, 512, 1408)
    t = cfg.text_config
    assert (t.d_model, t.num_heads, t.d_ff, t.num_layers, t.vocab_size) == (2048, 32, 5120, 24, 32128)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers) == (1408, 39)


def test_instructblip_refuses_an_llm_it_has_no_checkpoint_for():
    from runtime.errors import OptionError

    with pytest.raises(OptionError, match="InstructBLIP has no 'opt' variant"):
        build_config("tiny", llm="opt", arch="instructblip")


def test_instructblip_vicuna_full_is_instructblip_vicuna_7b_shaped():
    cfg = build_config("full", llm="llama", arch="instructblip")
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size, t.tie_word_embeddings) == (4096, 32, 32, 32, 11008, 32001, False)
    assert cfg.use_decoder_only_language_model and cfg.qformer_config.vocab_size == 30523
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.num_query_tokens) == (1408, 39, 32)
