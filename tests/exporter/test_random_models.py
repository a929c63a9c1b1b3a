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
                                                  ("tied", True, True), ("shallow-decoder", True, False)])
def test_t5_variants(variant, gated, tied):
    t = build_config("tiny", variant, llm="t5").text_config
    assert (t.is_gated_act, t.tie_word_embeddings) == (gated, tied)
    assert (t.num_layers, t.num_decoder_layers) == ((2, 1) if variant == "shallow-decoder" else (2, 2))


def test_shallow_decoder_halves_the_decoder_at_every_size():
    for size, encoder in (("tiny", 2), ("bench", 12), ("full", 24)):
        t = build_config(size, "shallow-decoder", llm="t5").text_config
        assert (t.num_layers, t.num_decoder_layers) == (encoder, encoder // 2)


def test_variant_of_the_other_family_is_refused():
    with pytest.raises(ValueError, match="unknown t5 variant 'post-ln'; valid: default, relu, tied, shallow-decoder"):
        build_config("tiny", "post-ln", llm="t5")


def test_llama_full_is_instructblip_vicuna_7b_shaped():
    cfg = build_config("full", llm="llama")
    t = cfg.text_config
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.max_position_embeddings) == \
        ("llama", 4096, 32, 32, 32, 11008, 32001, 2048)
    assert not t.tie_word_embeddings and t.hidden_act == "silu" and not t.attention_bias and not t.mlp_bias
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.num_query_tokens) == (1408, 39, 32)


def test_llama_tiny_has_gqa_and_bench_is_about_300m():
    t = build_config("tiny", llm="llama").text_config
    assert t.num_key_value_heads < t.num_attention_heads and not t.tie_word_embeddings
    assert build_config("tiny", "mha", llm="llama").text_config.num_key_value_heads == t.num_attention_heads
    b = build_config("bench", llm="llama").text_config
    h, i, n, v = b.hidden_size, b.intermediate_size, b.num_hidden_layers, b.vocab_size
    params = n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h
    assert 280e6 < params < 360e6


def test_llama_tokenizer_is_laid_out_like_llamas(llama_tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tiny_checkpoint)
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    assert tok.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    ids = tok("a photo of é")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "a photo of é"
    assert tok.padding_side == "left" and tok.pad_token == "[PAD]"


def test_instructblip_flan_t5_full_is_instructblip_flan_t5_xl_shaped():
    cfg = build_config("full", llm="t5", arch="instructblip")
    assert cfg.model_type == "instructblip" and cfg.num_query_tokens == 32
    q = cfg.qformer_config
    assert (q.hidden_size, q.num_hidden_layers, q.cross_attention_frequency, q.vocab_size,
            q.max_position_embeddings, q.encoder_hidden_size) == (768, 12, 2, 30523, 512, 1408)
    t = cfg.text_config
    assert (t.d_model, t.num_heads, t.d_ff, t.num_layers, t.vocab_size) == (2048, 32, 5120, 24, 32128)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers) == (1408, 39)


def test_instructblip_opt_is_instructblip_over_blip2_opts_llm():
    """InstructBLIP with OPT, as transformers' own InstructBLIP tests build it: a decoder-only LLM
    behind the instruction-aware Q-Former; `full` has blip2-opt-2.7b's OPT."""
    from transformers import InstructBlipConfig

    for size in ("tiny", "full"):
        cfg = build_config(size, llm="opt", arch="instructblip")
        blip2 = build_config(size, llm="opt")
        assert isinstance(cfg, InstructBlipConfig) and cfg.use_decoder_only_language_model
        assert cfg.text_config.to_dict() == blip2.text_config.to_dict()
        assert cfg.qformer_config.max_position_embeddings == (64 if size == "tiny" else 512)
    t = build_config("full", llm="opt", arch="instructblip").text_config
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == \
        ("opt", 2560, 32, 32, 50272)


def test_instructblip_vicuna_full_is_instructblip_vicuna_7b_shaped():
    cfg = build_config("full", llm="llama", arch="instructblip")
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size, t.tie_word_embeddings) == (4096, 32, 32, 32, 11008, 32001, False)
    assert cfg.use_decoder_only_language_model and cfg.qformer_config.vocab_size == 30523
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.num_query_tokens) == (1408, 39, 32)


@pytest.mark.parametrize("extra", [["--llm", "llama"], ["--variant", "mha"]])
def test_retrieval_refuses_language_model_options(tmp_path, extra):
    from tests.conftest import run_cli

    proc = run_cli("make-model", "tiny", tmp_path / "r", "--arch", "retrieval", *extra)
    assert proc.returncode == 2 and "--arch retrieval has no language model" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
