"""Constrained fusion: the erasing edit confined to directions the retained states do not use.

MACE's fusion (``closed_form``) trades erasure against preservation in one least-squares
problem: with many concepts, both cannot be met. The constrained fusion (SPEED-style;
docs/method.md, "Constrained fusion (SPEED-style)") instead *forbids* the edit to touch the retained states:

    W* = W + Delta,   Delta = S P (P G_E P + a I)^-1

- ``S = sum_k (W M_k + dW_k - W) G_k``: what the concepts' targets (CFR map + LoRA) ask
  for, from the same per-concept sufficient statistics as MACE's fusion;
- ``G_E = sum_k G_k``: the erased states' Gram;
- ``P``: the orthogonal projector on the eigenvectors of the prior Gram ``G_p`` whose
  eigenvalue is below ``threshold * lambda_max(G_p)``, the directions the retained states
  (empty prompt, anchors, retained concepts, captions) hardly use; then ``Delta c = S P
  (...)^-1 c = 0`` for every ``c`` in the retained span, however many concepts are erased;
- invariants (the empty prompt's states: the unconditional prediction) are removed from
  ``P``'s range exactly, so ``Delta`` leaves them unchanged to rounding;
- ``a = alpha * trace(G_E) / d``: a ridge relative to the erased states' mean eigenvalue.

``Delta`` minimises ``|| (W + Delta) E - targets ||^2 + a || Delta ||^2`` over edits of the
form ``X P``. Every matrix on the text side is shared by all projections; only ``S`` is
per projection.
"""

from __future__ import annotations

import torch

from erasure.core.closed_form import DTYPE


def null_space_projector(prior_gram: torch.Tensor, threshold: float, invariants: torch.Tensor | None = None) -> torch.Tensor:
    """(d, d) projector on the prior Gram's eigenvectors with eigenvalue < ``threshold``
    times the largest, with the span of ``invariants`` (m, d) removed from its range."""
    eigenvalues, eigenvectors = torch.linalg.eigh(prior_gram.to(DTYPE))
    keep = eigenvalues < threshold * eigenvalues.max().clamp_min(1e-30)
    basis = eigenvectors[:, keep]  # (d, n)
    projector = basis @ basis.T
    if invariants is not None and len(invariants) and basis.shape[1]:
        # the invariants' components inside the null space, orthonormalised: removing them
        # from P's range makes P k = 0 exactly for every invariant state k
        invariants = invariants.to(DTYPE)
        inside = projector @ invariants.T  # (d, m)
        u, s, _ = torch.linalg.svd(inside, full_matrices=False)
        # relative to the invariants themselves: a component already ~0 is rounding, not a direction
        rank = int((s > 1e-9 * torch.linalg.matrix_norm(invariants, ord=2)).sum())
        if rank:
            projector = projector - u[:, :rank] @ u[:, :rank].T
    return projector


def null_space_dimension(projector: torch.Tensor) -> int:
    return int(round(float(torch.diagonal(projector).sum())))


def constrained_text_side(gram_sum: torch.Tensor, projector: torch.Tensor, alpha: float) -> torch.Tensor:
    """``T = P (P G_E P + a I)^-1``, so that ``Delta = S T`` for every projection."""
    dim = gram_sum.shape[0]
    eye = torch.eye(dim, dtype=DTYPE)
    restricted = projector @ gram_sum @ projector
    a = alpha * float(torch.diagonal(gram_sum).sum()) / dim
    system = restricted + max(a, 1e-30) * eye
    system = (system + system.T) / 2
    factor = torch.linalg.cholesky(system)
    # (P G P + aI) commutes with P, so T is symmetric: solve from the right with P itself
    return torch.cholesky_solve(projector.contiguous(), factor).T


# A free direction counts as spanned by the erased states when its eigenvalue in ``P G_E P`` is above
# this share of the largest. At 1e-3, 229 of the MiniLM world's 232 free directions were spanned at
# 8 pairs and the edit had nothing to reach (acc_g 50 %, as without it); at 0.1, 61 were: acc_g 27 %,
# acc_s 95 % (0.3: 23 % and 94 %). bench/toyworld.py measures it.
SPANNED = 0.1


def output_side_edit(
    base: dict[str, torch.Tensor], gram_sum: torch.Tensor, projector: torch.Tensor, energy: float, seen: float = SPANNED,
) -> dict[str, torch.Tensor]:
    """An edit keyed on the outputs, not the inputs (docs/method.md, "Output-side edit"): per
    projection, ``-U U^T W Q``, to be added to the solve's weights.

    - ``U``: the fewest top eigenvectors of ``W P G_E P W^T`` that hold ``energy`` of its trace:
      the output directions in which the erased states' free parts speak to the UNet;
    - ``Q``: the free directions (``P``'s range) the erased states hardly span, ``P - V V^T``
      with ``V`` the eigenvectors of ``P G_E P`` above ``seen`` times its largest eigenvalue.

    A state in the retained span (``P c = 0``) keeps its outputs exactly, and so does the part of
    an erased state that ``V`` spans; the rest of any state's free part (an erased state's weakly
    spanned directions included) loses its outputs along ``U``: a word never seen that the UNet
    reads as the concept loses what it reads. Changing ``SPANNED`` or this edit changes what a
    model key made with it stands for: version it in ``tasks.keys._fusion_inputs`` (only keys with
    the edit on change; ``STAGE_VERSIONS`` would move every model's)."""
    restricted = projector @ gram_sum.to(DTYPE) @ projector
    if float(torch.diagonal(restricted).sum()) <= 1e-12 * float(torch.diagonal(gram_sum).sum().abs().clamp_min(1e-30)):
        # the erased states have no free part: they tell no output direction, so nothing is removed
        return {name: torch.zeros_like(weight, dtype=DTYPE) for name, weight in base.items()}
    values, vectors = torch.linalg.eigh(restricted)
    spanned = vectors[:, values > seen * values.max().clamp_min(1e-30)]
    unseen = projector - spanned @ spanned.T
    deltas = {}
    for name, weight in base.items():
        w = weight.to(DTYPE)
        heard = w @ restricted @ w.T
        out_values, out_vectors = torch.linalg.eigh(heard)
        order = torch.argsort(out_values, descending=True)
        share = torch.cumsum(out_values[order].clamp_min(0), 0) / out_values.clamp_min(0).sum().clamp_min(1e-30)
        rank = int((share < energy).sum()) + 1
        directions = out_vectors[:, order[:rank]]
        deltas[name] = -(directions @ directions.T @ w @ unseen)
    return deltas
