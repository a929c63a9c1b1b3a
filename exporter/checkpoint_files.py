"""Writing BLIP-2 and InstructBLIP checkpoints in Hugging Face format: tokenizers, processor,
weights.

Shared by the toy model's training script and the random-weight model builder, so both give
directories that `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` and
their processors load exactly as they load a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

IMAGE_TOKEN = "<image>"
# OPT's special-token layout: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3.
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
# T5's: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# LLaMA's: <unk>=0, <s>=1 (bos), </s>=2 (eos); no pad token of its own.
LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# BERT's (InstructBLIP's Q-Former tokenizer): [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_opt_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer laid out like OPT's (GPT-2 style, `</s>` prepended as BOS).

    Returns a `PreTrainedTokenizerFast` whose last token is the BLIP-2 image placeholder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # leave room for the image token
        special_tokens=OPT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return fast


def build_t5_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A SentencePiece-style tokenizer laid out like T5's: <pad>=0, </s>=1 (appended), <unk>=2,
    "▁" word prefixes, right padding. Its last token is the BLIP-2 image placeholder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=T5_SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="right")
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return fast


def build_bert_tokenizer(corpus: Iterable[str], vocab_size: int, image_token: bool = False):
    """A WordPiece tokenizer laid out like bert-base-uncased (the Q-Former's): lower-cased,
    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, "[CLS] text [SEP]", right padding.
    image_token: its last token is the BLIP-2 image placeholder (the processor puts it before
    retrieval texts), within `vocab_size`; InstructBLIP's Q-Former tokenizer has none."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - int(image_token), special_tokens=BERT_SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right")
    if image_token:
        fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return fast


def build_llama_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A SentencePiece-BPE tokenizer laid out like LLaMA's (Vicuna's): <unk>=0, <s>=1 (prepended
    as BOS), </s>=2 (eos), the 256 byte-fallback tokens <0x00>..<0xFF> at 3..258, then the merges;
    "▁" word prefixes with the first word's prefix stripped on decode; left padding with the
    [PAD] token InstructBLIP's Vicuna adds after the vocabulary. Its last token is the image
    placeholder."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256 - 2, special_tokens=LLAMA_SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    # The byte-fallback tokens go right after the specials, as in LLaMA's vocabulary: shift the
    # trained ids (merges name tokens by text, so they stay valid).
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n = len(LLAMA_SPECIAL_TOKENS)
    shifted = {t: (i if i < n else i + 256) for t, i in vocab.items()}
    shifted.update({f"<0x{b:02X}>": n + b for b in range(256)})
    data["model"].update(vocab=shifted, byte_fallback=True)
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="left", clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"pad_token": "[PAD]"})
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return fast


def save_checkpoint(model, tokenizer, out_dir: Path, image_size: int, qformer_tokenizer=None,
                    image_tokens: bool = True, max_shard_size: int | str = "5GB") -> None:
    """Saves model weights (safetensors), tokenizer and processor files into `out_dir`; with
    `qformer_tokenizer`, an InstructBLIP processor (the Q-Former's tokenizer in its subfolder).
    image_tokens=False: a processor that puts no query placeholders before the text (retrieval
    checkpoints without image_token_index). Weights over `max_shard_size` (bytes, or "5GB" as
    transformers writes it) go into shards, model-0000k-of-0000N.safetensors, with
    model.safetensors.index.json mapping each tensor to its shard, as on the hub."""
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    if qformer_tokenizer is not None:
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          qformer_tokenizer=qformer_tokenizer,
                                          num_query_tokens=model.config.num_query_tokens)
    else:
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   num_query_tokens=model.config.num_query_tokens if image_tokens else None)
    processor.save_pretrained(out_dir)
