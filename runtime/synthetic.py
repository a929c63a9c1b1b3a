"""Synthetic scenes with known ground truth: one textured square on a varied background.

The toy BLIP-2 is trained on these, and calibration, the demo and the profiler reuse them, so
captions can be checked against the truth before and after quantization. Needs only numpy and
Pillow, so it lives in the runtime package.

Attributes were chosen to be learnable by a small ViT on a CPU in minutes: colour, size,
position and texture. (Shape was tried and needs far more capacity at 64 px; see the exporter
issue.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (145, 45, 185),
    "orange": (245, 135, 25),
}
SIZES: dict[str, float] = {"big": 0.40, "small": 0.20}  # side, as a fraction of the image
POSITIONS: dict[str, tuple[float, float]] = {  # centre, as fractions of the image
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
TEXTURES = ("plain", "striped", "dotted")

QUESTIONS: dict[str, str] = {
    "colour": "what colour is it?",
    "size": "what size is it?",
    "position": "where is it?",
    "texture": "what pattern is it?",
}


@dataclass(frozen=True)
class Scene:
    colour: str
    size: str
    position: str
    texture: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.texture} square {POSITION_PHRASES[self.position]}"

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)

    def qa_pairs(self) -> list[tuple[str, str]]:
        return [(question, self.answer(attribute)) for attribute, question in QUESTIONS.items()]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS))),
        texture=str(rng.choice(TEXTURES)),
    )


def render(scene: Scene, rng: np.random.Generator, image_size: int = 128) -> Image.Image:
    """Draws `scene` with random jitter (background, shade, exact size and place)."""
    s = image_size
    # Background: a dull random tone with a gradient and noise, never saturated, so the
    # object's colour stays unambiguous.
    base = rng.uniform(50, 170) + rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-1.0, 1.0, s)[None, :, None] * rng.uniform(-25, 25, size=3)
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    noise = rng.normal(0, 6, size=(s, s, 3))
    canvas = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")

    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-18, 19, size=3), 0, 255)
    dark = tuple(int(c * 0.35) for c in colour)
    side = SIZES[scene.size] * s * rng.uniform(0.9, 1.1)
    cx, cy = POSITIONS[scene.position]
    cx = cx * s + rng.uniform(-0.04, 0.04) * s
    cy = cy * s + rng.uniform(-0.04, 0.04) * s
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))

    draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in colour))
    period = max(4, s // 16)
    if scene.texture == "striped":
        for x in range(x0, x1 + 1, period):
            draw.rectangle([x, y0, min(x + period // 2 - 1, x1), y1], fill=dark)
    elif scene.texture == "dotted":
        r = max(1, period // 4)
        for y in range(y0 + period // 2, y1, period):
            for x in range(x0 + period // 2, x1, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=dark)
    return image


def make_scenes(n: int, seed: int, image_size: int = 128) -> list[tuple[Scene, Image.Image]]:
    """`n` random scenes and their images, deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        out.append((scene, render(scene, rng, image_size)))
    return out
