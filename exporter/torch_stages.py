"""The PyTorch modules of the stages every BLIP-2 shares: vision and Q-Former.

Each wraps the loaded `Blip2ForConditionalGeneration` and shares its weights (no copies), and
calls transformers' own modules as `Blip2ForConditionalGeneration.generate` does. The LLM
stages are per family, in exporter/families/.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):  # (B, 3, H, W) -> (B, P, Dv)
        return self.vision_model(pixel_values, return_dict=True).last_hidden_state


class QFormerStage(nn.Module):
    """Learned query tokens + Q-Former + language projection: image_embeds -> soft prompt."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds):  # (B, P, Dv) -> (B, Q, Dl)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        # The Q-Former is kept in fp32 by transformers; cast back as generate() does.
        return self.language_projection(out.to(image_embeds.dtype))
