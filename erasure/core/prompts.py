"""Prompt templates per concept kind, and prompt augmentation.

MACE augments each concept with about 30 prompts (the paper had an LLM write them;
its code uses a fixed list). These lists are ours. ``{}`` marks where the concept
(or its anchor) goes; it sits at the start, middle and end of prompts so that CFR
sees the concept's influence on tokens both before and after it.
"""

from __future__ import annotations

import random

# The prompt images are generated from (docs/method.md, "Data per concept").
GENERATION_TEMPLATES = {
    "object": "a photo of the {}",
    "person": "a photo of the {}",
    "style": "a photo in the style of {}",
    "explicit": "a photo of a {}",
}

OBJECT_TEMPLATES = (
    "a photo of the {}",
    "a picture of a {}",
    "an image of the {}",
    "a close up photo of a {}",
    "a {} on the ground",
    "a {} in the sun",
    "a small {}",
    "a large {}",
    "a drawing of a {}",
    "a painting of the {}",
    "the {} in the middle of the picture",
    "there is a {} here",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a blurry photo of the {}",
    "a good photo of a {}",
    "a cropped photo of the {}",
    "one {}",
    "a {}",
    "{}",
    "a rendering of a {}",
    "a sketch of the {}",
    "a toy {}",
    "a {} seen from above",
    "a {} next to a wall",
    "a clean {}",
    "a colorful picture of a {}",
    "an old photo of the {}",
    "a {} in a room",
    "look at the {}",
)

PERSON_TEMPLATES = (
    "a photo of the {}",
    "a portrait of {}",
    "a picture of {}",
    "an image of {}",
    "{} smiling",
    "{} at a party",
    "{} on the street",
    "a close up photo of {}",
    "{} in a suit",
    "a painting of {}",
    "a drawing of {}",
    "{} giving a speech",
    "{} sitting on a chair",
    "{} looking at the camera",
    "a black and white photo of {}",
    "a candid photo of {}",
    "{} laughing",
    "{} walking",
    "a headshot of {}",
    "{} on stage",
    "{}",
    "a famous photo of {}",
    "{} in the news",
    "a magazine cover with {}",
    "{} with friends",
    "an old photo of {}",
    "{} at the beach",
    "a sketch of {}",
    "{} in a movie",
    "{} waving",
)

STYLE_TEMPLATES = (
    "a photo in the style of {}",
    "a painting in the style of {}",
    "a landscape by {}",
    "a portrait by {}",
    "art by {}",
    "a picture in the style of {}",
    "a drawing in the style of {}",
    "a city in the style of {}",
    "a still life by {}",
    "a cat painted by {}",
    "a house in the style of {}",
    "a tree in the style of {}",
    "an artwork by {}",
    "{} style",
    "{}",
    "a sunset painted by {}",
    "the sea in the style of {}",
    "a flower by {}",
    "a sketch by {}",
    "a famous painting by {}",
    "a street scene by {}",
    "a mountain in the style of {}",
    "a bird painted by {}",
    "a room in the style of {}",
    "a night sky by {}",
    "a boat in the style of {}",
    "a garden by {}",
    "a face in the style of {}",
    "a dog painted by {}",
    "a river by {}",
)

EXPLICIT_TEMPLATES = (
    "a photo of a {}",
    "a {} person",
    "a {} woman",
    "a {} man",
    "a {} body",
    "{}",
    "a painting of a {} figure",
    "a {} person on the beach",
    "a {} person in a room",
    "a {} model",
    "a {} couple",
    "a {} person in bed",
    "a {} statue",
    "a {} portrait",
    "a drawing of a {} person",
    "a {} person standing",
    "a {} person sitting",
    "an image with {}",
    "a {} person in the forest",
    "a {} dancer",
    "a picture of a {} person",
    "a {} person in the shower",
    "a {} person lying down",
    "a {} photo",
    "a {} scene",
    "a {} person by the pool",
    "a {} body painting",
    "a {} pose",
    "a {} person smiling",
    "an artistic {} photo",
)

TEMPLATES = {
    "object": OBJECT_TEMPLATES,
    "person": PERSON_TEMPLATES,
    "style": STYLE_TEMPLATES,
    "explicit": EXPLICIT_TEMPLATES,
}


def fill(template: str, phrase: str) -> str:
    return template.replace("{}", phrase)


def template_phrases(kind: str, phrases: tuple[str, ...], count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (template, phrase) choices: the kind's templates in a seeded order, each filled with
    the next phrase in turn, so every way of saying the concept is covered."""
    templates = list(TEMPLATES[kind])
    random.Random(seed).shuffle(templates)
    return [(templates[i % len(templates)], phrases[i % len(phrases)]) for i in range(count)]


def augmented_pairs(
    kind: str, variants: tuple[str, ...], anchor: str, count: int, extra_prompts: tuple[str, ...] = (), seed: int = 0
) -> list[tuple[str, str]]:
    """``count`` (concept prompt, anchor prompt) pairs for one concept (``template_phrases``: the
    concept's name and synonyms in seeded templates). User prompts that contain a variant verbatim are added with the
    variant replaced by the anchor.
    """
    pairs = [(fill(template, variant), fill(template, anchor)) for template, variant in template_phrases(kind, variants, count, seed)]
    for prompt in extra_prompts:
        for variant in variants:
            if variant.lower() in prompt.lower():
                start = prompt.lower().index(variant.lower())
                pairs.append((prompt, prompt[:start] + anchor + prompt[start + len(variant):]))
                break
    return pairs


def preserve_prompts(kind_of: dict[str, str], count_per_concept: int = 10, seed: int = 0) -> list[str]:
    """Prompts of retained concepts, each in ``count_per_concept`` templates of its kind."""
    return [prompt for _, prompts in preserve_prompt_groups(kind_of, count_per_concept, seed) for prompt in prompts]


def preserve_prompt_groups(kind_of: dict[str, str], count_per_concept: int = 10, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``preserve_prompts`` concept by concept: (name, its prompts). One random stream runs through
    the concepts in order, so a concept's prompts depend on its place: the prior's statistics lose
    one concept exactly only by replaying the list they were made from (``erasure.erase``)."""
    rng = random.Random(seed)
    groups = []
    for name, kind in kind_of.items():
        templates = list(TEMPLATES[kind])
        rng.shuffle(templates)
        groups.append((name, [fill(t, name) for t in templates[:count_per_concept]]))
    return groups


def template_words() -> list[str]:
    """Every word in every template (a vocabulary for our own tokenizers)."""
    words = set()
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(template.replace("{}", " ").split())
    return sorted(words)
