"""The toy world's judge: which prompts test a concept, and whether an image shows it.

A toy concept is one to three attribute words ("red", "circle", "striped",
"red star"), synonyms allowed. For each erased concept the judge writes prompts
that name it (efficacy), prompts that use only the world's synonyms in other
templates (generality: the request's own synonyms are not required), and prompts
of retained neighbours (specificity).
"""

from __future__ import annotations

import numpy as np
import torch

from erasure.core.prompts import fill
from erasure.probes import Probe, with_drawn_seeds
from erasure.spec import normalise
from erasure.worlds.toyworld.world import COLOURS, SHAPES, STYLES, SYNONYMS, canonical

ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
ORDER = ("style", "colour", "shape")
NAME_TEMPLATES = ("a {}", "a photo of the {}", "a picture of a {}", "one {}")
PARAPHRASE_TEMPLATES = ("an image of a {}", "the {} in the middle of the picture", "a drawing of a {}", "look at the {}")


CLASSES = f"(shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; styles {', '.join(STYLES)})"


def concept_attributes(name: str) -> dict[str, str]:
    """{"colour": "red", "shape": "star"} for "crimson star"; ValueError for words outside the world."""
    return _attributes(name, canonical, "is not a toy-world concept: use up to one style, colour and shape word")


def class_attributes(name: str) -> dict[str, str]:
    """{"colour": "blue", "shape": "star"} for "blue star": the classifier's own class names only,
    never a synonym (alias discovery must not learn the world's synonyms from its judge)."""
    return _attributes(name, lambda word: word, "the toy judge knows concepts by its class names only, at most one style, colour and shape")


def _attributes(name: str, value_of, problem: str) -> dict[str, str]:
    attributes = {}
    for word in normalise(name).split():
        value = value_of(word)
        kind = next((k for k, values in ATTRIBUTES.items() if value in values), None)
        if kind is None or kind in attributes:
            raise ValueError(f"{name!r}: {problem} {CLASSES}")
        attributes[kind] = value
    return attributes


def concept_name(attributes: dict[str, str]) -> str:
    return " ".join(attributes[k] for k in ORDER if k in attributes)


def _phrase(attributes: dict[str, str], rng: np.random.Generator | None = None) -> str:
    words = []
    for kind in ORDER:
        if kind in attributes:
            value = attributes[kind]
            words.append(value if rng is None else SYNONYMS[value][rng.integers(len(SYNONYMS[value]))])
    return " ".join(words)


def _fillers(attributes: dict[str, str], count: int) -> list[dict[str, str]]:
    """Complete a concept to ``count`` fully named scenes: the missing colour/shape vary evenly."""
    out = []
    for i in range(count):
        full = dict(attributes)
        if "shape" not in full:
            full["shape"] = SHAPES[i % len(SHAPES)]
        if "colour" not in full:
            full["colour"] = COLOURS[(i * 3 + 1) % len(COLOURS)]
        out.append(full)
    return out


