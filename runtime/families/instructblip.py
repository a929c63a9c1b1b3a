"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, over an LLM family's stages.

The instruction is tokenized twice, as InstructBlipProcessor does: by the Q-Former's BERT
tokenizer ([CLS] text [SEP], padded on the side the processor pads it, which is the LLM
tokenizer's: the processor passes that tokenizer's padding_side to both; the manifest records
it), whose ids attend together with the query tokens in every Q-Former self-attention layer; and
by the LLM's tokenizer, laid out after the query embeddings exactly as the LLM family lays out a
BLIP-2 prompt (left padding for decoder-only LLMs, right for Flan-T5). Only the query positions leave
the Q-Former stage, projected to the LLM. Everything after the Q-Former is the LLM family's own,
except two defaults that belong to InstructBLIP's recipe rather than to the LLM: the prompt is the
instruction as written, and the answer ends at the LLM's end-of-sequence token (no stop string).
"""

from __future__ import annotations

import numpy as np

from runtime.errors import ArtifactError
from runtime.families.base import Family, pad_prompts
from runtime.generation.options import PromptTooLongError
from runtime.stages import IMAGE_EMBEDS, INSTRUCT_QFORMER, QFORMER_ATTENTION_MASK, QFORMER_INPUT_IDS, StageSpec

# The LLMs InstructBLIP runs over: Vicuna (LLaMA) and Flan-T5, the released checkpoints'; OPT,
# the LLM of transformers' own InstructBLIP tests (no released checkpoint).
INSTRUCTBLIP_LLMS = ("llama", "opt", "t5")


class InstructBlipFamily(Family):
    """Mixed in before an LLM family's class (instructblip_family): the Q-Former stage and the
    prompts are InstructBLIP's, everything else is inherited from the LLM family unchanged."""

    architecture = "instructblip"
    # The instruction itself is the prompt (the processor adds no template); LAVIS captions
    # with this instruction.
    prompts = {"caption": "A short image description:", "caption_prefix": "{}", "vqa": "{}"}
    # InstructBLIP is tuned to end every answer with the LLM's end-of-sequence token (LAVIS appends
    # it to each target), and its answers may run over several lines (detailed descriptions):
    # BLIP-2 OPT's newline stop (its captions were trained to end at "\n") would cut them short.
    # transformers' generate stops at eos alone, as here.
    stop_strings: tuple[str, ...] = ()

    def stage_specs(self, model: dict) -> dict[str, StageSpec]:
        return {**super().stage_specs(model), "qformer": INSTRUCT_QFORMER}  # same place in the run order

    def check_instructions(self, prompts, tokenizer, model: dict) -> list[list[int]]:
        """The instructions in the Q-Former's tokens; PromptTooLongError for one past its positions."""
        ids = [tokenizer.encode(p) for p in prompts]
        limit = int(model["qformer_max_positions"])
        longest = max((len(x) for x in ids), default=0)
        if longest > limit:  # the Q-Former's text positions are learned: no room past them
            raise PromptTooLongError(f"instruction too long for the Q-Former: {longest} tokens, it has {limit} "
                                     "positions")
        return ids

    def qformer_feeds(self, image_embeds: np.ndarray, prompts, tokenizer, model: dict) -> dict:
        ids = self.check_instructions(prompts, tokenizer, model)
        padded, mask = pad_prompts(ids, tokenizer.pad_id, tokenizer.padding_side)
        return {IMAGE_EMBEDS: image_embeds, QFORMER_INPUT_IDS: padded, QFORMER_ATTENTION_MASK: mask}


def instructblip_family(llm: Family) -> Family:
    """`llm`'s family behind InstructBLIP's Q-Former: a class derived from InstructBlipFamily and
    the LLM family's own class, so every LLM behaviour (layout, decode step, limits, defaults)
    is the LLM family's."""
    if llm.name not in INSTRUCTBLIP_LLMS:
        raise ArtifactError(f"architecture 'instructblip' with LLM family '{llm.name}' is not supported "
                            f"(InstructBLIP LLM families: {', '.join(INSTRUCTBLIP_LLMS)})")
    return type(f"InstructBlip{type(llm).__name__}", (InstructBlipFamily, type(llm)), {})()
