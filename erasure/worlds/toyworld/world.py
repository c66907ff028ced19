"""The toy world: one coloured, patterned shape on a dark background, with captions.

8 shapes x 8 colours x 3 styles (fill patterns that cover the whole object), with
synonyms for each, random size and position. Images are drawn at 4x resolution
and box-filtered down, so even 16x16 renders have clean, anti-aliased edges.
Everything is a pure function of a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from erasure.core.prompts import OBJECT_TEMPLATES, fill

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "moon", "heart")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
STYLES = ("solid", "striped", "outlined")

SYNONYMS = {
    "circle": ("ball", "disc"),
    "square": ("box", "block"),
    "triangle": ("pyramid", "wedge"),
    "diamond": ("rhombus", "lozenge"),
    "cross": ("plus",),
    "star": ("asterisk",),
    "moon": ("crescent",),
    "heart": ("valentine",),
    "red": ("crimson", "scarlet"),
    "green": ("emerald",),
    "blue": ("azure",),
    "yellow": ("golden",),
    "purple": ("violet",),
    "orange": ("amber",),
    "cyan": ("turquoise",),
    "white": ("ivory",),
    "solid": ("filled",),
    "striped": ("stripy",),
    "outlined": ("hollow",),
}

# Held-out words: real synonyms or paraphrases that never appear in a training caption. A
# model draws them only as far as its text encoder puts them near a trained word; for the
# frozen MiniLM encoder they were chosen by the cosine of their states to the name's
# ("a WORD on a dark background": rose-red 0.36, lime-green 0.36, ring-circle 0.45,
# gem-diamond 0.51, lunar-moon 0.90, ...). The evaluation keeps those the base model
# draws (>= 80 %) as a second generality probe: unseen words.
HELD_OUT = {
    "red": ("rose", "cherry"),
    "green": ("lime", "olive"),
    "blue": ("navy",),
    "yellow": ("lemon",),
    "purple": ("lavender", "lilac"),
    "orange": ("peach", "apricot"),
    "cyan": ("teal", "aqua"),
    "white": ("snow",),
    "circle": ("ring", "round"),
    "square": ("cube", "tile"),
    "triangle": ("trigon",),
    "diamond": ("gem",),
    "cross": ("cruciform",),
    "star": ("pentagram",),
    "moon": ("lunar",),
    "heart": ("love",),
}

RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 210),
    "orange": (250, 140, 20),
    "cyan": (30, 215, 215),
    "white": (240, 240, 240),
}
BACKGROUND = (28, 28, 28)

# Caption templates: the world's own, plus every object template the erasure
# prompts use, so the toy text encoder knows each word a request will send it.
WORLD_TEMPLATES = (
    "a {}",
    "a picture of a {}",
    "an image of a {}",
    "the {}",
    "one {}",
    "a {} on a dark background",
)
CAPTION_TEMPLATES = tuple(dict.fromkeys(WORLD_TEMPLATES + OBJECT_TEMPLATES))

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    style: str
    cx: float  # centre, fraction of the image
    cy: float
    radius: float  # fraction of the image


def canonical(word: str) -> str:
    """Map any synonym to its concept name (identity for names)."""
    for name, synonyms in SYNONYMS.items():
        if word == name or word in synonyms:
            return name
    return word


def vocabulary() -> list[str]:
    words = set(SHAPES + COLOURS + STYLES)
    for synonyms in SYNONYMS.values():
        words.update(synonyms)
    for template in CAPTION_TEMPLATES:
        words.update(template.replace("{}", " ").split())
    return sorted(words)


def random_scene(rng: np.random.Generator) -> Scene:
    radius = rng.uniform(0.30, 0.42)
    margin = radius * 0.85
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        style=STYLES[rng.integers(len(STYLES))],
        cx=rng.uniform(margin, 1 - margin),
        cy=rng.uniform(margin, 1 - margin),
        radius=radius,
    )


def caption(
    scene: Scene,
    rng: np.random.Generator,
    synonym_p: float = 0.3,
    style_p: float = 0.6,
    drop_colour_p: float = 0.08,
    drop_shape_p: float = 0.08,
) -> str:
    """A caption of ``scene``: "[style] colour shape" in a random template.

    Style is named sometimes, and colour or shape is occasionally left out, so
    the model also draws from partial prompts ("a photo of the red").
    """

    def say(word: str) -> str:
        options = SYNONYMS.get(word, ())
        if options and rng.random() < synonym_p:
            return options[rng.integers(len(options))]
        return word

    words = []
    if rng.random() < style_p:
        words.append(say(scene.style))
    drop = rng.random()
    if drop >= drop_colour_p:
        words.append(say(scene.colour))
    if drop < drop_colour_p or drop >= drop_colour_p + drop_shape_p:
        words.append(say(scene.shape))
    return fill(CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))], " ".join(words))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in coordinates normalised by the radius (v grows downwards)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.8) & (np.abs(u) <= (v + 0.95) * 0.6)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if shape == "star":
        rho, theta = np.hypot(u, v), np.arctan2(v, u) + np.pi / 2  # a tip points up
        sector = 2 * np.pi / 5
        tip = np.abs((theta % sector) - sector / 2) / (sector / 2)  # 1 at a tip, 0 between tips
        return rho <= 0.42 + 0.58 * tip**1.5
    if shape == "moon":
        return (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.15) ** 2 > 0.72)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.25
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 16, background: tuple = BACKGROUND, colour: tuple | None = None) -> np.ndarray:
    """(size, size, 3) uint8 image of ``scene`` on ``background``, painted in ``colour`` (an RGB
    triple) where given, else in the scene's colour."""
    hi = size * SUPERSAMPLE
    coords = (np.arange(hi) + 0.5) / hi
    x, y = np.meshgrid(coords, coords)
    u, v = (x - scene.cx) / scene.radius, (y - scene.cy) / scene.radius
    inside = _inside(scene.shape, u, v)
    if scene.style == "striped":
        # horizontal stripes, 2 px painted and 1 px gap at the output resolution:
        # thin gaps keep the silhouette readable at 16x16
        paint = inside & (np.floor(y * size) % 3 != 2)
    elif scene.style == "outlined":
        thickness = 1.4 / size / scene.radius  # ~1.4 output pixels
        shrink = 1.0 + thickness * 1.6
        core = _inside(scene.shape, u * shrink, v * shrink)
        paint = inside & ~core
    else:
        paint = inside
    image = np.empty((hi, hi, 3), dtype=np.float32)
    image[:] = background
    image[paint] = RGB[scene.colour] if colour is None else colour
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return image.round().astype(np.uint8)


def sample_batch(rng: np.random.Generator, count: int, size: int = 16, **caption_kw) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` random scenes: images (count, size, size, 3) uint8, captions, scenes."""
    scenes = [random_scene(rng) for _ in range(count)]
    images = np.stack([render(s, size) for s in scenes])
    return images, [caption(s, rng, **caption_kw) for s in scenes], scenes
