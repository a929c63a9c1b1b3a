"""BLIP-2 retrieval (transformers' Blip2ForImageTextRetrieval): image-text contrastive (ITC)
embeddings and the image-text matching (ITM) head. No LLM.

Stages, each a graph:
    vision       pixel_values -> image_embeds (B, P, Dv)            the shared ViT contract
    image_embed  image_embeds -> itc_image_embeds (B, Q, D)         query tokens through the Q-Former,
                                                                    vision_projection, L2-normalised
    text_embed   input_ids, attention_mask (B, T) -> itc_text_embeds (B, D)
                                                                    the Q-Former's text path, text_projection
                                                                    of [CLS], L2-normalised
    itm          image_embeds, input_ids, attention_mask -> itm_logits (B, 2)
                                                                    queries + text through the Q-Former with
                                                                    cross-attention, itm_head, mean over queries
Texts are BERT ids ([CLS] ... [SEP]) padded on the right; the ITM stage puts the query
tokens' mask in front of the text's itself (as transformers does). Scoring (max over queries,
the ITM softmax) is numpy in runtime/retriever.py.
"""

from __future__ import annotations

from runtime.families.base import Family
from runtime.stages import (
    ATTENTION_MASK,
    IMAGE_EMBEDS,
    INPUT_IDS,
    ITC_IMAGE_EMBEDS,
    ITC_TEXT_EMBEDS,
    ITM_LOGITS,
    VISION,
    StageSpec,
    TensorSpec,
)

_IMAGE_EMBEDS = TensorSpec(IMAGE_EMBEDS, "float", ("batch", "num_patches", "vision_hidden"))
_TEXT = (TensorSpec(INPUT_IDS, "int64", ("batch", "sequence")), TensorSpec(ATTENTION_MASK, "int64", ("batch", "sequence")))

IMAGE_EMBED = StageSpec(
    name="image_embed",
    file="image_embed.onnx",
    inputs=(_IMAGE_EMBEDS,),
    outputs=(TensorSpec(ITC_IMAGE_EMBEDS, "float", ("batch", "num_query_tokens", "embed_dim")),),
)
TEXT_EMBED = StageSpec(
    name="text_embed",
    file="text_embed.onnx",
    inputs=_TEXT,
    outputs=(TensorSpec(ITC_TEXT_EMBEDS, "float", ("batch", "embed_dim")),),
)
ITM = StageSpec(
    name="itm",
    file="itm.onnx",
    inputs=(_IMAGE_EMBEDS, *_TEXT),
    outputs=(TensorSpec(ITM_LOGITS, "float", ("batch", 2)),),
)


class RetrievalFamily(Family):
    name = "retrieval"
    architecture = "blip-2-retrieval"
    task = "retrieval"
    float_stage = "vision"
    visual_stages = ("vision", "image_embed")
    padding_side = "right"  # BERT's
    prompts: dict = {}

    def stage_specs(self, model: dict) -> dict[str, StageSpec]:
        return {"vision": VISION, "image_embed": IMAGE_EMBED, "text_embed": TEXT_EMBED, "itm": ITM}

    def stage_names(self, model: dict) -> tuple[str, ...]:
        return tuple(self.stage_specs(model))


RETRIEVAL = RetrievalFamily()