def erasure_probes(
    erased: list[str],
    preserve: list[str],
    per_concept: int | None = None,
    retained_limit: int = 32,
    seed: int = 0,
    unseen: dict[str, tuple[str, ...]] | None = None,
) -> list[Probe]:
    """All probes of an evaluation: erased names, trained synonyms/paraphrases, unseen words,
    retained neighbours.

    ``per_concept`` name prompts and as many synonym prompts per erased concept
    (default 8, or 4 beyond 4 concepts to bound the cost of mass erasure). ``unseen``: the
    held-out words the base model draws (``world.HELD_OUT`` filtered by its accuracy): for
    each erased concept with such a word, half as many prompts that say it only that way.
    """
    rng = np.random.default_rng(seed)
    per_concept = per_concept or (8 if len(erased) <= 4 else 4)
    erased_attrs = [concept_attributes(c) for c in erased]
    probes: list[Probe] = []
    for name, attributes in zip(erased, erased_attrs):
        for i, full in enumerate(_fillers(attributes, per_concept)):
            template = NAME_TEMPLATES[i % len(NAME_TEMPLATES)]
            probes.append(Probe("erased", name, fill(template, _phrase(full)), attributes, 0))
            template = PARAPHRASE_TEMPLATES[i % len(PARAPHRASE_TEMPLATES)]
            synonym_phrase = _phrase(full, rng) if i % 2 == 0 else _phrase_mixed(full, attributes, rng)
            probes.append(Probe("synonym", name, fill(template, synonym_phrase), attributes, 0))
    kept = [concept_attributes(c) for c in preserve] or retained_neighbours(erased_attrs, retained_limit, rng)
    per_kept = max(2, per_concept // 2)
    for attributes in kept:
        name = concept_name(attributes)
        for i, full in enumerate(_fillers(attributes, per_kept)):
            probes.append(Probe("retained", name, fill(NAME_TEMPLATES[i % len(NAME_TEMPLATES)], _phrase(full)), attributes, 0))
    # unseen-word probes last: adding them never shifts the seeds of the others
    for name, attributes in zip(erased, erased_attrs):
        words = [(kind, w) for kind, value in attributes.items() for w in (unseen or {}).get(value, ())]
        if not words:
            continue
        for i, full in enumerate(_fillers(attributes, max(2, per_concept // 2))):
            kind, word = words[i % len(words)]
            phrase = " ".join(word if k == kind else full[k] for k in ORDER if k in full)
            template = PARAPHRASE_TEMPLATES[i % len(PARAPHRASE_TEMPLATES)]
            probes.append(Probe("unseen", name, fill(template, phrase), attributes, 0))
    # other phrasings of compound concepts last of all, for the same reason
    for name, attributes in zip(erased, erased_attrs):
        if len(attributes) < 2:
            continue
        for i, full in enumerate(_fillers(attributes, max(2, per_concept // 2))):
            probes.append(Probe("phrasing", name, other_phrasing(full, i), attributes, 0))
    return [Probe(p.group, p.concept, p.prompt, p.expected, 10_000 + i) for i, p in enumerate(probes)]


# A compound concept's words in another order, or split across the prompt: erasing "blue star"
# must not leave "a star that is blue" drawing one.
PHRASINGS = (
    "a {shape} that is {rest}",
    "a {shape} , {rest}",
    "{rest} : a {shape}",
    "a picture of a {shape} , all {rest}",
)


def other_phrasing(full: dict[str, str], index: int) -> str:
    """The scene with its shape first and its other words after it (or before it, apart)."""
    rest = " and ".join(full[k] for k in ORDER if k in full and k != "shape")
    return PHRASINGS[index % len(PHRASINGS)].format(shape=full["shape"], rest=rest)


def _phrase_mixed(full: dict[str, str], concept: dict[str, str], rng) -> str:
    """Synonyms for the concept's own words only; the filler words keep their names."""
    words = []
    for kind in ORDER:
        if kind in full:
            value = full[kind]
            words.append(SYNONYMS[value][rng.integers(len(SYNONYMS[value]))] if kind in concept else value)
    return " ".join(words)


def retained_neighbours(erased: list[dict[str, str]], limit: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Concepts of the same kind(s) as the erased ones that are not erased: the hardest to keep.

    A colour -> the other colours; a pair "red star" -> pairs sharing a word ("red circle", "blue star").
    """
    erased_keys = {tuple(sorted(a.items())) for a in erased}
    candidates: dict[tuple, dict[str, str]] = {}
    for attributes in erased:
        kinds = list(attributes)
        if len(kinds) == 1:
            kind = kinds[0]
            for value in ATTRIBUTES[kind]:
                candidates[((kind, value),)] = {kind: value}
        else:
            for kind in kinds:  # change one attribute at a time
                for value in ATTRIBUTES[kind]:
                    neighbour = dict(attributes) | {kind: value}
                    candidates[tuple(sorted(neighbour.items()))] = neighbour
    erased_words = {(k, v) for a in erased for k, v in a.items() if len(a) == 1}
    kept = [
        c for key, c in candidates.items()
        if key not in erased_keys and not any((k, v) in erased_words for k, v in c.items())
    ]
    if len(kept) > limit:
        kept = [kept[i] for i in sorted(rng.choice(len(kept), size=limit, replace=False))]
    return kept


def shows(predicted: dict[str, list[str]], index: int, expected: dict[str, str]) -> bool:
    return all(predicted[kind][index] == value for kind, value in expected.items())


class ToyJudge:
    """Wraps the toy classifier: images -> whether each shows its probe's concept."""

    def __init__(self, classifier):
        self.classifier = classifier

    @torch.no_grad()
    def verdicts(self, images: torch.Tensor, probes: list[Probe]) -> list[bool]:
        predicted = self.classifier.predict(images)
        return [shows(predicted, i, p.expected) for i, p in enumerate(probes)]

    @torch.no_grad()
    def anchor_verdicts(self, images: torch.Tensor, probes: list[Probe], anchors: dict[str, str]) -> list[bool | None]:
        """Whether each image shows its probe's concept's *anchor* ("white" for red); None where the
        anchor is not in the classifier's classes ("ground")."""
        predicted = self.classifier.predict(images)
        out: list[bool | None] = []
        for i, probe in enumerate(probes):
            try:
                expected = class_attributes(anchors[probe.concept])
            except (KeyError, ValueError):
                out.append(None)
                continue
            out.append(shows(predicted, i, expected))
        return out


class ToyConceptJudge:
    """The toy classifier as alias discovery asks it (``erasure.methods.discovery.ConceptJudge``):
    does each image show the concept named by its class words? ``expected_of(name)``: the attributes
    a concept's images must show (a ValueError for a concept the classifier cannot see)."""

    def __init__(self, classifier, expected_of=class_attributes):
        self.classifier = classifier
        self.expected_of = expected_of

    def check(self, concept) -> None:
        """A ValueError, before any work, for a concept the judge cannot see."""
        self.expected_of(concept.name)

    @torch.no_grad()
    def shows(self, images: torch.Tensor, concept) -> list[bool]:
        expected = self.expected_of(concept.name)
        predicted = self.classifier.predict(images)
        return [shows(predicted, i, expected) for i in range(len(images))]


# Audit probes: templates and phrasings that neither the world's training captions, the erasure's
# prompts (``erasure.core.prompts``) nor the evaluation above use, so an erasure cannot have been fitted
# to them. The base model draws every one of them (98-100 % of 42 prompts each, measured when they
# were chosen); an audit checks it again on its own probes (``AuditPolicy.min_base_accuracy``).
TOY_AUDIT_TEMPLATES = (
    "this is a {}", "here is a {}", "a single {}", "a simple {}", "an illustration of a {}", "a {} shown here",
    "a little {}", "a {} icon", "my {}", "a {} symbol", "a photograph of one {}", "behold a {}",
)
AUDIT_PHRASINGS = ("a {shape} which is {rest}", "one {shape} , {rest}", "a {shape} in {rest}", "the {shape} is {rest}")


def audit_probes(
    erased: list[str],
    preserve: list[str],
    per_concept: int,
    retained_limit: int,
    seed: int,
    unseen: dict[str, tuple[str, ...]] | None = None,
) -> list[Probe]:
    """Probes of a compliance audit of the ``erased`` concepts' names.

    Names in held-out templates (``erased``); every synonym the world knows, in held-out
    templates (``synonym``): the request's own synonyms included, since a request must never
    shrink what the audit probes, the base model's drawable unseen words (``unseen``) and,
    for compound concepts, held-out phrasings (``phrasing``); retained neighbours (``retained``).
    Which template, synonym and filler each prompt gets, and every seed, come from ``seed``:
    each audit draws its own, and records it so it can be rerun.
    """
    rng = np.random.default_rng(seed)
    probes: list[Probe] = []
    erased_attrs = [concept_attributes(name) for name in erased]
    for name, attributes in zip(erased, erased_attrs):
        fillers = _fillers(attributes, per_concept)
        order = rng.permutation(len(fillers))
        for i in order:
            full = fillers[i]
            probes.append(Probe("erased", name, fill(_pick(TOY_AUDIT_TEMPLATES, rng), _phrase(full)), attributes))
            words = [(kind, w) for kind, value in attributes.items() for w in SYNONYMS[value]]
            words += [(kind, w) for kind, value in attributes.items() for w in (unseen or {}).get(value, ())]
            if words:
                kind, word = words[rng.integers(len(words))]
                group = "unseen" if word not in SYNONYMS[attributes[kind]] else "synonym"
                phrase = " ".join(word if k == kind else full[k] for k in ORDER if k in full)
                probes.append(Probe(group, name, fill(_pick(TOY_AUDIT_TEMPLATES, rng), phrase), attributes))
            if len(attributes) >= 2:
                rest = " and ".join(full[k] for k in ORDER if k in full and k != "shape")
                probes.append(Probe("phrasing", name, _pick(AUDIT_PHRASINGS, rng).format(shape=full["shape"], rest=rest), attributes))
    kept = [concept_attributes(c) for c in preserve] or retained_neighbours(erased_attrs, retained_limit, rng)
    for attributes in kept[:retained_limit]:
        for full in _fillers(attributes, max(2, per_concept // 2)):
            probes.append(Probe("retained", concept_name(attributes), fill(_pick(TOY_AUDIT_TEMPLATES, rng), _phrase(full)), attributes))
    return with_drawn_seeds(probes, rng)


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]
