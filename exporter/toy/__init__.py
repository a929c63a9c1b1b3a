"""The embedded toy BLIP-2s: trained here on synthetic scenes (see train.py), committed in HF
format: one with an OPT decoder (checkpoint/), one with a Flan-T5-style encoder-decoder
(checkpoint_t5/), and a retrieval model with ITC/ITM heads and no LLM (checkpoint_retrieval/,
train_retrieval.py)."""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
CHECKPOINT_T5_DIR = Path(__file__).resolve().parent / "checkpoint_t5"
CHECKPOINT_RETRIEVAL_DIR = Path(__file__).resolve().parent / "checkpoint_retrieval"
CHECKPOINTS = {"opt": CHECKPOINT_DIR, "t5": CHECKPOINT_T5_DIR}

