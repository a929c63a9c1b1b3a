"""Trains a toy BLIP-2 on synthetic scenes, on the CPU, in minutes: with an OPT decoder
(default) or a Flan-T5-style encoder-decoder (gated-GELU feed-forward, untied embeddings); or a
toy InstructBLIP with a Vicuna-style LLaMA decoder, whose answers depend on the instruction
(the same instruction goes to the Q-Former and to the LLM).

    python -m exporter.toy.train                       # -> exporter/toy/checkpoint
    python -m exporter.toy.train --llm t5              # -> exporter/toy/checkpoint_t5
    python -m exporter.toy.train --arch instructblip   # -> exporter/toy/checkpoint_instructblip

Everything is seeded, so a rerun on the same versions gives the same weights. The checkpoint
is written in Hugging Face format and checked with transformers' own `generate` on held-out
scenes before it is saved; the script fails if the acceptance bars are not met, and then leaves
the checkpoint at --out as it was (the new one is written beside it and swapped in only when it
passes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from exporter.checkpoint_files import (
    IMAGE_TOKEN,
    build_bert_tokenizer,
    build_llama_tokenizer,
    build_opt_tokenizer,
    build_t5_tokenizer,
    save_checkpoint,
)
from exporter.hf_model import generated_from
from exporter.toy import CHECKPOINTS, INSTRUCTBLIP_CHECKPOINT
from runtime import synthetic

IMAGE_SIZE = 64
RENDER_SIZE = 128  # scenes are drawn larger and resized by the processor, as real photos are
VQA_TEMPLATE = "Question: {} Answer:"
CAPTION_BAR, VQA_BAR = 0.95, 0.90
# InstructBLIP's prompts are the instructions themselves (InstructBlipProcessor feeds the raw
# text to both tokenizers); captioning is one instruction among the others.
INSTRUCT_CAPTION = "A short image description:"
INSTRUCT_VQA = "{}"


class Prompts:
    """What the toy is taught to answer: the caption prompt and the question template."""

    def __init__(self, arch: str):
        self.instruct = arch == "instructblip"
        self.caption = INSTRUCT_CAPTION if self.instruct else ""
        self.vqa = INSTRUCT_VQA if self.instruct else VQA_TEMPLATE


def corpus() -> list[str]:
    words = set()
    for colour in synthetic.COLOURS:
        for size in synthetic.SIZES:
            for position in synthetic.POSITIONS:
                for texture in synthetic.TEXTURES:
                    scene = synthetic.Scene(colour, size, position, texture)
                    words.add(scene.caption)
                    words.update(" " + scene.answer(a) for a in synthetic.QUESTIONS)
    words.update(VQA_TEMPLATE.format(q) for q in synthetic.QUESTIONS.values())
    words.add(INSTRUCT_CAPTION)
    return sorted(words) * 4


def text_config(llm: str, tokenizer) -> dict:
    if llm == "llama":  # Vicuna-style: RMSNorm, SwiGLU, RoPE, no biases, untied embeddings
        return dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    if llm == "t5":
        return dict(model_type="t5", vocab_size=len(tokenizer), d_model=128, d_kv=32, num_heads=4, d_ff=512,
                    num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=128, word_embed_proj_dim=128,
                num_hidden_layers=2, ffn_dim=512, num_attention_heads=4, max_position_embeddings=64,
                dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def build_model(tokenizer, llm: str = "opt", qformer_tokenizer=None):
    """A BLIP-2, or with `qformer_tokenizer` an InstructBLIP (whose Q-Former embeds that
    tokenizer's ids)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig, InstructBlipForConditionalGeneration

    instruct = qformer_tokenizer is not None
    config = (InstructBlipConfig if instruct else Blip2Config)(
        vision_config=dict(
            hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
            image_size=IMAGE_SIZE, patch_size=8, attention_dropout=0.0,
            initializer_range=0.02,  # Blip2VisionConfig's default, 1e-10, starts a ViT with no signal
        ),
        qformer_config=dict(
            hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
            cross_attention_frequency=1, encoder_hidden_size=96,
            vocab_size=len(qformer_tokenizer) if instruct else 8,
            max_position_embeddings=64 if instruct else 32,
            pad_token_id=qformer_tokenizer.pad_token_id if instruct else 0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        text_config=text_config(llm, tokenizer),
        num_query_tokens=8,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = (InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration)(config)
    # transformers initialises the query tokens to zero; LayerNorm (eps 1e-12) of a zero vector
    # then has enormous gradients that, once clipped, starve every other weight. LAVIS draws them
    # from N(0, 0.02).
    import torch

    # Likewise the ViT's position embeddings: at std 0.02 they drown under the patch features and
    # position is never learned; at std 1 (what Blip2VisionEmbeddings' constructor draws, before
    # _init_weights shrinks it) a probe learns position in ~150 steps.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
        model.vision_model.embeddings.position_embedding.normal_(0.0, 1.0)
        if llm == "t5":
            # T5 draws an untied lm_head from N(0, 1): after the final RMS norm the first logits
            # have std ~sqrt(d_model) and the loss starts near 40. N(0, 1/d_model) starts it at ~ln(vocab).
            d = model.config.text_config.d_model
            model.language_model.lm_head.weight.normal_(0.0, d ** -0.5)
    return model


def build_tokenizers(arch: str, llm: str):
    """(the LLM's tokenizer, the Q-Former's or None)."""
    if arch == "instructblip":
        # LLaMA's layout spends 256 ids on byte fallback before the merges.
        return build_llama_tokenizer(corpus(), vocab_size=256 + 160), build_bert_tokenizer(corpus(), vocab_size=160)
    return (build_t5_tokenizer if llm == "t5" else build_opt_tokenizer)(corpus(), vocab_size=320), None


def make_examples(tokenizer, scenes, rng, prompts: Prompts | None = None):
    """(prompt ids with their special tokens, target ids ending in EOS) for a caption or a random
    question, and the prompt texts. OPT's byte-level BPE marks a word start with a leading
    space; the Metaspace pieces of T5 and LLaMA do it themselves."""
    from tokenizers import pre_tokenizers

    prompts = prompts or Prompts("blip-2")
    space = " " if isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel) else ""
    out, texts = [], []
    for scene in scenes:
        if rng.random() < 0.4:
            prompt, target = prompts.caption, scene.caption
        else:
            attribute = str(rng.choice(list(synthetic.QUESTIONS)))
            prompt, target = prompts.vqa.format(synthetic.QUESTIONS[attribute]), space + scene.answer(attribute)
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p, t))
        texts.append(prompt)
    return out, texts



