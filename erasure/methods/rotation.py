"""An OCE-style baseline: one orthogonal rotation of the text space, applied to every V projection.

OCE (ICML 2026) erases by rotating the value weights in closed form. Our reading of it, from the
same sufficient statistics the other solves use: the rotation R of the encoder's state space
that best sends each erased concept's token states to its anchor's, while keeping the retained
states where they are,

    R = argmin over orthogonal R of  sum_c E||R e^f - e^g||^2 + N * preserve_weight * E_prior||R x - x||^2

over N erased concepts (the retained states weigh ``preserve_weight`` erased concepts' worth each
time one is added), is orthogonal Procrustes: with M = sum_c aligned_cross_c + N * preserve_weight *
prior_gram (both E[target source^T]), R = U V^T for M = U S V^T. Every V projection W becomes W R; keys are left
alone. A rotation keeps every norm and angle between states, so it cannot make two erased
states collapse or a retained one move less than its neighbours: the bench measures what that
costs beside the constrained solve, which has neither limit.
"""

from __future__ import annotations

import torch

from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import DTYPE


def procrustes_rotation(statistics, prior_gram: torch.Tensor, preserve_weight: float) -> torch.Tensor:
    """The (d, d) rotation that best maps each concept's aligned states to its anchor's targets."""
    statistics = list(statistics)
    cross = len(statistics) * preserve_weight * prior_gram.to(DTYPE)
    for concept in statistics:
        cross = cross + concept.aligned_cross.to(DTYPE)
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def rotated_value_weights(components, rotation: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every V projection's weight times ``rotation``; K projections are not returned (unchanged)."""
    out = {}
    for name, projection in cross_attention_projections(components.unet).items():
        if name.endswith("to_v"):
            weight = projection.weight.data
            out[name] = (weight.to(DTYPE) @ rotation).to(weight.dtype)
    return out
