"""The embedded toy models: trained here on synthetic scenes (see train.py), committed in HF
format: BLIP-2 with an OPT decoder (checkpoint/), BLIP-2 with a Flan-T5-style encoder-decoder
(checkpoint_t5/), and InstructBLIP with a Vicuna-style LLaMA decoder (checkpoint_instructblip/)."""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
CHECKPOINT_T5_DIR = Path(__file__).resolve().parent / "checkpoint_t5"
CHECKPOINTS = {"opt": CHECKPOINT_DIR, "t5": CHECKPOINT_T5_DIR}
INSTRUCTBLIP_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint_instructblip"
