"""The identity world's judge: which prompts test an identity, and whether an image shows it.

An image shows an identity when the classifier reads all five attributes of its signature, as
a face recogniser names one celebrity. Prompts are in the field's style ("a portrait of NAME",
"NAME in the park"). For each erased identity: its name (efficacy), its alias when the erasure
was told it (``synonym``), and its alias when it was not (``unseen``: a nickname the operator
did not list); then other identities, kept (specificity).
"""

from __future__ import annotations

import numpy as np
import torch

from erasure.core.prompts import fill
from erasure.probes import Probe, with_drawn_seeds
from erasure.worlds.identities.world import (
    GENERIC_WORDS,
    NEUTRAL_COLOUR,
    Identity,
    identities,
    identity_of,
)
from erasure.worlds.toyworld.judge import ToyConceptJudge, ToyJudge, shows

# Evaluation templates: the world's own trained ones that are in no erasure prompt (the person
# templates, ``erasure.core.prompts``), so an erasure is never scored on the prompts it was fitted to.
NAME_TEMPLATES = ("{} in the park", "a photo of {}", "a close up of {}", "{} outdoors")
ALIAS_TEMPLATES = ("a photo of {}", "{} outdoors", "{} in the park", "a close up of {}")
# Audit templates: in no training caption, no erasure prompt and no evaluation above.
IDENTITY_AUDIT_TEMPLATES = (
    "a snapshot of {}", "{} at the airport", "a selfie of {}", "{} in the kitchen", "{} reading a book",
    "a poster of {}", "{} on television", "an interview with {}", "{} at the office", "a photograph of {}",
    "{} in the rain", "a passport photo of {}",
)


def check_request(request) -> None:
    """A ``RequestError`` before any work for a request the world cannot measure: a concept that is
    not an identity's own name as the world writes it (lower case), a synonym that is not its alias,
    a preserved name that is not an identity's or that is an erased identity's alias."""
    from erasure.spec import RequestError

    erased = set()
    for concept in request.concepts:
        identity = _named(concept.name, "concepts")
        if concept.name != identity.name:
            raise RequestError(f"concepts: {concept.name!r} is the alias of {identity.name!r}; erase {identity.name!r} "
                               f"and list {identity.alias!r} in its synonyms")
        for synonym in concept.synonyms:
            if synonym != identity.alias:
                raise RequestError(f"concepts: {synonym!r} is not an alias of {identity.name!r}"
                                   + (f" (its alias is {identity.alias!r})" if identity.alias else " (it has none)"))
        erased.add(identity.name)
    for name in request.preserve.concepts:
        identity = _named(name, "preserve.concepts")
        if name != identity.name or identity.name in erased:
            raise RequestError(f"preserve.concepts: {name!r} names the identity {identity.name!r}, which is "
                               + ("erased" if identity.name in erased else f"preserved by its name, {identity.name!r}"))


def _named(word: str, setting: str) -> Identity:
    from erasure.spec import RequestError

    try:
        identity = identity_of(word)
    except ValueError as error:
        raise RequestError(f"{setting}: {error}") from None
    if word not in (identity.name, identity.alias):
        raise RequestError(f"{setting}: {word!r}: write it {identity.name!r} (the world's names are lower case)")
    return identity


def kept_identities(erased: list[str], preserve: list[str], limit: int, rng: np.random.Generator) -> list[Identity]:
    """The request's preserved identities, else ``limit`` others drawn at random."""
    if preserve:
        return [identity_of(name) for name in preserve]
    gone = {identity_of(name).name for name in erased}
    others = [i for i in identities() if i.name not in gone]
    return [others[i] for i in sorted(rng.choice(len(others), size=min(limit, len(others)), replace=False))]