def seq2seq_tensors(examples, pad_id):
    """Encoder ids (prompt, right-padded) and decoder labels (target, -100 padded) for T5."""
    import torch

    p_len, t_len = max(len(p) for p, _ in examples), max(len(t) for _, t in examples)
    ids = torch.full((len(examples), p_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(examples), t_len), -100, dtype=torch.long)
    for i, (p, t) in enumerate(examples):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        labels[i, : len(t)] = torch.tensor(t)
    return ids, labels, mask


def batch_tensors(examples, pad_id):
    import torch

    length = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(examples):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(t)
        mask[i, : len(seq)] = 1
    return ids, labels, mask


ATTRIBUTES = {"colour": list(synthetic.COLOURS), "size": list(synthetic.SIZES),
              "position": list(synthetic.POSITIONS), "texture": list(synthetic.TEXTURES)}


def attribute_heads(model):
    """Linear classifiers on the pooled Q-Former output, used only during training.

    BLIP-2 does not learn its Q-Former from the language-model loss alone: stage 1 trains it with
    image-text objectives first. With the LM loss alone, the toy learned colour and nothing else
    in 1200 steps (size, position and texture stayed at chance). These heads stand in for stage 1:
    they give the visual path a direct signal. They are not part of the saved checkpoint.
    """
    import torch

    hidden = model.config.qformer_config.hidden_size
    return torch.nn.ModuleDict({a: torch.nn.Linear(hidden, len(v)) for a, v in ATTRIBUTES.items()})


def attribute_targets(scenes):
    import torch

    return {a: torch.tensor([values.index(getattr(s, a)) for s in scenes]) for a, values in ATTRIBUTES.items()}


