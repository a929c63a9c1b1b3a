"""Random-weight BLIP-2 checkpoints built from configs, for tests and benchmarks.

    tiny   seconds to build and export; every code path, none of the cost
    bench  ViT-B/16 at 224 + 12-layer Q-Former with 32 queries + OPT-125m (or t5-base) shapes
    full   Salesforce/blip2-opt-2.7b shapes (ViT-g/14 + OPT-2.7b), about 15 GB in fp32, or
           Salesforce/blip2-flan-t5-xl shapes (ViT-g/14 + Flan-T5-XL), about 16 GB in fp32, or
           Salesforce/instructblip-vicuna-7b's vision and LLaMA shapes (ViT-g/14 + Vicuna-7b),
           about 16 GB in fp16

Released shapes by name (RELEASED: `make-model blip2-opt-6.7b DIR`): blip2-opt-2.7b, blip2-opt-6.7b,
blip2-flan-t5-xl, blip2-flan-t5-xxl, instructblip-flan-t5-xl, instructblip-flan-t5-xxl,
instructblip-vicuna-7b, instructblip-vicuna-13b: `full`'s ViT-g/14 and Q-Former with the named
checkpoint's LLM (the ...-2.7b, -xl and -7b names are `full` with the matching --arch / --llm).
They are written as the hub's are: fp16 safetensors in shards of at most `max_shard_size`
(model-00001-of-0000N.safetensors + model.safetensors.index.json), so that exporting one takes
the hub path.

Retrieval checkpoints (Blip2ForImageTextRetrieval: ITC/ITM heads, no LLM) come from
make_retrieval_model: tiny, bench (ViT-B/16 + the 12-layer Q-Former), full (Salesforce/blip2-itm-vit-g
shapes: ViT-g/14 + BERT-base Q-Former, 256-d embeddings, about 4.6 GB in fp32).

`arch` picks BLIP-2 or InstructBLIP (whose Q-Former reads the instruction through its own BERT
tokenizer; `full` = Salesforce/instructblip-flan-t5-xl or -vicuna-7b shapes), `llm` the family:
"opt", "t5" or "llama" (LLaMA under BLIP-2, as transformers' Blip2ForConditionalGeneration accepts
it: the LLM InstructBLIP's Vicuna checkpoints use). InstructBLIP takes all three; with "opt" (the
LLM of transformers' own InstructBLIP tests, no released checkpoint) `full` is blip2-opt-2.7b's OPT.
Variants cover the config space real checkpoints use:
OPT post-layer-norm (opt-350m style) and no biases / no final layer norm; T5 "default" is
Flan-T5 (gated-GELU feed-forward, untied embeddings), "relu" the original T5's feed-forward,
"tied" tied input/output embeddings (output rescaled by d_model ** -0.5), "shallow-decoder" half
as many decoder layers as encoder layers (t5-efficient's "DL" shapes; tiny: 2 and 1).
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import OptionError

SIZES = ("tiny", "bench", "full")
ARCHITECTURES = ("blip-2", "instructblip")
LLMS = ("opt", "t5", "llama")
VARIANTS = {"opt": ("default", "post-ln", "no-bias"), "t5": ("default", "relu", "tied", "shallow-decoder"),
            "llama": ("default", "mha", "head16")}

_VISION = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 image_size=32, patch_size=8),
    "bench": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=224, patch_size=16),
    "full": dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                 image_size=224, patch_size=14),
}
_QFORMER = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 cross_attention_frequency=1),
    "bench": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  cross_attention_frequency=2),
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 cross_attention_frequency=2),
}
_OPT = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=128),
    "bench": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                  max_position_embeddings=2048),
    "full": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                 max_position_embeddings=2048),
}
_T5 = {
    "tiny": dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2),
    "bench": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12),
    "full": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24),
}
# LLaMA: tiny has grouped-query attention (2 KV heads for 4) and, like every size, an untied
# lm_head; bench is a ~320M-parameter LLaMA; full is Vicuna-7b (vocab 32000 + InstructBLIP's [PAD]).
_LLAMA = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128),
    "bench": dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2816, max_position_embeddings=2048),
    "full": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, max_position_embeddings=2048),
}
# Released checkpoints: name -> (arch, llm, changes to the `full` LLM shapes). The hub's configs:
# facebook/opt-6.7b, google/flan-t5-xxl, lmsys/vicuna-13b-v1.1 (+ InstructBLIP's [PAD]).
_OPT_6_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384)
_T5_XXL = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, num_decoder_layers=24)
_VICUNA_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                   intermediate_size=13824)
RELEASED = {
    "blip2-opt-2.7b": ("blip-2", "opt", {}),
    "blip2-opt-6.7b": ("blip-2", "opt", _OPT_6_7B),
    "blip2-flan-t5-xl": ("blip-2", "t5", {}),
    "blip2-flan-t5-xxl": ("blip-2", "t5", _T5_XXL),
    "instructblip-flan-t5-xl": ("instructblip", "t5", {}),
    "instructblip-flan-t5-xxl": ("instructblip", "t5", _T5_XXL),
    "instructblip-vicuna-7b": ("instructblip", "llama", {}),
    "instructblip-vicuna-13b": ("instructblip", "llama", _VICUNA_13B),
}
# transformers' save_pretrained default; the hub's BLIP-2 repositories use 10GB shards (fp32).
DEFAULT_SHARD_SIZE = 5 * 10**9
_LLAMA_VOCAB = {"tiny": 512, "bench": 32001, "full": 32001}
_VOCAB = {"tiny": 512, "bench": 50272, "full": 50272}
_T5_VOCAB = {"tiny": 512, "bench": 32128, "full": 32128}
_QUERIES = {"tiny": 8, "bench": 32, "full": 32}
_TOKENIZER_VOCAB = {"tiny": 500, "bench": 4000, "full": 4000}
# InstructBLIP's Q-Former vocabulary: bert-base-uncased's 30522 + the [DEC] token; 512 positions.
_QFORMER_TEXT = {"tiny": dict(vocab_size=300, max_position_embeddings=64),
                 "bench": dict(vocab_size=30523, max_position_embeddings=512),
                 "full": dict(vocab_size=30523, max_position_embeddings=512)}
_QFORMER_TOKENIZER_VOCAB = {"tiny": 300, "bench": 2000, "full": 2000}

CORPUS = [
    "a photo of a cat sitting on a couch", "two dogs playing in the snow", "a red car parked on the street",
    "Question: what is in the picture? Answer:", "a man riding a bicycle down a hill", "a plate of food",
    "an airplane flying over the mountains", "Question: how many people are there? Answer: two",
    "a bowl of fruit on a wooden table", "a group of people standing around a kitchen", "the quick brown fox",
]


def resolve_shape(size: str, llm: str | None = None, arch: str | None = None) -> tuple[str, str, str, dict]:
    """(size of the vision and Q-Former shapes, llm, arch, changes to that size's LLM shapes) for a
    size (llm default opt, arch default blip-2) or a released name (whose llm and arch a caller
    may repeat, not contradict)."""
    if size in RELEASED:
        want_arch, want_llm, changes = RELEASED[size]
        for option, given, want in (("--arch", arch, want_arch), ("--llm", llm, want_llm)):
            if given is not None and given != want:
                raise OptionError(f"{size} is {option} {want}, not {given}: leave {option} out")
        return "full", want_llm, want_arch, changes
    if size not in SIZES:
        raise OptionError(f"unknown size '{size}'; valid: {', '.join(SIZES)} or a released shape "
                          f"({', '.join(RELEASED)})")
    return size, llm or "opt", arch or "blip-2", {}


def _text_config(size: str, variant: str, llm: str, vocab_size: int | None, pad_token_id: int | None = None,
                 changes: dict | None = None) -> dict:
    changes = changes or {}
    if llm == "llama":
        text = dict(model_type="llama", vocab_size=vocab_size or _LLAMA_VOCAB[size], bos_token_id=1, eos_token_id=2,
                    pad_token_id=pad_token_id, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    **{**_LLAMA[size], **changes})
        if variant == "mha":  # no grouped-query attention
            text.update(num_key_value_heads=text["num_attention_heads"])
        elif variant == "head16":  # heads of 16: GroupQueryAttention's own rotary (runtime.families.llama)
            text.update(hidden_size=16 * text["num_attention_heads"], intermediate_size=32 * text["num_attention_heads"])
        return text
    if llm == "t5":
        text = dict(model_type="t5", vocab_size=vocab_size or _T5_VOCAB[size], pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    **{**_T5[size], **changes})
        if variant == "relu":
            text.update(feed_forward_proj="relu")
        elif variant == "tied":
            text.update(tie_word_embeddings=True)
        elif variant == "shallow-decoder":  # transformers' generate takes fewer decoder layers, not more
            text.update(num_decoder_layers=text["num_layers"] // 2)
        return text
    opt = {**_OPT[size], **changes}
    text = dict(model_type="opt", vocab_size=vocab_size or _VOCAB[size], word_embed_proj_dim=opt["hidden_size"],
                pad_token_id=1, bos_token_id=2, eos_token_id=2, **opt)
    if variant == "post-ln":
        text.update(do_layer_norm_before=False)
    elif variant == "no-bias":
        # (layer_norm_elementwise_affine=False cannot be built: transformers' own init fails on it)
        text.update(enable_bias=False, _remove_final_layer_norm=True)
    return text


def build_config(size: str, variant: str = "default", vocab_size: int | None = None, image_token_index: int = 0,
                 llm: str | None = None, pad_token_id: int | None = None, arch: str | None = None):
    """The config of a size (tiny, bench, full) or a released shape (RELEASED); llm defaults to
    opt and arch to blip-2, or to the released shape's."""
    from transformers import Blip2Config, InstructBlipConfig

    size, llm, arch, changes = resolve_shape(size, llm, arch)
    if arch not in ARCHITECTURES:
        raise OptionError(f"unknown architecture '{arch}'; valid: {', '.join(ARCHITECTURES)}")
    if llm not in LLMS:
        raise OptionError(f"unknown llm '{llm}'; valid: {', '.join(LLMS)}")
    if variant not in VARIANTS[llm]:
        raise OptionError(f"unknown {llm} variant '{variant}'; valid: {', '.join(VARIANTS[llm])}")
    text = _text_config(size, variant, llm, vocab_size, pad_token_id, changes)
    qformer = dict(encoder_hidden_size=_VISION[size]["hidden_size"], vocab_size=16, **_QFORMER[size])
    # Blip2VisionConfig's default initializer_range (1e-10) makes a randomly initialised ViT's
    # output nearly constant, which would hide vision-stage bugs from the parity tests.
    vision = dict(initializer_range=0.02, **_VISION[size])
    if arch == "instructblip":
        qformer.update(_QFORMER_TEXT[size])
        return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                                  num_query_tokens=_QUERIES[size], image_token_index=image_token_index)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=_QUERIES[size], image_token_index=image_token_index)


