"""Stage 3: the erased weights of a concept set, from per-concept artifacts alone: the
cross-attention K/V of a UNet, or the maps of any text stream an architecture adapter names
(``erasure.methods.pipeline_edit``), which all read the same text states.

Three solves over the same per-concept sufficient statistics (``closed_form``):

- ``mace``: MACE's least squares, retained states pulled back with weight ``lam2``;
- ``constrained``: the edit confined to the prior's null space (``constrained``);
- ``separable``: SepME's increments summed, each projected on the null space of the prior,
  the empty prompt and the *other* concepts' states (``erasure.methods.separable``).

Then, optionally, RECE's adversarial rounds (``adversarial``): the embedding that still
produces each concept in the fused model is found in closed form and erased as one more
term. Nothing here depends on the order of the concepts or on anything but the set, so a
takedown or a restore recomputes only this solve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import DTYPE, ConceptStatistics, ExtraTerms, FusionAccumulator, PriorStatistics
from erasure.core.text import empty_prompt_states
from erasure.methods.constrained import (
    constrained_text_side,
    null_space_dimension,
    null_space_projector,
    output_side_edit,
)
from erasure.methods.separable import separable_weights
from erasure.spec import FusionSettings, PreserveSpec, RequestError


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


def fuse(
    components,
    concepts: Iterable[FusableConcept],
    prior: PriorStatistics,
    preserve: PreserveSpec,
    fusion: FusionSettings | None = None,
) -> dict[str, torch.Tensor]:
    """The erased K/V weights of ``concepts`` (every projection; unedited ones keep the base's).

    ``concepts`` is read once, in order: MACE's and the constrained fusion add each concept to
    the sufficient statistics and let it go, so a generator that loads one stored artifact at a
    time keeps the fusion's memory flat in the number of concepts. SepME's fusion projects each
    increment against every other concept's states and holds them all."""
    fusion = fusion or FusionSettings()
    if fusion.method == "separable":
        concepts = list(concepts)
        return fused_weights(components, concepts, fusion_prior(prior, concepts), preserve, fusion)
    return fusion_solver(components, concepts, prior, preserve, fusion)(None)


def fusion_solver(
    components,
    concepts: Iterable[FusableConcept],
    prior: PriorStatistics,
    preserve: PreserveSpec,
    fusion: FusionSettings,
) -> Callable[[ExtraTerms | None], dict[str, torch.Tensor]]:
    """MACE's or the constrained ``fuse`` as a function of extra (state, target) terms: the concepts
    are read once, and each call solves again with the terms joining theirs (adversarial closure
    re-fuses with the prompts its attacks found, ``erasure.audit.closure``)."""
    if fusion.method == "separable":
        raise RequestError("the separable fusion has no targets to add terms to: use fusion.method mace or constrained")
    statistics = accumulate(base_weights(components), concepts, fusion, prior)
    invariants = empty_prompt_states(components)
    solve = solver(invariants, statistics.accumulator, statistics.edited, statistics.prior.gram(), preserve, fusion)
    return lambda extra: statistics.base | solve(extra)


@dataclass
class FusionStatistics:
    """What MACE's and the constrained solve need, accumulated over a concept set."""

    base: dict[str, torch.Tensor]  # every projection of the base model that reads the text states
    edited: dict[str, torch.Tensor]  # the ones the fusion changes
    accumulator: FusionAccumulator
    prior: PriorStatistics | None  # the base prior plus every concept's anchor states, when given one


def accumulate(
    base: dict[str, torch.Tensor], concepts: Iterable[FusableConcept], fusion: FusionSettings,
    prior: PriorStatistics | None = None,
) -> FusionStatistics:
    """One pass over ``concepts``: each is added to the statistics (and its anchor states to a copy
    of ``prior``), then dropped. ``base``: every projection that reads the text states, by name
    (``base_weights`` for a UNet)."""
    edited = edited_weights(base, fusion)
    dim = next(iter(edited.values())).shape[1]
    accumulator = FusionAccumulator(dim, {n: tuple(w.shape) for n, w in edited.items()})
    with_anchors = PriorStatistics(prior.total.clone(), prior.count) if prior is not None else None
    for concept in concepts:
        add_concept(accumulator, concept, edited)
        if with_anchors is not None:
            with_anchors.add_anchors(concept.statistics)
    return FusionStatistics(base, edited, accumulator, with_anchors)


def fused_weights(
    components, concepts: Sequence[FusableConcept], prior_gram: torch.Tensor, preserve: PreserveSpec, fusion: FusionSettings
) -> dict[str, torch.Tensor]:
    """``fuse`` with the concept set's prior Gram given (``fusion_prior``); SepME's fusion."""
    if fusion.method == "separable":  # SepME's increments were trained on K and V together: both are fused
        base = base_weights(components)
        return base | separable_weights(base, concepts, prior_gram, empty_prompt_states(components), fusion.threshold)
    statistics = accumulate(base_weights(components), concepts, fusion)
    return statistics.base | solved_weights(
        empty_prompt_states(components), statistics.accumulator, statistics.edited, prior_gram, preserve, fusion
    )


def base_weights(components) -> dict[str, torch.Tensor]:
    # solved on the CPU in float64 where the statistics are (docs/architecture.md, "Where the
    # closed forms run"); apply_weights copies back to the UNet's device
    return {n: p.weight.data.detach().cpu() for n, p in cross_attention_projections(components.unet).items()}


def edited_weights(base: dict[str, torch.Tensor], fusion: FusionSettings) -> dict[str, torch.Tensor]:
    return {n: w for n, w in base.items() if fusion.projections == "kv" or n.endswith("to_v")}


def add_concept(accumulator: FusionAccumulator, concept: FusableConcept, edited: dict[str, torch.Tensor]) -> None:
    accumulator.add(concept.statistics, concept.text_map, {n: f for n, f in concept.factors.items() if n in edited})


def solved_weights(
    invariants: torch.Tensor, accumulator: FusionAccumulator, edited: dict[str, torch.Tensor], prior_gram: torch.Tensor,
    preserve: PreserveSpec, fusion: FusionSettings, extra: ExtraTerms | None = None,
) -> dict[str, torch.Tensor]:
    """The MACE or constrained solve of the accumulated concepts (``extra`` terms joining them when
    given), then RECE's rounds."""
    return solver(invariants, accumulator, edited, prior_gram, preserve, fusion)(extra)


def solver(
    invariants: torch.Tensor, accumulator: FusionAccumulator, edited: dict[str, torch.Tensor], prior_gram: torch.Tensor,
    preserve: PreserveSpec, fusion: FusionSettings,
) -> Callable[[ExtraTerms | None], dict[str, torch.Tensor]]:
    """``solved_weights`` as a function of the extra terms, with what does not depend on them (the
    constrained fusion's projector, the output-side edit) computed once. ``invariants``: (m, d) states
    the edit must leave exactly unchanged (the unconditional input's: ``empty_prompt_states``)."""
    if fusion.method == "mace":
        solve = lambda extra: accumulator.fuse(edited, prior_gram, preserve.lam2, preserve.ridge, extra)  # noqa: E731
    else:
        projector = editable_projector(invariants, prior_gram, fusion)
        constrained = lambda extra: constrained_weights(accumulator, edited, projector, fusion.alpha, extra)  # noqa: E731
        solve = constrained
        if fusion.output_edit is not None:  # added to every solve: RECE's rounds see the edited model
            deltas = output_side_edit(edited, accumulator.gram_sum, projector, fusion.output_edit)
            solve = lambda extra: {n: w + deltas[n].to(w.dtype) for n, w in constrained(extra).items()}  # noqa: E731

    def with_rounds(extra: ExtraTerms | None) -> dict[str, torch.Tensor]:
        if extra is not None:  # terms made for every projection (closure's) meet only the edited ones
            extra = ExtraTerms(extra.gram, {n: extra.cross[n] for n in edited})
        weights = solve(extra)
        for _ in range(fusion.adversarial_rounds):  # each round's adversarial states are erased on top of the last's
            found = adversarial_terms(edited, weights, accumulator.gram_sum, fusion.adversarial_ridge)
            extra = found if extra is None else extra + found
            weights = solve(extra)
        return weights

    return with_rounds


def editable_projector(invariants: torch.Tensor, prior_gram: torch.Tensor, fusion: FusionSettings) -> torch.Tensor:
    """The constrained fusion's projector on the directions the retained states leave free; an error
    when they leave none (a text space narrower than the states it must keep, such as the tiny
    test model's 32-wide encoder)."""
    projector = null_space_projector(prior_gram, fusion.threshold, invariants)
    if null_space_dimension(projector) == 0:
        raise RequestError(
            f"fusion.threshold {fusion.threshold}: the retained states use every direction of the text space, so "
            "the constrained fusion has nothing left to edit; raise fusion.threshold, lower "
            "method.mining.beyond_per_state (its states join the prior), or use fusion.method: mace"
        )
    return projector


def constrained_weights(
    accumulator: FusionAccumulator, weights: dict[str, torch.Tensor], projector: torch.Tensor, alpha: float,
    extra: ExtraTerms | None = None,
) -> dict[str, torch.Tensor]:
    """``W + S P (P G_E P + a I)^-1`` for every projection (``erasure.methods.constrained``), with
    ``extra`` (state, target) pairs joining the concepts' when given."""
    gram_sum = accumulator.gram_sum + (extra.gram if extra is not None else 0)
    text_side = constrained_text_side(gram_sum, projector, alpha)
    out = {}
    for name, weight in weights.items():
        w = weight.to(DTYPE)
        out[name] = (w + accumulator.residual(name, w, extra) @ text_side).to(weight.dtype)
    return out


def adversarial_terms(
    base: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], concept_gram: torch.Tensor, ridge: float
) -> ExtraTerms:
    """RECE in closed form (docs/method.md, "Adversarial rounds (RECE)"): the embedding that makes the
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
