"""Writing BLIP-2 checkpoints in Hugging Face format: tokenizer, processor, weights.

Shared by the toy model's training script and the random-weight model builder, so both give
directories that `Blip2ForConditionalGeneration.from_pretrained` and `Blip2Processor` load
exactly as they load a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

IMAGE_TOKEN = "<image>"
# OPT's special-token layout: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3.
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
# T5's: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
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


def build_bert_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A WordPiece tokenizer laid out like bert-base-uncased (the Q-Former's): lower-cased,
    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, "[CLS] text [SEP]", right padding. Its last
    token is the BLIP-2 image placeholder (the processor puts it before retrieval texts)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - 1, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right")
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return fast


def save_checkpoint(model, tokenizer, out_dir: Path, image_size: int, image_tokens: bool = True) -> None:
    """Saves model weights (safetensors), tokenizer and processor files into `out_dir`.
    image_tokens=False: a processor that puts no query placeholders before the text (retrieval
    checkpoints without image_token_index)."""
    from transformers import Blip2Processor, BlipImageProcessor

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = Blip2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_query_tokens=model.config.num_query_tokens if image_tokens else None,
    )
    processor.save_pretrained(out_dir)