def loss_fn(model, pixel_values, ids, labels, mask, heads=None, targets=None, qformer_text=None):
    """`qformer_text`: InstructBLIP's instruction ids and mask for the Q-Former, which reads
    them together with the queries (as InstructBlipForConditionalGeneration.get_image_features)."""
    import torch

    image_embeds = model.vision_model(pixel_values).last_hidden_state
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    if qformer_text is None:
        query_out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    else:
        q_ids, q_mask = qformer_text
        full = torch.cat([torch.ones(queries.shape[:2], dtype=q_mask.dtype), q_mask], dim=1)
        query_out = model.qformer(input_ids=q_ids, attention_mask=full, query_embeds=queries,
                                  encoder_hidden_states=image_embeds).last_hidden_state[:, : queries.shape[1]]
    aux = 0.0
    if heads is not None:
        pooled = query_out.mean(dim=1)
        aux = sum(torch.nn.functional.cross_entropy(h(pooled), targets[a]) for a, h in heads.items())
    query_embeds = model.language_projection(query_out)  # (B, Q, D)
    text_embeds = model.get_input_embeddings()(ids)  # (B, T, D)
    embeds = torch.cat([query_embeds, text_embeds], dim=1)
    b, q = query_embeds.shape[:2]
    full_mask = torch.cat([torch.ones(b, q, dtype=mask.dtype), mask], dim=1)
    if model.config.text_config.is_encoder_decoder:  # labels are the decoder's, shifted inside T5
        return model.language_model(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss + aux
    full_labels = torch.cat([torch.full((b, q), -100, dtype=labels.dtype), labels], dim=1)
    return model.language_model(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss + aux


def pixel_tensor(processor, images):
    import torch

    return torch.from_numpy(processor.image_processor(images, return_tensors="np")["pixel_values"])


def evaluate(model, processor, scenes_images, prompts: Prompts | None = None) -> dict:
    """Exact-match caption and VQA accuracy with transformers' own generate."""
    import torch

    prompts = prompts or Prompts("blip-2")
    model.eval()
    caption_ok = vqa_ok = vqa_total = 0
    with torch.no_grad():
        for start in range(0, len(scenes_images), 50):
            chunk = scenes_images[start : start + 50]
            images = [im for _, im in chunk]
            inputs = processor(images=images, text=[prompts.caption] * len(images), return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=16)
            texts = processor.batch_decode(out[:, generated_from(model, inputs):], skip_special_tokens=True)
            caption_ok += sum(t.strip() == s.caption for t, (s, _) in zip(texts, chunk))
            for attribute, question in synthetic.QUESTIONS.items():
                texts = [prompts.vqa.format(question)] * len(images)
                inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
                out = model.generate(**inputs, max_new_tokens=4)
                texts = processor.batch_decode(out[:, generated_from(model, inputs):], skip_special_tokens=True)
                vqa_ok += sum(t.strip() == s.answer(attribute) for t, (s, _) in zip(texts, chunk))
                vqa_total += len(chunk)
    model.train()
    return {"caption_exact_match": caption_ok / len(scenes_images), "vqa_accuracy": vqa_ok / vqa_total}


def replace_directory(new: Path, out: Path) -> None:
    """Puts the complete directory `new` at `out`. The previous `out` is renamed aside first and
    comes back if the second rename fails; it is removed only once `new` is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    had_old = out.exists()
    if had_old:
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if had_old:
            old.rename(out)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    import torch
    from transformers import Blip2Processor, InstructBlipProcessor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("blip-2", "instructblip"), default="blip-2",
                    help="instructblip: the toy InstructBLIP with a Vicuna-style LLaMA decoder (--llm is ignored)")
    ap.add_argument("--llm", choices=tuple(CHECKPOINTS), default="opt")
    ap.add_argument("--out", type=Path, help="default: the committed checkpoint of --arch and --llm")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=12000)
    ap.add_argument("--held-out", type=int, default=200, help="held-out scenes the acceptance bars are measured on")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.held_out < 1:
        ap.error("--held-out must be >= 1")
    instruct = args.arch == "instructblip"
    if instruct:
        args.llm = "llama"
    args.out = args.out or (INSTRUCTBLIP_CHECKPOINT if instruct else CHECKPOINTS[args.llm])
    prompts = Prompts(args.arch)

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(args.seed)
    tokenizer, qformer_tokenizer = build_tokenizers(args.arch, args.llm)
    model = build_model(tokenizer, args.llm, qformer_tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy {args.arch} ({args.llm}): {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")

    # Save once untrained (to a scratch directory) to get a processor configured exactly as the
    # checkpoint will be.
    with tempfile.TemporaryDirectory() as scratch:
        save_checkpoint(model, tokenizer, Path(scratch), IMAGE_SIZE, qformer_tokenizer)
        processor = (InstructBlipProcessor if instruct else Blip2Processor).from_pretrained(scratch)

    t0 = time.time()
    train = synthetic.make_scenes(args.train_images, seed=args.seed + 1, image_size=RENDER_SIZE)
    held_out = synthetic.make_scenes(args.held_out, seed=10_000 + args.seed, image_size=RENDER_SIZE)
    pixels = pixel_tensor(processor, [im for _, im in train])
    scenes = [s for s, _ in train]
    print(f"rendered and preprocessed {len(train)} training scenes in {time.time() - t0:.0f}s")

    heads = attribute_heads(model)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = rng.choice(len(train), size=args.batch_size, replace=False)
        batch = [scenes[i] for i in idx]
        tensors = seq2seq_tensors if args.llm == "t5" else batch_tensors
        examples, texts = make_examples(tokenizer, batch, rng, prompts)
        ids, labels, mask = tensors(examples, tokenizer.pad_token_id)
        qformer_text = None
        if instruct:
            q = qformer_tokenizer(texts, padding=True, return_tensors="pt")
            qformer_text = (q["input_ids"], q["attention_mask"])
        loss = loss_fn(model, pixels[idx], ids, labels, mask, heads, attribute_targets(batch), qformer_text)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)

    metrics = evaluate(model, processor, held_out, prompts)
    print(json.dumps(metrics))
    if metrics["caption_exact_match"] < CAPTION_BAR or metrics["vqa_accuracy"] < VQA_BAR:
        print(f"below the acceptance bars (caption >= {CAPTION_BAR}, VQA >= {VQA_BAR}); {args.out} left as it was")
        return 1
    # Only a checkpoint that passed is saved: written beside --out, then swapped in.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    try:
        save_checkpoint(model, tokenizer, staging, IMAGE_SIZE, qformer_tokenizer)
        (staging / "training.json").write_text(
            json.dumps({"arch": args.arch, "llm": args.llm, "seed": args.seed, "steps": args.steps,
                        "batch_size": args.batch_size,
                        "train_images": args.train_images, "held_out_images": len(held_out), **metrics}, indent=2)
        )
        replace_directory(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
