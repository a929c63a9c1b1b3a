"""BLIP-2 retrieval (Blip2ForImageTextRetrieval) for the exporter: dims, the torch wrappers of
the ITC and ITM stages, and validation against transformers' own forward.

Each wrapper follows one branch of `Blip2ForImageTextRetrieval.forward` step for step and
shares the loaded model's weights: use_image_text_matching_head=False gives image_embed
(queries) and text_embed (text), True gives itm. The runtime's stage layout is
runtime/families/retrieval.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exporter.comparison import VALIDATION_PROVIDERS, compare, to_numpy, validation_images
from exporter.families.base import ExportFamily
from exporter.torch_stages import VisionStage
from runtime.backends.onnxrt import OrtRunner
from runtime.errors import Blip2EdgeError
from runtime.retriever import Blip2Retriever
from runtime.stages import ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, ITC_IMAGE_EMBEDS, ITC_TEXT_EMBEDS, ITM_LOGITS, PIXEL_VALUES

RETRIEVAL_CLASS = "Blip2ForImageTextRetrieval"
ARCHITECTURE = "blip-2-retrieval"
# Texts of different lengths in one batch (padding), a long one and an empty one.
VALIDATION_TEXTS = ("a big red plain square on the left", "a photo", "", "two dogs playing in the snow on a sunny day")


def is_retrieval(config) -> bool:
    return RETRIEVAL_CLASS in (getattr(config, "architectures", None) or [])


def _query_mask(image_embeds):
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long)


class ImageEmbedStage(nn.Module):
    """image_embeds (B, P, Dv) -> L2-normalised vision_projection of every query output (B, Q, D)."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.vision_projection = model.vision_projection

    def forward(self, image_embeds):
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=_query_mask(image_embeds), return_dict=True).last_hidden_state
        out = out.to(self.vision_projection.weight.dtype)
        return nn.functional.normalize(self.vision_projection(out), dim=-1)


class TextEmbedStage(nn.Module):
    """input_ids, attention_mask (B, T) -> L2-normalised text_projection of [CLS] (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.embeddings = model.embeddings
        self.qformer = model.qformer
        self.text_projection = model.text_projection

    def forward(self, input_ids, attention_mask):
        embeds = self.embeddings(input_ids=input_ids)
        out = self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask,
                           return_dict=True).last_hidden_state
        out = out.to(self.text_projection.weight.dtype)
        return nn.functional.normalize(self.text_projection(out[:, 0, :]), dim=-1)


class ITMStage(nn.Module):
    """image_embeds (B, P, Dv) + input_ids, attention_mask (B, T) -> ITM logits (B, 2): the
    itm_head on the query outputs, averaged over the queries."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.embeddings = model.embeddings
        self.qformer = model.qformer
        self.itm_head = model.itm_head

    def forward(self, image_embeds, input_ids, attention_mask):
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        q = queries.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(queries.shape[:-1], dtype=attention_mask.dtype), attention_mask], dim=1)
        out = self.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=_query_mask(image_embeds),
                           return_dict=True).last_hidden_state
        out = out.to(self.itm_head.weight.dtype)
        return self.itm_head(out[:, :q, :]).mean(dim=1)


