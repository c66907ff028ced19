"""Stage 3: the erased K/V weights of a concept set, from per-concept artifacts alone.

Three solves over the same per-concept sufficient statistics (``closed_form``):

- ``mace``: MACE's least squares, retained states pulled back with weight ``lam2``;
- ``constrained``: the edit confined to the prior's null space (``constrained``);
- ``separable``: SepME's increments summed, each projected on the null space of the empty
  prompt and of the *other* concepts' states (``separable_weights``).

Then, optionally, RECE's adversarial rounds (``adversarial``): the embedding that still
produces each concept in the fused model is found in closed form and erased as one more
term. Nothing here depends on the order of the concepts or on anything but the set, so a
takedown or a restore recomputes only this solve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from erasure.attention import cross_attention_projections
from erasure.closed_form import DTYPE, ConceptStatistics, FusionAccumulator, PriorStatistics, ridge_value
from erasure.constrained import constrained_text_side, null_space_dimension, null_space_projector
from erasure.spec import FusionSettings, PreserveSpec, RequestError
from erasure.text import encode_prompts

log = logging.getLogger(__name__)


class FusableConcept(Protocol):
    """What fusion needs of one concept: a fresh ``ConceptResult`` or a ``ConceptArtifact``
    read back from storage both are one."""

    @property
    def statistics(self) -> ConceptStatistics: ...
    @property
    def text_map(self) -> torch.Tensor: ...  # (d, d), the concept's own CFR map M_k
    @property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...  # projection -> (up, down)


def fusion_prior(base_prior: PriorStatistics, concepts: Sequence[FusableConcept]) -> torch.Tensor:
    """The prior Gram of a concept set: the base prior plus every concept's anchor states."""
    return base_prior.with_anchors([c.statistics for c in concepts]).gram()


def empty_prompt_states(components) -> torch.Tensor:
    """(L, d) float64: the states the unconditional prediction reads; the invariants."""
    return encode_prompts(components, [""])[0].to(DTYPE)


def fuse(
    components,
    concepts: Sequence[FusableConcept],
    prior: PriorStatistics,
    preserve: PreserveSpec,
    fusion: FusionSettings | None = None,
) -> dict[str, torch.Tensor]:
    """The erased K/V weights of ``concepts`` (every projection; unedited ones keep the base's)."""
    fusion = fusion or FusionSettings()
    return fused_weights(components, concepts, fusion_prior(prior, concepts), preserve, fusion)


def fused_weights(
    components, concepts: Sequence[FusableConcept], prior_gram: torch.Tensor, preserve: PreserveSpec, fusion: FusionSettings
) -> dict[str, torch.Tensor]:
    base = {n: p.weight.data for n, p in cross_attention_projections(components.unet).items()}
    edited = {n: w for n, w in base.items() if fusion.projections == "kv" or n.endswith("to_v")}
    if fusion.method == "separable":
        weights = separable_weights(edited, concepts, empty_prompt_states(components), fusion.threshold)
    else:
        accumulator = FusionAccumulator(prior_gram.shape[0], {n: tuple(w.shape) for n, w in edited.items()})
        for concept in concepts:
            accumulator.add(concept.statistics, concept.text_map, {n: f for n, f in concept.factors.items() if n in edited})
        solve = _solver(accumulator, prior_gram, preserve, fusion, components)
        weights = solve(edited, {})
        for _ in range(fusion.adversarial_rounds):
            weights = solve(edited, adversarial_terms(edited, weights, accumulator.gram_sum, fusion.adversarial_ridge))
    return {n: weights.get(n, w) for n, w in base.items()}


@dataclass
class ExtraTerms:
    """More (state -> target) pairs for the solve, as statistics: ``gram`` = sum x x^T (text
    side, shared) and per projection ``cross`` = sum y x^T."""

    gram: torch.Tensor
    cross: dict[str, torch.Tensor]


def _solver(accumulator: FusionAccumulator, prior_gram, preserve: PreserveSpec, fusion: FusionSettings, components):
    if fusion.method == "mace":

        def solve_mace(weights, extra):
            if not extra:  # MACE's own fusion, exactly as it always was
                return accumulator.fuse(weights, prior_gram, preserve.lam2, preserve.ridge)
            eye = torch.eye(prior_gram.shape[0], dtype=DTYPE)
            denominator = accumulator.gram_sum + extra.gram + preserve.lam2 * prior_gram
            denominator = denominator + ridge_value(denominator, preserve.ridge) * eye
            factor = torch.linalg.cholesky(denominator)
            out = {}
            for name, weight in weights.items():
                w = weight.to(DTYPE)
                residual = accumulator.residual(name, w) + extra.cross[name] - w @ extra.gram
                out[name] = (w + torch.cholesky_solve(residual.T.contiguous(), factor).T).to(weight.dtype)
            return out

        return solve_mace

    projector = null_space_projector(prior_gram, fusion.threshold, empty_prompt_states(components))
    if null_space_dimension(projector) == 0:
        raise RequestError(
            f"fusion.threshold {fusion.threshold}: the retained states use every direction of the text space, so the "
            "constrained fusion has nothing left to edit; raise fusion.threshold or use fusion.method: mace"
        )

    def solve_constrained(weights, extra):
        gram_sum = accumulator.gram_sum + (extra.gram if extra else 0)
        text_side = constrained_text_side(gram_sum, projector, fusion.alpha)
        out = {}
        for name, weight in weights.items():
            w = weight.to(DTYPE)
            residual = accumulator.residual(name, w)
            if extra:
                residual = residual + extra.cross[name] - w @ extra.gram
            out[name] = (w + residual @ text_side).to(weight.dtype)
        return out

    return solve_constrained