def make_model(size: str, out_dir: str | Path, variant: str = "default", seed: int = 0, dtype: str = "fp32",
               llm: str | None = None, arch: str | None = None, max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Writes a random-weight BLIP-2 or InstructBLIP checkpoint (safetensors, tokenizers,
    processor) to `out_dir`; `size` is tiny, bench, full or a released shape (RELEASED).

    dtype "fp16" builds the weights in half precision from the start (the `full` model is 15 GB
    in fp32), except the Q-Former and query tokens, which transformers keeps in fp32. Weights
    over `max_shard_size` bytes are split into shards with an index, as on the hub."""
    if dtype not in ("fp32", "fp16"):
        raise OptionError(f"unknown dtype '{dtype}'; valid: fp32, fp16")
    base, llm, arch, _ = resolve_shape(size, llm, arch)
    import torch
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    from exporter.checkpoint_files import (
        IMAGE_TOKEN,
        build_bert_tokenizer,
        build_llama_tokenizer,
        build_opt_tokenizer,
        build_t5_tokenizer,
        save_checkpoint,
    )

    out_dir = Path(out_dir)
    build = {"t5": build_t5_tokenizer, "llama": build_llama_tokenizer}.get(llm, build_opt_tokenizer)
    tokenizer = build(CORPUS * 20, vocab_size=_TOKENIZER_VOCAB[base])
    # The model's vocabulary is larger than the tokenizer's (as OPT's 50272 > 50265, T5's 32128 >
    # 32100): the image placeholder sits at the end of the tokenizer, inside the model's range.
    config = build_config(size, variant, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), llm=llm,
                          pad_token_id=tokenizer.pad_token_id, arch=arch)
    instruct = arch == "instructblip"
    qformer_tokenizer = build_bert_tokenizer(CORPUS * 20, _QFORMER_TOKENIZER_VOCAB[base]) if instruct else None
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if dtype == "fp16" else torch.float32)
    try:
        model = (InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration)(config)
    finally:
        torch.set_default_dtype(previous)
    if dtype == "fp16":  # what from_pretrained keeps in fp32 (_keep_in_fp32_modules)
        if not instruct:
            model.qformer.float()
        model.query_tokens.data = model.query_tokens.data.float()
    # transformers initialises query tokens to zero; random ones make the queries distinct.
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
    model.eval()
    save_checkpoint(model, tokenizer, out_dir, config.vision_config.image_size, qformer_tokenizer,
                    max_shard_size=max_shard_size)
    return out_dir


# Blip2ForImageTextRetrieval: the Q-Former gets its BERT text path (vocabulary, positions) and
# the ITC projections' width (image_text_hidden_size).
# tiny: weights drawn 15x wider than transformers' 0.02 (and query tokens from N(0, 1)), so that
# scores differ between images and texts by tenths, not by 1e-3: the parity tests then see a
# dropped mask or a wrong query count.
_RETRIEVAL = {
    "tiny": dict(vocab_size=None, max_position_embeddings=64, embed_dim=16, init=0.3, query_std=1.0),
    "bench": dict(vocab_size=30522, max_position_embeddings=512, embed_dim=256, init=0.02, query_std=0.02),
    "full": dict(vocab_size=30523, max_position_embeddings=512, embed_dim=256, init=0.02,  # blip2-itm-vit-g's
                 query_std=0.02),
}


def build_retrieval_config(size: str, vocab_size: int, image_token_index: int | None):
    from transformers import Blip2Config

    if size not in SIZES:
        raise OptionError(f"unknown size '{size}'; valid: {', '.join(SIZES)}")
    r = _RETRIEVAL[size]
    qformer = dict(encoder_hidden_size=_VISION[size]["hidden_size"], vocab_size=r["vocab_size"] or vocab_size,
                   max_position_embeddings=r["max_position_embeddings"], use_qformer_text_input=True,
                   initializer_range=r["init"], **_QFORMER[size])
    config = Blip2Config(vision_config=dict(initializer_range=0.02, **_VISION[size]), qformer_config=qformer,
                         num_query_tokens=_QUERIES[size], image_text_hidden_size=r["embed_dim"],
                         image_token_index=image_token_index, initializer_range=r["init"])
    config.architectures = ["Blip2ForImageTextRetrieval"]
    return config


def make_retrieval_model(size: str, out_dir: str | Path, seed: int = 0, image_tokens: bool = True) -> Path:
    """Writes a random-weight Blip2ForImageTextRetrieval checkpoint (safetensors, BERT-style
    tokenizer, processor) to `out_dir`. image_tokens=False: no image_token_index, and a processor
    that gives the text ids alone (transformers' other input layout for this model)."""
    import torch
    from transformers import Blip2ForImageTextRetrieval

    from exporter.checkpoint_files import IMAGE_TOKEN, build_bert_tokenizer, save_checkpoint

    out_dir = Path(out_dir)
    tokenizer = build_bert_tokenizer(CORPUS * 20, vocab_size=_TOKENIZER_VOCAB[size], image_token=True)
    # The processor puts num_query_tokens image placeholders before each text; the model drops
    # them again (image_token_index set), as in the hub's blip2-itm-vit-g.
    config = build_retrieval_config(size, len(tokenizer),
                                    tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if image_tokens else None)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # transformers initialises query tokens to zero; random ones make the queries distinct
        model.query_tokens.normal_(0, _RETRIEVAL[size]["query_std"])
    model.eval()
    save_checkpoint(model, tokenizer, out_dir, config.vision_config.image_size, image_tokens=image_tokens)
    return out_dir
