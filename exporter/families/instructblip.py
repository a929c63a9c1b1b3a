"""InstructBLIP for the exporter: the instruction-aware Q-Former stage, its checks, validation
and the Q-Former tokenizer's place in the manifest; every LLM part is the LLM family's own.

The Q-Former wrapper calls transformers' own InstructBlipQFormerModel as
`InstructBlipForConditionalGeneration.get_image_features` does: the instruction's token
embeddings (with their learned positions, from 0) are concatenated after the query tokens, the
self-attention mask is [ones for the queries ; the instruction's padding mask] (no causal part:
queries and text attend to each other), only the queries cross-attend to the image, and only the
query positions are projected to the LLM.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from exporter.comparison import compare, to_numpy
from exporter.families.base import ExportFamily
from exporter.processor_spec import tokenizer_spec
from runtime.errors import Blip2EdgeError
from runtime.families import get_family
from runtime.families.instructblip import INSTRUCTBLIP_LLMS
from runtime.stages import IMAGE_EMBEDS, QFORMER_ATTENTION_MASK, QFORMER_INPUT_IDS, QUERY_EMBEDS

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts it


class InstructQFormerStage(nn.Module):
    """image_embeds + instruction ids + mask -> the queries' outputs, projected to the LLM."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds, qformer_input_ids, qformer_attention_mask):  # -> (B, Q, Dl)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        q = queries.shape[1]
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype),
                          qformer_attention_mask], dim=1)  # (B, Q + T)
        out = self.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                           return_dict=True).last_hidden_state[:, :q, :]
        return self.language_projection(out.to(image_embeds.dtype))


def qformer_padding_side(processor) -> str:
    """Where InstructBlipProcessor pads the Q-Former's ids. Not the Q-Former tokenizer's own
    setting: the processor calls it with the text kwargs merged from the LLM tokenizer's init
    kwargs, padding_side included (a Vicuna processor pads both on the left). So it is probed."""
    mask = processor(text=["a", "a photo of a cat on a red couch"], padding=True)["qformer_attention_mask"][0]
    return "left" if mask[0] == 0 else "right"


def qformer_tokenizer_spec(processor) -> dict:

    tokenizer = processor.qformer_tokenizer
    spec = tokenizer_spec(tokenizer)
    return {"file": f"{QFORMER_TOKENIZER_DIR}/{spec['file']}", "prefix_ids": spec["prefix_ids"],
            "suffix_ids": spec["suffix_ids"], "pad_token_id": int(tokenizer.pad_token_id),
            "padding_side": qformer_padding_side(processor)}


class InstructBlipExport(ExportFamily):
    """Mixed in before an LLM family's export class (instructblip_export): the Q-Former stage, its
    validation, dims and manifest sections are InstructBLIP's, the rest the LLM family's own."""

    @property
    def runtime(self):
        return get_family(self.name, "instructblip")

    def check(self, config, model: str, dtype: str) -> None:
        if self.name not in INSTRUCTBLIP_LLMS:
            raise Blip2EdgeError(f"'{model}': InstructBLIP with a '{self.name}' language model is not supported "
                                 f"(supported: {', '.join(INSTRUCTBLIP_LLMS)})")
        super().check(config, model, dtype)

    def model_dims(self, config) -> dict:
        q = config.qformer_config
        return {**super().model_dims(config), "qformer_vocab_size": q.vocab_size,
                "qformer_max_positions": q.max_position_embeddings}

    def modules(self, hf_model, kv_cache: str | None = None) -> dict:
        return {**super().modules(hf_model, kv_cache), "qformer": InstructQFormerStage(hf_model)}

    def architecture_sections(self, processor, out: Path) -> tuple[dict, list[str]]:
        files = sorted(str(p.relative_to(out)) for p in (out / QFORMER_TOKENIZER_DIR).iterdir() if p.is_file())
        return {"qformer_tokenizer": qformer_tokenizer_spec(processor)}, files

    def validate_qformer(self, hf_model, processor, runner, image_embeds, prompts, atol):
        """Instructions of different lengths in one batch, padded as the processor pads them
        (padding inside the Q-Former), against get_image_features' arithmetic."""

        q = processor(text=list(prompts), padding=True, return_tensors="pt")
        ids, mask = q[QFORMER_INPUT_IDS], q[QFORMER_ATTENTION_MASK]
        query = InstructQFormerStage(hf_model)(image_embeds, ids, mask)
        report = compare("qformer", {QUERY_EMBEDS: to_numpy(query)},
                         runner.infer({IMAGE_EMBEDS: image_embeds.numpy(), QFORMER_INPUT_IDS: ids.numpy(),
                                       QFORMER_ATTENTION_MASK: mask.numpy()}), atol)
        return report, query


def instructblip_export(llm: ExportFamily) -> ExportFamily:
    """`llm`'s export family behind InstructBLIP's Q-Former (a class derived from both)."""
    return type(f"InstructBlip{type(llm).__name__}", (InstructBlipExport, type(llm)), {})()
