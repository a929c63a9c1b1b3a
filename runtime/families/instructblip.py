"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, over an LLM family's stages.

The instruction is tokenized twice, as InstructBlipProcessor does: by the Q-Former's BERT
tokenizer ([CLS] text [SEP], padded on its own side, usually the right), whose ids attend
together with the query tokens in every Q-Former self-attention layer; and by the LLM's
tokenizer, laid out after the query embeddings exactly as the LLM family lays out a BLIP-2
prompt (left padding for decoder-only LLMs, right for Flan-T5). Only the query positions leave
the Q-Former stage, projected to the LLM. Everything after the Q-Former is the LLM family's own.
"""

from __future__ import annotations

import numpy as np

from runtime.families.base import Family, pad_prompts
from runtime.options import PromptTooLongError
from runtime.stages import IMAGE_EMBEDS, INSTRUCT_QFORMER, QFORMER_ATTENTION_MASK, QFORMER_INPUT_IDS, VISION, StageSpec

# The LLMs InstructBLIP checkpoints use: Vicuna (LLaMA) and Flan-T5.
INSTRUCTBLIP_LLMS = ("llama", "t5")


class InstructBlipFamily(Family):
    """An LLM family's stages behind the instruction-aware Q-Former."""

    architecture = "instructblip"
    # The instruction itself is the prompt (the processor adds no template); LAVIS captions
    # with this instruction.
    prompts = {"caption": "A short image description:", "caption_prefix": "{}", "vqa": "{}"}

    def __init__(self, llm: Family):
        self.llm = llm
        self.name = llm.name
        self.llm_stages = llm.llm_stages
        self.weight_only_stages = llm.weight_only_stages
        self.logits_stage = llm.logits_stage
        self.prefill_stages = llm.prefill_stages
        self.padding_side = llm.padding_side
        self.stop_strings = llm.stop_strings

    def llm_specs(self, model: dict) -> dict[str, StageSpec]:
        return self.llm.llm_specs(model)

    def stage_specs(self, model: dict) -> dict[str, StageSpec]:
        return {"vision": VISION, "qformer": INSTRUCT_QFORMER, **self.llm_specs(model)}

    def qformer_feeds(self, image_embeds: np.ndarray, prompts, tokenizer, model: dict) -> dict:
        ids = [tokenizer.encode(p) for p in prompts]
        limit = int(model["qformer_max_positions"])
        longest = max(len(x) for x in ids)
        if longest > limit:  # the Q-Former's text positions are learned: no room past them
            raise PromptTooLongError(f"instruction too long for the Q-Former: {longest} tokens, it has {limit} "
                                     "positions")
        padded, mask = pad_prompts(ids, tokenizer.pad_id, tokenizer.padding_side)
        return {IMAGE_EMBEDS: image_embeds, QFORMER_INPUT_IDS: padded, QFORMER_ATTENTION_MASK: mask}

    def layout(self, query, prompt_ids, embed_table, model, generation, float_dtype):
        return self.llm.layout(query, prompt_ids, embed_table, model, generation, float_dtype)

    def new_decoder(self, runners, embed_table, model, generation, float_dtype, io_binding=False):
        return self.llm.new_decoder(runners, embed_table, model, generation, float_dtype, io_binding)

    def position_limit(self, model: dict):
        return self.llm.position_limit(model)


def instructblip_family(llm: Family) -> InstructBlipFamily:
    from runtime.errors import ArtifactError

    if llm.name not in INSTRUCTBLIP_LLMS:
        raise ArtifactError(f"architecture 'instructblip' with LLM family '{llm.name}' is not supported "
                            f"(InstructBLIP LLM families: {', '.join(INSTRUCTBLIP_LLMS)})")
    return InstructBlipFamily(llm)