def adversarial_terms(
    base: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], concept_gram: torch.Tensor, ridge: float
) -> ExtraTerms:
    """RECE in closed form (docs/method.md, "Adversarial rounds"): the embedding that makes the
    fused model give a concept state's *original* outputs,

        c_adv = A c,  A = (sum_l W*_l^T W*_l + lam I)^-1 (sum_l W*_l^T W_l),

    is linear in ``c``, so its statistics follow from the concepts' Gram alone: erasing
    ``c_adv -> W* c`` (what the fused model now gives the concept) adds ``A G A^T`` to the
    text side and ``W* G A^T`` to each projection's targets."""
    dim = concept_gram.shape[0]
    normal = torch.zeros(dim, dim, dtype=DTYPE)
    cross = torch.zeros(dim, dim, dtype=DTYPE)
    for name, weight in base.items():
        w, w_star = weight.to(DTYPE), fused[name].to(DTYPE)
        normal += w_star.T @ w_star
        cross += w_star.T @ w
    lam = ridge * float(torch.diagonal(normal).sum()) / dim
    adversarial_map = torch.linalg.solve(normal + lam * torch.eye(dim, dtype=DTYPE), cross)  # A
    gram = adversarial_map @ concept_gram @ adversarial_map.T
    return ExtraTerms(
        gram=gram,
        cross={n: fused[n].to(DTYPE) @ concept_gram @ adversarial_map.T for n in base},
    )


# --------------------------------------------------------------------------- SepME


@dataclass
class SeparableCapacity:
    concept: int
    null_dimension: int
    kept: float  # the fraction of the increment's effect on its own states left after projection


MIN_KEPT = 0.25  # below it, an increment has lost most of its effect: the null space has run out


def separable_projectors(
    concepts: Sequence[FusableConcept], invariants: torch.Tensor, threshold: float
) -> list[torch.Tensor]:
    """Per concept, the projector on the null space of the empty prompt's states and the other
    concepts' states (eigenvalues below ``threshold`` times the largest of their Gram)."""
    grams = [c.statistics.gram for c in concepts]
    total = sum(grams, torch.zeros_like(grams[0]))
    invariant_gram = invariants.T @ invariants / len(invariants)
    return [null_space_projector(total - g + invariant_gram, threshold, invariants) for g in grams]


def separable_weights(
    base: dict[str, torch.Tensor], concepts: Sequence[FusableConcept], invariants: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """SepME: ``W* = W + sum_i dW_i P_i``; ``dW_i P_i`` is exactly zero on the empty prompt and
    on every other concept's dominant states, so any subset is erased or restored by adding or
    dropping terms. When the other concepts fill the text space an increment loses its effect:
    that is the method's capacity limit, raised as an error rather than fused as silent damage."""
    projectors = separable_projectors(concepts, invariants, threshold)
    weights = {n: w.to(DTYPE).clone() for n, w in base.items()}
    report = []
    for index, (concept, projector) in enumerate(zip(concepts, projectors)):
        own, kept = 0.0, 0.0
        for name, (up, down) in concept.factors.items():
            if name not in weights:
                continue
            delta = up.to(DTYPE) @ down.to(DTYPE)
            projected = delta @ projector
            gram = concept.statistics.gram
            own += float(torch.trace(delta @ gram @ delta.T))
            kept += float(torch.trace(projected @ gram @ projected.T))
            weights[name] += projected
        report.append(SeparableCapacity(index, null_space_dimension(projector), (kept / own) ** 0.5 if own > 0 else 0.0))
    starved = [r for r in report if r.kept < MIN_KEPT]
    if starved:
        worst = min(starved, key=lambda r: r.kept)
        raise RequestError(
            f"SepME's capacity is exhausted: {len(starved)} of {len(concepts)} concepts keep less than "
            f"{MIN_KEPT:.0%} of their increment once confined to the null space of the others (worst: concept "
            f"{worst.concept}, {worst.kept:.1%}, null space {worst.null_dimension} dimensions); erase fewer concepts "
            "with fusion.method: separable, or use fusion.method: constrained"
        )
    for r in report:
        log.info("SepME concept %d: null space %d dims, %.1f%% of its increment kept", r.concept, r.null_dimension, 100 * r.kept)
    return {n: w.to(base[n].dtype) for n, w in weights.items()}
