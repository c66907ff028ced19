"""An OCE-style baseline: an orthogonal rotation of each V projection's outputs, in closed form.

OCE (ICML 2026) erases with ``W* = P W`` on the value projections only, P orthogonal, from an
orthogonal Procrustes problem. Our reading, from the same sufficient statistics the other solves
use: per V projection W, the rotation P of its outputs that best sends each erased concept's
value vectors to its anchor's, while keeping the retained ones where they are,

    P = argmin over orthogonal P of  sum_c E||P W e^f - W e^g||^2 + N * preserve_weight * E_prior||P W x - W x||^2

over N erased concepts (the prior is scaled by N * preserve_weight so that its weight keeps pace
with the N erased terms), is Procrustes: with C = sum_c aligned_cross_c + N * preserve_weight * prior_gram
(both E[target source^T], in the text space) and M = W C W^T, P = U V^T for M = U S V^T. Keys are
left alone. A rotation keeps the norm of every value vector, so it cannot send many concepts to
one anchor at once; it rotates the retained value vectors too, and only the preserve term holds
them. A baseline for ``bench/identities.py``: requests have no ``fusion.method: rotation``.
"""

from __future__ import annotations

import torch

from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import DTYPE


def procrustes_rotation(weight: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal (out, out) P maximising trace(P^T W C W^T): the best rotation of W's outputs
    for the pairs summarised by ``cross`` = E[target source^T]."""
    weight = weight.to(DTYPE)
    u, _, vh = torch.linalg.svd(weight @ cross.to(DTYPE) @ weight.T)
    return u @ vh


def rotated_value_weights(components, statistics, prior_gram: torch.Tensor, preserve_weight: float) -> dict[str, torch.Tensor]:
    """Every V projection's weight rotated (``P W``); K projections are not returned (unchanged)."""
    statistics = list(statistics)
    cross = len(statistics) * preserve_weight * prior_gram.to(DTYPE)
    for concept in statistics:
        cross = cross + concept.aligned_cross.to(DTYPE)
    out = {}
    for name, projection in cross_attention_projections(components.unet).items():
        if name.endswith("to_v"):
            weight = projection.weight.data
            out[name] = (procrustes_rotation(weight, cross) @ weight.to(DTYPE)).to(weight.dtype)
    return out
