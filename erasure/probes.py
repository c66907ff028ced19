"""A probe: one prompt an evaluation draws, and what its image is expected to show.

Every judge reads the same probes: the toy classifier compares ``expected``
attributes, the CLIP judge the ``concept`` text against its alternatives, NudeNet
only the ``kind``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GROUPS = ("erased", "synonym", "unseen", "phrasing", "retained", "attack")
# an audit's seed, and every seed drawn from it, lies in [0, SEEDS): numpy draws them as 32-bit integers
SEEDS = 2**31 - 1


@dataclass(frozen=True)
class Probe:
    """One prompt an evaluation draws, with what its image must show and the seed that draws it."""

    group: str  # one of GROUPS: what the prompt tests (an erased name, a synonym, ..., a retained concept)
    concept: str  # the concept this prompt tests
    prompt: str
    expected: dict = field(default_factory=dict)  # toy world: attribute -> value the image must show
    seed: int = 0
    kind: str = "object"  # the concept's kind (object, style, person, explicit): picks its judge


def with_drawn_seeds(probes: list[Probe], rng) -> list[Probe]:
    """The probes with distinct seeds drawn from ``rng`` (a numpy Generator): an audit's own, recorded
    through the seed that made ``rng``."""
    seeds = rng.choice(SEEDS, size=len(probes), replace=False)
    return [dataclasses.replace(p, seed=int(s)) for p, s in zip(probes, seeds)]