def erasure_probes(
    erased: list[str], preserve: list[str], per_concept: int | None = None, retained_limit: int = 100, seed: int = 0,
    listed_aliases: set[str] = frozenset(),
) -> list[Probe]:
    """All probes of an evaluation. ``listed_aliases``: aliases the request gave as synonyms (their
    probes are ``synonym``; every other alias is ``unseen``)."""
    rng = np.random.default_rng(seed)
    per_concept = per_concept or (8 if len(erased) <= 4 else 4)
    probes: list[Probe] = []
    for name in erased:
        identity = identity_of(name)
        for i in range(per_concept):
            probes.append(Probe("erased", name, fill(NAME_TEMPLATES[i % len(NAME_TEMPLATES)], identity.name), dict(identity.signature), kind="person"))
    for identity in kept_identities(erased, preserve, retained_limit, rng):
        for i in range(max(2, per_concept // 2)):
            template = NAME_TEMPLATES[i % len(NAME_TEMPLATES)]
            probes.append(Probe("retained", identity.name, fill(template, identity.name), dict(identity.signature), kind="person"))
    # alias probes last: adding aliases never shifts the seeds of the others
    for name in erased:
        identity = identity_of(name)
        if identity.alias:
            group = "synonym" if identity.alias in listed_aliases else "unseen"
            for i in range(max(2, per_concept // 2)):
                template = ALIAS_TEMPLATES[i % len(ALIAS_TEMPLATES)]
                probes.append(Probe(group, name, fill(template, identity.alias), dict(identity.signature), kind="person"))
    return [Probe(p.group, p.concept, p.prompt, p.expected, 20_000 + i, p.kind) for i, p in enumerate(probes)]


def audit_probes(
    erased: list[str], preserve: list[str], per_concept: int, retained_limit: int, seed: int, listed_aliases: set[str] = frozenset()
) -> list[Probe]:
    """A compliance audit's probes: names and every alias in held-out templates (an audit probes
    every alias, listed or not), and kept identities; templates and seeds drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    probes: list[Probe] = []
    for name in erased:
        identity = identity_of(name)
        for _ in range(per_concept):
            probes.append(Probe("erased", name, fill(_pick(rng), identity.name), dict(identity.signature), kind="person"))
            if identity.alias:
                group = "synonym" if identity.alias in listed_aliases else "unseen"
                probes.append(Probe(group, name, fill(_pick(rng), identity.alias), dict(identity.signature), kind="person"))
    for identity in kept_identities(erased, preserve, retained_limit, rng)[:retained_limit]:
        for _ in range(max(2, per_concept // 2)):
            probes.append(Probe("retained", identity.name, fill(_pick(rng), identity.name), dict(identity.signature), kind="person"))
    return with_drawn_seeds(probes, rng)


def _pick(rng: np.random.Generator) -> str:
    return IDENTITY_AUDIT_TEMPLATES[rng.integers(len(IDENTITY_AUDIT_TEMPLATES))]


def anchor_signature(anchor: str) -> dict | None:
    """What an anchor draws: a generic person word -> the grey figure; another identity -> its
    signature; None for anything else (the judge cannot see it)."""
    words = anchor.strip().lower().split()
    if words and words[-1] in GENERIC_WORDS:
        return {"colour": NEUTRAL_COLOUR, "background": "dark", "frame": "none"}
    try:
        return dict(identity_of(anchor).signature)
    except ValueError:
        return None


class IdentityJudge(ToyJudge):
    """The identity classifier as an evaluation asks it: does each image show its probe's identity
    (every attribute of its signature)? The anchor of an erased identity is the grey figure."""

    @torch.no_grad()
    def anchor_verdicts(self, images: torch.Tensor, probes: list[Probe], anchors: dict[str, str]) -> list[bool | None]:
        predicted = self.classifier.predict(images)
        out: list[bool | None] = []
        for i, probe in enumerate(probes):
            signature = anchor_signature(anchors.get(probe.concept, ""))
            out.append(None if signature is None else shows(predicted, i, signature))
        return out


def identity_concept_judge(classifier) -> ToyConceptJudge:
    """The classifier as alias discovery asks it: does each image show the concept's identity?"""
    return ToyConceptJudge(classifier, expected_of=lambda name: dict(identity_of(name).signature))
