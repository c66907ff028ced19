"""What the toy model draws, judged by the classifier."""

from __future__ import annotations

import numpy as np
import torch

from erasure.sampling import sample
from erasure.toyworld.world import COLOURS, SHAPES, STYLES, SYNONYMS


def attribute_accuracy(
    components,
    classifier,
    prompts: list[str],
    expected: list[dict[str, str]],
    seeds: list[int],
    steps: int = 25,
    guidance_scale: float = 1.5,
) -> tuple[dict[str, float], torch.Tensor, dict[str, list[str]]]:
    """Fraction of samples whose predicted attribute equals the expected one, per attribute.

    ``expected[i]`` names the attributes prompt i asks for (e.g. {"colour": "red"}).
    Returns (accuracy per attribute, images, predictions).
    """
    images, _ = sample(components, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    predicted = classifier.predict(images)
    totals: dict[str, list[bool]] = {}
    for i, wanted in enumerate(expected):
        for attribute, value in wanted.items():
            totals.setdefault(attribute, []).append(predicted[attribute][i] == value)
    return {k: float(np.mean(v)) for k, v in totals.items()}, images, predicted


def base_prompts(rng: np.random.Generator, count: int, synonyms: bool = False) -> tuple[list[str], list[dict]]:
    """Random fully specified prompts ("a striped red circle"), optionally with synonyms."""
    prompts, expected = [], []
    for _ in range(count):
        shape, colour, style = SHAPES[rng.integers(8)], COLOURS[rng.integers(8)], STYLES[rng.integers(3)]
        words = [style, colour, shape]
        if synonyms:
            words = [SYNONYMS[w][rng.integers(len(SYNONYMS[w]))] for w in words]
        prompts.append("a " + " ".join(words))
        expected.append({"shape": shape, "colour": colour, "style": style})
    return prompts, expected


def quick_accuracy(components, classifier, count: int = 96, seed: int = 7, guidance_scale: float = 1.5) -> dict:
    """Accuracy on ``count`` random prompts with names and as many with synonyms (training-time check)."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, synonyms in (("names", False), ("synonyms", True)):
        prompts, expected = base_prompts(rng, count, synonyms)
        accuracy, _, _ = attribute_accuracy(
            components, classifier, prompts, expected, list(range(count)), guidance_scale=guidance_scale
        )
        out[label] = {k: round(v, 3) for k, v in accuracy.items()}
    return out
