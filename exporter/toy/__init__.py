"""The embedded toy models: trained here on synthetic scenes (see train.py), committed in HF
format: BLIP-2 with an OPT decoder (checkpoint/), BLIP-2 with a Flan-T5-style encoder-decoder
(checkpoint_t5/), InstructBLIP with a Vicuna-style LLaMA decoder (checkpoint_instructblip/), and
a retrieval model with ITC/ITM heads and no LLM (checkpoint_retrieval/, train_retrieval.py)."""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
CHECKPOINT_T5_DIR = Path(__file__).resolve().parent / "checkpoint_t5"
CHECKPOINT_RETRIEVAL_DIR = Path(__file__).resolve().parent / "checkpoint_retrieval"
CHECKPOINTS = {"opt": CHECKPOINT_DIR, "t5": CHECKPOINT_T5_DIR}
INSTRUCTBLIP_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint_instructblip"
