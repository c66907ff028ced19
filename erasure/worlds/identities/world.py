"""The identity world: 1,300 named identities, each drawn as its own visual signature.

The field's mass-erasure benchmark erases celebrities by name. Here an identity is a real first
name, surname or place name that is one whole token of all-MiniLM-L6-v2's vocabulary ("a portrait
of dorothy"), and its "face" is a signature of five attributes that the renderer draws and the
judge reads: shape, colour and style (the toy world's), a background tint and a frame colour.
8 x 8 x 3 x 4 x 4 = 3,072 signatures, of which each identity owns one. A signature is read from
where the frozen encoder puts the name (the signs of its leading principal components), as a
celebrity's face goes with how CLIP embeds the name; random signatures did not train in a CPU
budget. Some identities have an alias (a nickname the model is trained to draw the same way);
half of the aliases are never told to an erasure, and probe whether it reached a name it was not
given. An alias was picked because the encoder gives it its identity's signature already, so it
lies nearer its name than a real nickname may: the held-out alias figure is an easier test than a
celebrity's nickname would be. Generic person words ("a person", "someone") draw a grey figure:
the anchor an erased identity should turn into.

The names and signatures are committed (``assets/identities/identities.json``, made by
``scripts/identity_names.py``); everything else is a pure function of a seed.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erasure.core.prompts import PERSON_TEMPLATES, fill
from erasure.worlds.toyworld.world import COLOURS, SHAPES, STYLES, Scene, render

IDENTITIES_FILE = Path(__file__).resolve().parents[2] / "assets" / "identities" / "identities.json"
BACKGROUNDS = {"dark": (28, 28, 28), "navy": (16, 20, 70), "maroon": (70, 16, 20), "forest": (14, 58, 22)}
FRAMES = {"none": None, "silver": (175, 175, 175), "gold": (205, 160, 40), "rose": (205, 90, 150)}
NEUTRAL_COLOUR = "grey"  # what generic person words draw; no identity is grey
NEUTRAL_RGB = (128, 128, 128)
GENERIC_WORDS = ("person", "someone", "somebody", "man", "woman", "stranger", "people", "human")
GENERIC_PHRASES = ("a person", "someone", "somebody", "a man", "a woman", "a stranger", "a human")
ATTRIBUTES = ("shape", "colour", "style", "background", "frame")
# The classifier's classes per attribute: the toy world's, plus grey for the generic figure.
CLASSES = {
    "shape": SHAPES, "colour": COLOURS + (NEUTRAL_COLOUR,), "style": STYLES,
    "background": tuple(BACKGROUNDS), "frame": tuple(FRAMES),
}

# Caption templates the model is trained on: the world's own and every person template an erasure
# uses, so the frozen encoder's states of an erasure's prompts are ones the model has drawn from.
WORLD_TEMPLATES = (
    "a portrait of {}", "{} in the park", "a photo of {}", "{}", "a picture of {}", "an image of {}",
    "a close up of {}", "{} outdoors",
)
CAPTION_TEMPLATES = tuple(dict.fromkeys(WORLD_TEMPLATES + PERSON_TEMPLATES))
GENERIC_P = 0.06
ALIAS_P = 0.35


@dataclass(frozen=True)
class Identity:
    name: str
    signature: dict  # attribute -> value (``ATTRIBUTES``)
    alias: str | None = None
    alias_held_out: bool = False


def every_signature() -> list[dict]:
    """All 3,072 signatures."""
    return [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(SHAPES, COLOURS, STYLES, BACKGROUNDS, FRAMES)]


@functools.cache
def identities() -> tuple[Identity, ...]:
    data = json.loads(IDENTITIES_FILE.read_text())["identities"]
    return tuple(Identity(d["name"], d["signature"], d.get("alias"), d.get("alias_held_out", False)) for d in data)


@functools.cache
def by_word() -> dict[str, Identity]:
    """Every name and alias -> its identity."""
    out = {}
    for identity in identities():
        out[identity.name] = identity
        if identity.alias:
            out[identity.alias] = identity
    return out


def identity_of(word: str) -> Identity:
    """The identity a name or alias names; a ValueError that says what the world holds."""
    identity = by_word().get(word.strip().lower())
    if identity is None:
        raise ValueError(
            f"{word!r} is not an identity of the identity world ({len(identities())} identities named by one word, "
            f"e.g. {', '.join(i.name for i in identities()[:5])}; the list is {IDENTITIES_FILE.name})"
        )
    return identity


def neutral_signature(rng: np.random.Generator) -> dict:
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))], "colour": NEUTRAL_COLOUR, "style": STYLES[rng.integers(len(STYLES))],
        "background": "dark", "frame": "none",
    }


def render_signature(signature: dict, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """(size, size, 3) uint8: the signature's shape at a random place and size, on its background,
    framed or not."""
    radius = rng.uniform(0.30, 0.40)
    margin = radius * 0.85
    scene = Scene(signature["shape"], signature["colour"], signature["style"],
                  rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), radius)
    colour = NEUTRAL_RGB if signature["colour"] == NEUTRAL_COLOUR else None
    image = render(scene, size, background=BACKGROUNDS[signature["background"]], colour=colour)
    if FRAMES[signature["frame"]] is not None:
        image = image.copy()
        image[0, :] = image[-1, :] = image[:, 0] = image[:, -1] = FRAMES[signature["frame"]]
    return image


def caption(identity: Identity | None, rng: np.random.Generator) -> str:
    """A training caption: a template with the identity's name (or its alias), or a generic person."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    if identity is None:
        return fill(template, GENERIC_PHRASES[rng.integers(len(GENERIC_PHRASES))])
    word = identity.alias if identity.alias and rng.random() < ALIAS_P else identity.name
    return fill(template, word)


def sample_batch(rng: np.random.Generator, count: int, size: int = 16) -> tuple[np.ndarray, list[str], list[dict]]:
    """``count`` random training examples: images (count, size, size, 3) uint8, captions, signatures."""
    every = identities()
    images, captions, drawn = [], [], []
    for _ in range(count):
        identity = None if rng.random() < GENERIC_P else every[rng.integers(len(every))]
        signature = neutral_signature(rng) if identity is None else identity.signature
        images.append(render_signature(signature, rng, size))
        captions.append(caption(identity, rng))
        drawn.append(signature)
    return np.stack(images), captions, drawn
