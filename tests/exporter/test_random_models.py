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


def test_released_shapes_by_name():
    """make-model's released names: `full`'s ViT-g and Q-Former with the named checkpoint's LLM."""
    opt = build_config("blip2-opt-6.7b").text_config
    assert (opt.hidden_size, opt.num_hidden_layers, opt.num_attention_heads, opt.ffn_dim, opt.word_embed_proj_dim,
            opt.vocab_size) == (4096, 32, 32, 16384, 4096, 50272)
    xxl = build_config("instructblip-flan-t5-xxl")
    assert xxl.model_type == "instructblip"
    assert (xxl.text_config.d_model, xxl.text_config.num_heads, xxl.text_config.d_ff, xxl.text_config.num_layers) == \
        (4096, 64, 10240, 24)
    v13 = build_config("instructblip-vicuna-13b").text_config
    assert (v13.hidden_size, v13.num_hidden_layers, v13.num_attention_heads, v13.intermediate_size) == \
        (5120, 40, 40, 13824)
    # The -2.7b / -xl / -7b names are `full` with the matching --arch and --llm.
    for name, arch, llm in (("blip2-opt-2.7b", "blip-2", "opt"), ("blip2-flan-t5-xl", "blip-2", "t5"),
                            ("instructblip-flan-t5-xl", "instructblip", "t5"),
                            ("instructblip-vicuna-7b", "instructblip", "llama")):
        assert build_config(name).to_dict() == build_config("full", llm=llm, arch=arch).to_dict()
        assert build_config(name).vision_config.hidden_size == 1408
    with pytest.raises(ValueError, match="blip2-opt-6.7b is --llm opt, not t5: leave --llm out"):
        build_config("blip2-opt-6.7b", llm="t5")


def test_sharded_checkpoint_loads_and_exports_like_the_unsharded_one(tmp_path, tiny_checkpoint, tiny_artifacts):
    """make-model --max-shard-size writes the hub's layout (model-0000k-of-0000N.safetensors and
    model.safetensors.index.json): the same tensors, and an export of identical graphs."""
    import json

    from safetensors import safe_open

    from exporter.export import export
    from runtime.artifact.manifest import load_manifest
    from tests.conftest import run_cli

    sharded = tmp_path / "sharded"
    proc = run_cli("make-model", "tiny", sharded, "--max-shard-size", "100KB")  # the fixture's: seed 0, fp32
    assert proc.returncode == 0, proc.stderr
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    def tensors(files):
        out = {}
        for f in files:
            with safe_open(str(f), framework="np") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    one = tensors([tiny_checkpoint / "model.safetensors"])
    many = tensors(shards)
    assert set(many) == set(one) == set(index["weight_map"])
    assert all((many[k] == one[k]).all() for k in one)
    assert sum(s.stat().st_size for s in shards) < 2 * (tiny_checkpoint / "model.safetensors").stat().st_size

    export(str(sharded), tmp_path / "art", log=lambda s: None)
    got, want = load_manifest(tmp_path / "art"), load_manifest(tiny_artifacts)
    assert {n: got.data["files"][s["file"]] for n, s in got.stages.items()} == \
        {n: want.data["files"][s["file"]] for n, s in want.stages.items()}  # byte-identical graphs


@pytest.mark.parametrize("size, message", [("12", "--max-shard-size '12': no unit"),
                                           ("1.5XB", "--max-shard-size '1.5XB': unknown unit 'XB'"),
                                           ("0MB", "--max-shard-size '0MB': must be more than zero")])
def test_max_shard_size_errors_are_one_line_and_write_nothing(tmp_path, size, message):
    from tests.conftest import run_cli

    proc = run_cli("make-model", "tiny", tmp_path / "m", "--max-shard-size", size)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_released_shape_refuses_a_contradicting_option(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("make-model", "instructblip-vicuna-13b", tmp_path / "m", "--arch", "blip-2")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: instructblip-vicuna-13b is --arch instructblip, not blip-2: leave --arch out", proc.stderr
    proc = run_cli("make-model", "blip2-opt-6.7b", tmp_path / "m", "--variant", "no-bias")
    assert proc.returncode == 2 and "--variant does not apply" in proc.stderr
    assert list(tmp_path.iterdir()) == []
