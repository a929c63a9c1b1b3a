"""Videos the video tests make for themselves: toy scenes (runtime/synthetic.py) with known
scene-change times, written with PyAV."""

from __future__ import annotations

from runtime.synthetic import Scene
from runtime.video.synthetic_video import Shot

# Four shots of 2 s: each a different scene on its own background.
SCENES = [Scene("red", "big", "bottom", "striped"), Scene("blue", "big", "right", "plain"),
          Scene("green", "big", "left", "striped"), Scene("yellow", "small", "top", "plain")]
SHOTS = [Shot(s, 2.0) for s in SCENES]
CHANGES = [2.0, 4.0, 6.0]
FPS = 10
# Harder cuts for scene detection: the same background (seed 3), only the square changes.
SUBTLE = [Shot(Scene("purple", "big", "left", "plain"), 1.5, seed=3),
          Shot(Scene("purple", "big", "right", "plain"), 1.5, seed=3),
          Shot(Scene("orange", "big", "right", "striped"), 1.5, seed=3),
          Shot(Scene("orange", "small", "right", "striped"), 1.5, seed=3)]
SUBTLE_CHANGES = [1.5, 3.0, 4.5]
# For alerts: the target scene is on screen from 2 s to 5 s.
TARGET = Scene("blue", "big", "left", "striped")
ALERT_SHOTS = [Shot(Scene("red", "small", "top", "plain"), 2.0), Shot(TARGET, 3.0),
               Shot(Scene("green", "big", "bottom", "dotted"), 2.0)]
