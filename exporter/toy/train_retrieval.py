"""Trains the toy BLIP-2 retrieval model (Blip2ForImageTextRetrieval: ITC and ITM heads) on the
synthetic scenes, on the CPU, in about 5 minutes on 2 cores.

    flock /tmp/blip2-heavy.lock python -m exporter.toy.train_retrieval    # -> exporter/toy/checkpoint_retrieval

The vision encoder (and the Q-Former's query path, as a start) come from the committed
captioning toy (exporter/toy/checkpoint), which already sees colour, size, position and
texture; the vision encoder stays frozen, so its features are computed once. The Q-Former's
text path, the projections, the ITM head and the queries are trained with BLIP-2's stage-1
objectives: ITC (contrastive, max over queries, learned temperature, every scene with the same
caption counted as a positive) and ITM (the true caption against a caption that differs in one
attribute or a hard negative from the batch).

Acceptance, on a held-out gallery of one freshly drawn scene per distinct caption (all 144):
text->image and image->text recall@1 by ITC, and ITM accuracy on true vs one-attribute-off
captions, measured with transformers' own forward. Seeded; the checkpoint is swapped in only
when it passes (as train.py does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from exporter.checkpoint_files import build_bert_tokenizer, save_checkpoint
from exporter.toy import CHECKPOINT_DIR, CHECKPOINT_RETRIEVAL_DIR
from exporter.toy.train import IMAGE_SIZE, RENDER_SIZE, pixel_tensor, replace_directory
from runtime import synthetic

RECALL_BAR, ITM_BAR = 0.90, 0.90
EMBED_DIM = 64


def all_scenes() -> list[synthetic.Scene]:
    """Every distinct scene description: 6 colours x 2 sizes x 4 positions x 3 textures."""
    return [synthetic.Scene(c, s, p, t) for c, s, p, t in itertools.product(
        synthetic.COLOURS, synthetic.SIZES, synthetic.POSITIONS, synthetic.TEXTURES)]


def gallery(seed: int) -> list[tuple[synthetic.Scene, object]]:
    """One freshly drawn image per distinct caption: the held-out retrieval gallery."""
    rng = np.random.default_rng(seed)
    return [(s, synthetic.render(s, rng, RENDER_SIZE)) for s in all_scenes()]


def near_miss(scene: synthetic.Scene, rng) -> synthetic.Scene:
    """The scene with one attribute changed: the hardest negative caption for ITM."""
    from exporter.toy.train import ATTRIBUTES

    attribute = str(rng.choice(list(ATTRIBUTES)))
    value = str(rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(scene, attribute)]))
    return synthetic.Scene(**{**scene.__dict__, attribute: value})


def build_model(tokenizer):
    """A retrieval model with the captioning toy's vision encoder, query tokens and Q-Former."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    toy = Blip2ForConditionalGeneration.from_pretrained(CHECKPOINT_DIR)
    q = toy.config.qformer_config.to_dict()
    q.update(vocab_size=len(tokenizer), max_position_embeddings=32, use_qformer_text_input=True)
    config = Blip2Config(vision_config=toy.config.vision_config.to_dict(), qformer_config=q,
                         num_query_tokens=toy.config.num_query_tokens, image_text_hidden_size=EMBED_DIM,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config.architectures = ["Blip2ForImageTextRetrieval"]
    model = Blip2ForImageTextRetrieval(config)
    model.vision_model.load_state_dict(toy.vision_model.state_dict())
    missing, unexpected = model.qformer.load_state_dict(toy.qformer.state_dict(), strict=False)
    assert not unexpected and all(".intermediate." in k or ".output." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        model.query_tokens.copy_(toy.query_tokens)
        for layer in model.qformer.encoder.layer:  # the text feed-forward starts as the queries' one
            layer.intermediate.load_state_dict(layer.intermediate_query.state_dict())
            layer.output.load_state_dict(layer.output_query.state_dict())
    return model


def image_features(model, vision):
    """ITC image embeddings (N, Q, D), normalised, from frozen vision features."""
    import torch

    queries = model.query_tokens.expand(vision.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=vision).last_hidden_state
    return torch.nn.functional.normalize(model.vision_projection(out), dim=-1)


def text_features(model, ids, mask):
    import torch

    out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
    return torch.nn.functional.normalize(model.text_projection(out.last_hidden_state[:, 0, :]), dim=-1)


def itm_logits(model, vision, ids, mask):
    import torch

    queries = model.query_tokens.expand(vision.shape[0], -1, -1)
    q = queries.shape[1]
    embeds = model.embeddings(input_ids=ids, query_embeds=queries)
    full = torch.cat([torch.ones(vision.shape[0], q, dtype=mask.dtype), mask], dim=1)
    out = model.qformer(query_embeds=embeds, query_length=q, attention_mask=full,
                        encoder_hidden_states=vision).last_hidden_state
    return model.itm_head(out[:, :q, :]).mean(dim=1)


def losses(model, log_temp, vision, scenes, texts, rng):
    """ITC (both directions, multi-positive) + ITM (positive, near-miss and ITC-hard negatives)."""
    import torch

    f = torch.nn.functional
    captions = [s.caption for s in scenes]
    ids, mask = texts(captions)
    img = image_features(model, vision)  # (B, Q, D)
    txt = text_features(model, ids, mask)  # (B, D)
    sim = torch.einsum("bqd,td->bqt", img, txt).max(dim=1).values / log_temp.exp()  # (B, B)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    itc = (-(targets * f.log_softmax(sim, 1)).sum(1).mean() - (targets * f.log_softmax(sim.t(), 1)).sum(1).mean()) / 2

    # Negatives: half differ in one attribute, half are the batch's most similar other caption.
    with torch.no_grad():
        weights = f.softmax(sim.float(), dim=1).masked_fill(same.bool(), 0) + 1e-6 * (1 - same)
    negatives = []
    for i, scene in enumerate(scenes):
        if rng.random() < 0.5:
            negatives.append(near_miss(scene, rng).caption)
        else:
            negatives.append(captions[int(torch.multinomial(weights[i], 1))])
    neg_ids, neg_mask = texts(negatives)
    length = max(ids.shape[1], neg_ids.shape[1])
    pad = lambda t: f.pad(t, (0, length - t.shape[1]))  # noqa: E731
    logits = itm_logits(model, torch.cat([vision, vision]), torch.cat([pad(ids), pad(neg_ids)]),
                        torch.cat([pad(mask), pad(neg_mask)]))
    labels = torch.cat([torch.ones(len(scenes)), torch.zeros(len(scenes))]).long()
    return itc, f.cross_entropy(logits, labels)


def evaluate(model, processor, held_out, rng) -> dict:
    """Recall@1 both ways by ITC and ITM accuracy, with transformers' own forward."""
    import torch

    model.eval()
    images = [im for _, im in held_out]
    captions = [s.caption for s, _ in held_out]
    with torch.no_grad():
        enc = processor(images=images, text=captions, return_tensors="pt", padding=True)
        out = model(**enc, use_image_text_matching_head=False)
        scores = out.logits_per_image.numpy()  # (images, texts); image i's caption is text i
        truth = np.arange(len(images))
        t2i = float(np.mean(scores.argmax(0) == truth))
        i2t = float(np.mean(scores.argmax(1) == truth))
        wrong = [near_miss(s, rng).caption for s, _ in held_out]
        correct = 0
        for texts, label in ((captions, 1), (wrong, 0)):
            enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
            logits = model(**enc, use_image_text_matching_head=True).logits_per_image
            correct += int((logits.argmax(1) == label).sum())
    model.train()
    return {"text_to_image_recall_at_1": t2i, "image_to_text_recall_at_1": i2t,
            "itm_accuracy_vs_one_attribute_off": correct / (2 * len(images)), "gallery": len(images)}


def main(argv=None) -> int:
    import torch
    from transformers import Blip2Processor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CHECKPOINT_RETRIEVAL_DIR)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=8000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = build_bert_tokenizer([s.caption for s in all_scenes()] * 4, vocab_size=96, image_token=True)
    model = build_model(tokenizer)
    with tempfile.TemporaryDirectory() as scratch:  # a processor configured exactly as the checkpoint's
        save_checkpoint(model, tokenizer, Path(scratch), IMAGE_SIZE)
        processor = Blip2Processor.from_pretrained(scratch)
    print(f"toy retrieval BLIP-2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocab {len(tokenizer)}")

    t0 = time.time()
    train = synthetic.make_scenes(args.train_images, seed=args.seed + 1, image_size=RENDER_SIZE)
    scenes = [s for s, _ in train]
    model.vision_model.requires_grad_(False)
    model.vision_model.eval()
    with torch.no_grad():
        pixels = pixel_tensor(processor, [im for _, im in train])
        vision = torch.cat([model.vision_model(pixels[i:i + 512]).last_hidden_state
                            for i in range(0, len(pixels), 512)])
    print(f"rendered {len(train)} scenes and their frozen vision features in {time.time() - t0:.0f}s")

    def texts(captions):
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    log_temp = torch.nn.Parameter(torch.tensor(float(np.log(0.07))))
    params = [p for p in model.parameters() if p.requires_grad] + [log_temp]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    model.qformer.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = rng.choice(len(train), size=args.batch_size, replace=False)
        itc, itm = losses(model, log_temp, vision[idx], [scenes[i] for i in idx], texts, rng)
        opt.zero_grad()
        (itc + itm).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            log_temp.clamp_(float(np.log(0.001)), float(np.log(0.5)))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  itc {itc.item():.4f}  itm {itm.item():.4f}  temp {log_temp.exp().item():.4f}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    metrics = evaluate(model, processor, gallery(10_000 + args.seed), np.random.default_rng(args.seed + 7))
    print(json.dumps(metrics))
    if min(metrics["text_to_image_recall_at_1"], metrics["image_to_text_recall_at_1"]) < RECALL_BAR \
            or metrics["itm_accuracy_vs_one_attribute_off"] < ITM_BAR:
        print(f"below the acceptance bars (recall@1 >= {RECALL_BAR} both ways, ITM >= {ITM_BAR}); "
              f"{args.out} left as it was")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    try:
        save_checkpoint(model, tokenizer, staging, IMAGE_SIZE)
        (staging / "training.json").write_text(json.dumps(
            {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "train_images": args.train_images,
             "lr": args.lr, "vision_from": "exporter/toy/checkpoint (frozen)", **metrics}, indent=2) + "\n")
        replace_directory(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
