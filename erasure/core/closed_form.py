"""Closed-form cross-attention refinement (CFR) and closed-form multi-LoRA fusion.

Both solve a ridge-regularised least-squares problem over text states ``e``
(columns of width d) for every cross-attention key/value projection ``W``
(d_out x d). Every cross-attention layer reads the *same* text states, so each
solve is "per-layer numerator times one shared text-side matrix":

CFR (docs/method.md, "Cross-attention refinement"), with per-concept aligned statistics
``A = mean e^f e^f^T`` and ``B = mean e^g e^f^T``, summed over concepts::

    W' = W (B + lam1 G_p + r I)(A + lam1 G_p + r I)^-1  =  W M

Fusion (docs/method.md, "Closed-form fusion"), with ``G_k = mean e e^T`` over all token states of
concept k's prompts, ``M_k`` that concept's own CFR map and ``dW_k`` its LoRA::

    W* = (W sum_k M_k G_k + sum_k dW_k G_k + lam2 W G_p + r W)(sum_k G_k + lam2 G_p + r I)^-1

All Gram matrices are per-state means, so ``lam1``/``lam2`` weigh the whole prior
against one concept, whatever the corpus size; each weight is applied once.
``r = ridge * trace(denominator) / d``: the ridge is relative to the mean
eigenvalue so one setting works for any text encoder. Accumulation is float64 and
every inverse is a Cholesky solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.core.text import TokenAlignment

DTYPE = torch.float64


@dataclass
class ConceptStatistics:
    """Everything a concept contributes to CFR and fusion; all (d, d), float64.

    ``aligned_gram`` = mean e^f e^f^T and ``aligned_cross`` = mean e^g e^f^T over
    aligned token pairs; ``gram`` = mean e e^T over all token states of the
    concept's prompts; ``anchor_gram`` = mean e e^T over its anchor prompts'
    states (``anchor_count`` of them), which join the prior: the anchor must keep
    meaning what it meant.
    """

    aligned_gram: torch.Tensor
    aligned_cross: torch.Tensor
    gram: torch.Tensor
    anchor_gram: torch.Tensor
    anchor_count: int
    # mean s x^T over the fused states x and the state s whose target each takes: x itself for
    # the concept's own prompts, the concept state it was mined from for a perturbed neighbour
    # (RealEra: a neighbour is erased *as the concept*). None: every state is its own source.
    target_cross: torch.Tensor | None = None

    @property
    def source_cross(self) -> torch.Tensor:
        return self.gram if self.target_cross is None else self.target_cross

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "aligned_gram": self.aligned_gram, "aligned_cross": self.aligned_cross, "gram": self.gram,
            "anchor_gram": self.anchor_gram, "anchor_count": torch.tensor([self.anchor_count]),
        }
        return tensors | ({"target_cross": self.target_cross} if self.target_cross is not None else {})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ConceptStatistics:
        return cls(
            **{k: tensors[k].to(DTYPE) for k in ("aligned_gram", "aligned_cross", "gram", "anchor_gram")},
            anchor_count=int(tensors["anchor_count"][0]),
            target_cross=tensors["target_cross"].to(DTYPE) if "target_cross" in tensors else None,
        )


def concept_statistics(
    concept_states: torch.Tensor, anchor_states: torch.Tensor, alignments: list[TokenAlignment]
) -> ConceptStatistics:
    """Statistics of one concept from its prompt states (n, L, d) and alignments."""
    fs, gs = [], []
    for i, alignment in enumerate(alignments):
        if not alignment.pairs:
            continue
        concept_pos = torch.tensor([p for p, _ in alignment.pairs])
        anchor_pos = torch.tensor([q for _, q in alignment.pairs])
        fs.append(concept_states[i, concept_pos])
        gs.append(anchor_states[i, anchor_pos])
    if not fs:
        raise ValueError("no aligned token states: every prompt was truncated before the concept")
    f = torch.cat(fs).to(DTYPE)  # (n_pairs, d)
    g = torch.cat(gs).to(DTYPE)
    return ConceptStatistics(
        aligned_gram=f.T @ f / len(f),
        aligned_cross=g.T @ f / len(f),
        gram=gram(concept_states),
        anchor_gram=gram(anchor_states),
        anchor_count=anchor_states.shape[0] * anchor_states.shape[1],
    )


def gram(states: torch.Tensor) -> torch.Tensor:
    """Mean outer product of all token states: (n, L, d) -> (d, d)."""
    flat = states.reshape(-1, states.shape[-1]).to(DTYPE)
    return flat.T @ flat / len(flat)


@dataclass
class PriorStatistics:
    """Sum of e e^T and the number of states of the prior, so priors add up exactly.

    The base prior (empty prompt, retained concepts, captions) is accumulated
    batch by batch, so a caption corpus is never held in memory. A concept's CFR
    uses the base prior plus its own anchor states; the fusion uses the base
    prior plus every erased concept's anchors.
    """

    total: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, dim: int) -> PriorStatistics:
        return cls(torch.zeros(dim, dim, dtype=DTYPE), 0)

    def add(self, states: torch.Tensor) -> None:
        flat = states.reshape(-1, states.shape[-1]).to(DTYPE)
        self.total += flat.T @ flat
        self.count += len(flat)

    def add_anchors(self, concept: ConceptStatistics) -> None:
        """Add one concept's anchor states (what ``with_anchors`` does for a list, in place)."""
        self.total += concept.anchor_gram * concept.anchor_count
        self.count += concept.anchor_count

    def with_anchors(self, concepts: list[ConceptStatistics]) -> PriorStatistics:
        total = self.total + sum((c.anchor_gram * c.anchor_count for c in concepts), torch.zeros_like(self.total))
        return PriorStatistics(total, self.count + sum(c.anchor_count for c in concepts))

    def gram(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("the prior holds no states")
        return self.total / self.count


def ridge_value(denominator: torch.Tensor, ridge: float) -> float:
    return ridge * float(torch.diagonal(denominator).sum()) / denominator.shape[0]


def solve_right(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """X with X @ denominator = numerator, for a symmetric positive-definite denominator."""
    factor = torch.linalg.cholesky(denominator)
    return torch.cholesky_solve(numerator.T.contiguous(), factor).T


def refinement_map(
    concepts: list[ConceptStatistics], prior_gram: torch.Tensor, lam1: float, ridge: float
) -> torch.Tensor:
    """The text-side matrix M of CFR (W' = W M), shared by every K/V projection."""
    dim = prior_gram.shape[0]
    eye = torch.eye(dim, dtype=DTYPE)
    a = sum(c.aligned_gram for c in concepts) + lam1 * prior_gram
    b = sum(c.aligned_cross for c in concepts) + lam1 * prior_gram
    r = ridge_value(a, ridge)
    return solve_right(b + r * eye, a + r * eye)


def apply_text_map(weight: torch.Tensor, text_map: torch.Tensor) -> torch.Tensor:
    """W M in float64, returned in the weight's dtype and on its device (the statistics live on
    the CPU; the weights on the worker's GPU)."""
    return (weight.to(DTYPE) @ text_map.to(weight.device, DTYPE)).to(weight.dtype)


@dataclass
class ExtraTerms:
    """More (state x -> target y) pairs for a fusion solve, as statistics: ``gram`` = sum x x^T
    (text side, shared by every projection) and, per projection, ``cross`` = sum y x^T. RECE's
    adversarial states join the concepts' this way (``erasure.methods.fusion.adversarial_terms``)."""

    gram: torch.Tensor
    cross: dict[str, torch.Tensor]

    def __add__(self, other: ExtraTerms) -> ExtraTerms:
        return ExtraTerms(self.gram + other.gram, {n: c + other.cross[n] for n, c in self.cross.items()})


class FusionAccumulator:
    """Sufficient statistics of the fusion: memory independent of the number of concepts.

    Holds ``sum_k G_k``, ``sum_k M_k C_k`` (d x d) and, per projection,
    ``sum_k dW_k C_k`` (d_out x d), with ``C_k = G_k`` unless mining gave the concept
    neighbours that take the concept's own targets (``ConceptStatistics.target_cross``).
    ``add`` and ``remove`` of a concept are exact inverses (up to float64 rounding), which is
    what takedown and restore use.
    """

    def __init__(self, dim: int, projection_shapes: dict[str, tuple[int, int]]):
        self.gram_sum = torch.zeros(dim, dim, dtype=DTYPE)
        self.mapped_gram_sum = torch.zeros(dim, dim, dtype=DTYPE)
        self.lora_terms = {name: torch.zeros(shape, dtype=DTYPE) for name, shape in projection_shapes.items()}
        self.concepts = 0

    def _update(self, sign: float, stats: ConceptStatistics, text_map: torch.Tensor, deltas: dict) -> None:
        # targets (W M_k + dW_k) s of states x: the text side sums x x^T, the targets' side s x^T
        cross = stats.source_cross
        self.gram_sum += sign * stats.gram
        self.mapped_gram_sum += sign * (text_map @ cross)
        for name, (up, down) in deltas.items():
            # dW C = up (down C): rank-r, never forms the d_out x d product twice
            self.lora_terms[name] += sign * (up.to(DTYPE) @ (down.to(DTYPE) @ cross))
        self.concepts += int(sign)

    def add(self, stats: ConceptStatistics, text_map: torch.Tensor, deltas: dict) -> None:
        """Add a concept: its statistics, its CFR map M_k and its LoRA factors {name: (up, down)}."""
        self._update(+1.0, stats, text_map, deltas)

    def remove(self, stats: ConceptStatistics, text_map: torch.Tensor, deltas: dict) -> None:
        self._update(-1.0, stats, text_map, deltas)

    def residual(self, name: str, weight: torch.Tensor, extra: ExtraTerms | None = None) -> torch.Tensor:
        """``S = sum_k (W M_k + dW_k - W) G_k`` of one projection (plus ``extra``'s ``sum (y - W x) x^T``):
        what the targets ask of the edit. MACE's fusion is ``W + S (G_E + lam2 G_p + r I)^-1``;
        the constrained one confines it."""
        w = weight.to(DTYPE)
        residual = w @ (self.mapped_gram_sum - self.gram_sum) + self.lora_terms[name]
        if extra is not None:
            residual = residual + extra.cross[name] - w @ extra.gram
        return residual

    def fuse(
        self, weights: dict[str, torch.Tensor], prior_gram: torch.Tensor, lam2: float, ridge: float,
        extra: ExtraTerms | None = None,
    ) -> dict[str, torch.Tensor]:
        """MACE's fused weights W* for every projection in ``weights`` (the base model's W), with
        ``extra`` (state, target) pairs joining the concepts' when given."""
        dim = prior_gram.shape[0]
        eye = torch.eye(dim, dtype=DTYPE)
        denominator = self.gram_sum + (extra.gram if extra is not None else 0) + lam2 * prior_gram
        r = ridge_value(denominator, ridge)
        denominator = denominator + r * eye
        factor = torch.linalg.cholesky(denominator)
        text_side = self.mapped_gram_sum + lam2 * prior_gram + r * eye
        fused = {}
        for name, weight in weights.items():
            w = weight.to(DTYPE)
            numerator = w @ text_side + self.lora_terms[name]
            if extra is not None:
                numerator = numerator + extra.cross[name]
            fused[name] = torch.cholesky_solve(numerator.T.contiguous(), factor).T.to(weight.dtype)
        return fused