class RetrievalExport(ExportFamily):
    name = "retrieval"
    architecture = ARCHITECTURE

    def check(self, config, model: str, dtype: str) -> None:
        q = config.qformer_config
        if not getattr(q, "use_qformer_text_input", False):
            raise Blip2EdgeError(f"'{model}': a retrieval checkpoint whose Q-Former has no text path "
                                 "(qformer_config.use_qformer_text_input is false)")
        if getattr(q, "position_embedding_type", "absolute") != "absolute":
            raise Blip2EdgeError(f"'{model}': Q-Former position_embedding_type "
                                 f"'{q.position_embedding_type}' is not supported (only 'absolute')")

    def model_dims(self, config) -> dict:
        q = config.qformer_config
        return {
            **self.vision_dims(config),
            "qformer_hidden": q.hidden_size,
            "embed_dim": config.image_text_hidden_size,
            "vocab_size": q.vocab_size,
            "max_text_tokens": q.max_position_embeddings,
        }

    def modules(self, hf_model, kv_cache: str | None = None) -> dict:

        return {"vision": VisionStage(hf_model), "image_embed": ImageEmbedStage(hf_model),
                "text_embed": TextEmbedStage(hf_model), "itm": ITMStage(hf_model)}

    def manifest_sections(self, hf_model, processor, float_dtype: str, tmp) -> tuple[dict, list[str]]:
        """No embedding table, prompts or generation: the Q-Former embeds its own text."""
        return {}, []

    def manifest_header(self, hf_model) -> dict:
        return {"architecture": ARCHITECTURE}

    def validate(self, hf_model, processor, manifest, atol: float) -> dict:
        """Each stage against its torch wrapper on real images and texts, then the runtime's
        itc/itm/embeddings against Blip2ForImageTextRetrieval.forward itself."""

        run = {s: OrtRunner(manifest.stage_file(s), list(VALIDATION_PROVIDERS)) for s in self.runtime.stage_names({})}
        images = validation_images(3)
        texts = list(VALIDATION_TEXTS)
        reports = []
        with torch.no_grad():
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(
                hf_model.vision_model.embeddings.patch_embedding.weight.dtype)
            vision = self.modules(hf_model)["vision"](pixels)
            reports.append(compare("vision", {IMAGE_EMBEDS: to_numpy(vision)},
                                   run["vision"].infer({PIXEL_VALUES: pixels.numpy()}), atol))
            reports.append(compare("image_embed", {ITC_IMAGE_EMBEDS: to_numpy(ImageEmbedStage(hf_model)(vision))},
                                   run["image_embed"].infer({IMAGE_EMBEDS: vision.numpy()}), atol))
            tok = processor.tokenizer(texts, padding=True, return_tensors="pt")
            ids, mask = tok["input_ids"], tok["attention_mask"]
            reports.append(compare("text_embed", {ITC_TEXT_EMBEDS: to_numpy(TextEmbedStage(hf_model)(ids, mask))},
                                   run["text_embed"].infer({INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy()}),
                                   atol))
            pair_vision = vision[torch.arange(len(texts)) % len(images)]
            reports.append(compare("itm", {ITM_LOGITS: to_numpy(ITMStage(hf_model)(pair_vision, ids, mask))},
                                   run["itm"].infer({IMAGE_EMBEDS: pair_vision.numpy(), INPUT_IDS: ids.numpy(),
                                                     ATTENTION_MASK: mask.numpy()}), atol))
        end_to_end = compare_with_transformers(hf_model, processor, Blip2Retriever(manifest), images, texts)
        end_to_end.update(ok=end_to_end["max_abs_diff"] <= atol, atol=atol)
        return {"atol": atol, "stages": reports, "retrieval": end_to_end,
                "ok": all(s["ok"] for s in reports) and end_to_end["ok"]}


def reference_scores(hf_model, processor, images, texts) -> dict:
    """transformers' own ITC outputs (one forward over all images and texts) and ITM match
    probabilities (one forward per image, over every text), as numpy float32."""
    with torch.no_grad():
        # The checkpoint's own processor: with image_token_index set it puts the query
        # placeholders before each text, as the model expects.
        enc = processor(images=images, text=list(texts), return_tensors="pt", padding=True)
        pixels = enc["pixel_values"].to(hf_model.vision_model.embeddings.patch_embedding.weight.dtype)
        itc = hf_model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       use_image_text_matching_head=False)
        itm = []
        for i in range(len(images)):
            out = hf_model(pixel_values=pixels[i:i + 1].expand(len(texts), -1, -1, -1), input_ids=enc["input_ids"],
                           attention_mask=enc["attention_mask"], use_image_text_matching_head=True)
            itm.append(torch.softmax(out.logits_per_image.float(), dim=1)[:, 1])
    return {"itc": itc.logits_per_image.float().numpy(), "image_embeds": itc.image_embeds.float().numpy(),
            "text_embeds": itc.text_embeds.float().numpy(), "itm": torch.stack(itm).numpy()}


def compare_with_transformers(hf_model, processor, retriever, images, texts) -> dict:
    """Max abs diff of the runtime's embed_images / embed_texts / itc / itm against transformers'."""
    ref = reference_scores(hf_model, processor, images, texts)
    got = {"itc": retriever.itc(images, texts), "image_embeds": retriever.embed_images(images),
           "text_embeds": retriever.embed_texts(texts), "itm": retriever.itm(images, texts)}
    diffs = {k: float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in ref}
    worst = max(diffs, key=diffs.get)
    return {"stage": "retrieval", "diffs": diffs, "max_abs_diff": diffs[worst], "worst_output": worst,
            "images": len(images), "texts": len(texts)}


FAMILY = RetrievalExport()
