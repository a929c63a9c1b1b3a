"""The embedded toy BLIP-2: trained here on synthetic scenes (see train.py), committed in HF format."""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
