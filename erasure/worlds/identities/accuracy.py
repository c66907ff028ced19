"""What the identity world's model draws from each name and alias, judged by its classifier."""

from __future__ import annotations

import numpy as np

from erasure.core.prompts import fill
from erasure.diffusion.sampling import sample
from erasure.worlds.identities.judge import ALIAS_TEMPLATES, NAME_TEMPLATES, shows
from erasure.worlds.identities.world import ATTRIBUTES, identities
from erasure.worlds.toyworld.settings import SAMPLING

DRAWN = 0.75  # an identity is drawn from a word when at least this share of its prompts shows it


def identity_accuracy(
    components, classifier, per_identity: int = 4, guidance_scale: float = SAMPLING.guidance_scale,
    steps: int = SAMPLING.sampler_steps, limit: int | None = None, progress=None,
) -> dict:
    """Every identity drawn from ``per_identity`` prompts by name, and as many by alias where it has one.

    Returns the share of prompts that show their identity (all five attributes), per attribute, and
    the identities drawn (``DRAWN``) from their name and from their alias.
    """
    every = identities()[:limit]
    prompts, wanted, owner = [], [], []
    for index, identity in enumerate(every):
        words = [("name", identity.name)] + ([("alias", identity.alias)] if identity.alias else [])
        for group, word in words:
            templates = NAME_TEMPLATES if group == "name" else ALIAS_TEMPLATES
            for i in range(per_identity):
                prompts.append(fill(templates[i % len(templates)], word))
                wanted.append(identity.signature)
                owner.append((index, group))
    seeds = list(range(len(prompts)))
    predicted = {k: [] for k in ATTRIBUTES}
    for start in range(0, len(prompts), 512):  # bounded memory, and progress to show
        images, _ = sample(components, prompts[start:start + 512], seeds[start:start + 512], steps=steps,
                           guidance_scale=guidance_scale, batch_size=128)
        for k, values in classifier.predict(images).items():
            predicted[k].extend(values)
        if progress:
            progress(min(start + 512, len(prompts)), len(prompts))
    right = [shows(predicted, i, w) for i, w in enumerate(wanted)]
    per: dict[tuple[int, str], list[bool]] = {}
    for key, ok in zip(owner, right):
        per.setdefault(key, []).append(ok)
    out = {"guidance_scale": guidance_scale, "per_identity": per_identity, "identities": len(every)}
    for group in ("name", "alias"):
        chosen = [i for i, (_, g) in enumerate(owner) if g == group]
        if not chosen:
            continue
        drawn = sorted(every[index].name for (index, g), oks in per.items() if g == group and np.mean(oks) >= DRAWN)
        out[group] = {
            "prompts": float(np.mean([right[i] for i in chosen])),
            "attributes": {k: float(np.mean([predicted[k][i] == wanted[i][k] for i in chosen])) for k in ATTRIBUTES},
            "identities_drawn": len(drawn) / len({index for (index, g) in per if g == group}),
            "drawn": drawn,
        }
    return out


def quick_identity_accuracy(components, classifier, limit: int = 128) -> dict:
    """A training-time check: the first ``limit`` identities, two prompts each by name and by alias."""
    full = identity_accuracy(components, classifier, per_identity=2, limit=limit)
    return {group: {"prompts": round(full[group]["prompts"], 3), "identities_drawn": round(full[group]["identities_drawn"], 3)}
            for group in ("name", "alias") if group in full}
