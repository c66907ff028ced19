"""What the toy model draws, judged by the classifier."""

from __future__ import annotations

import numpy as np
import torch

from erasure.diffusion.sampling import sample
from erasure.worlds.toyworld.settings import SAMPLING
from erasure.worlds.toyworld.world import COLOURS, HELD_OUT, SHAPES, STYLES, SYNONYMS


def attribute_accuracy(
    components,
    classifier,
    prompts: list[str],
    expected: list[dict[str, str]],
    seeds: list[int],
    steps: int = SAMPLING.sampler_steps,
    guidance_scale: float = SAMPLING.guidance_scale,
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


def quick_accuracy(
    components, classifier, count: int = 96, seed: int = 7, guidance_scale: float = SAMPLING.guidance_scale
) -> dict:
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


def rotated_scene(i: int, attribute: str, value: str) -> dict[str, str]:
    """Prompt i of a concept: the concept's attribute fixed, the others in rotation, so every
    concept is judged over varied contexts."""
    values = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}[attribute]
    scene = {
        "shape": SHAPES[(i + 3 * values.index(value)) % len(SHAPES)],
        "colour": COLOURS[(5 * i + 1) % len(COLOURS)],
        "style": STYLES[i % len(STYLES)],
    }
    return scene | {attribute: value}


def concept_accuracy_table(
    components, classifier, guidance_scale: float, per_concept: int = 16, steps: int = SAMPLING.sampler_steps
) -> dict:
    """Accuracy of the attribute each prompt names, for every shape, colour and style, by name and by synonym.

    Prompt i of concept c fills the other attributes in rotation ("a striped red
    circle", ...), so every concept is judged over varied contexts.
    Returns {"names": {concept: acc}, "synonyms": {concept: acc}, "mean": {...}}.
    """
    prompts, expected, labels = [], [], []
    rng = np.random.default_rng(0)
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
        for value in values:
            for i in range(per_concept):
                scene = rotated_scene(i, attribute, value)
                for group in ("names", "synonyms"):
                    words = [scene["style"], scene["colour"], scene["shape"]]
                    if group == "synonyms":
                        words = [SYNONYMS[w][rng.integers(len(SYNONYMS[w]))] for w in words]
                    prompts.append("a " + " ".join(words))
                    expected.append({attribute: value})
                    labels.append((group, value))
    images, _ = sample(components, prompts, list(range(len(prompts))), steps=steps, guidance_scale=guidance_scale, batch_size=64)
    predicted = classifier.predict(images)
    table: dict = {"names": {}, "synonyms": {}}
    hits: dict = {}
    for i, ((group, value), wanted) in enumerate(zip(labels, expected)):
        attribute = next(iter(wanted))
        hits.setdefault((group, value), []).append(predicted[attribute][i] == wanted[attribute])
    for (group, value), values in hits.items():
        table[group][value] = float(np.mean(values))
    table["mean"] = {
        f"{group} {attribute}": float(np.mean([table[group][v] for v in values]))
        for group in ("names", "synonyms")
        for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES))
    }
    return table


DRAWABLE = 0.8  # a held-out word the base model draws this often becomes an unseen-word probe


def unseen_word_accuracy(
    components, classifier, guidance_scale: float, per_word: int = 16, steps: int = SAMPLING.sampler_steps
) -> dict:
    """Accuracy of every held-out word (``HELD_OUT``: never in a training caption) in the place
    of its attribute's name ("a striped rose star" for red), the other words by name.

    Returns {"accuracy": {value: {word: acc}}, "drawable": {value: [words >= DRAWABLE]}, "threshold"}.
    """
    prompts, expected, labels = [], [], []
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS)):
        for value in values:
            for word in HELD_OUT.get(value, ()):
                for i in range(per_word):
                    scene = rotated_scene(i, attribute, value)
                    words = [scene["style"], scene["colour"], scene["shape"]]
                    words[("style", "colour", "shape").index(attribute)] = word
                    prompts.append("a " + " ".join(words))
                    expected.append((attribute, value))
                    labels.append((value, word))
    images, _ = sample(components, prompts, list(range(len(prompts))), steps=steps, guidance_scale=guidance_scale, batch_size=64)
    predicted = classifier.predict(images)
    hits: dict = {}
    for i, ((attribute, value), label) in enumerate(zip(expected, labels)):
        hits.setdefault(label, []).append(predicted[attribute][i] == value)
    accuracy: dict = {}
    for (value, word), values in hits.items():
        accuracy.setdefault(value, {})[word] = round(float(np.mean(values)), 4)
    drawable = {value: [w for w, a in words.items() if a >= DRAWABLE] for value, words in accuracy.items()}
    return {"accuracy": accuracy, "drawable": drawable, "threshold": DRAWABLE}
