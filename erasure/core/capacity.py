"""How much room a text space leaves a linear K/V edit (docs/method.md, "Capacity ceiling of a
linear K/V edit").

An edit ``W -> W + dW`` changes the output of a state ``e`` by ``dW e``. If the erased
concepts' states lie in the span of the retained concepts' states, no linear edit can move
the first and keep the second. The diagnostic: the fraction of an erased state's norm
outside the dominant subspace of the retained states,

    rho(e) = || (I - U U^T) e || / || e ||

with ``U`` the retained states' leading right-singular vectors that hold ``energy`` (99 %) of
their squared norm. rho near 0: the world (not the method) is the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.core.prompts import fill
from erasure.core.text import align_tokens, encode, tokenize


def concept_states(components, concepts: list[str], templates: tuple[str, ...], anchor: str = "thing") -> torch.Tensor:
    """(n, d) float64: per concept and template (``"a photo of {}"``, the world's own), its last token's state and every real token's
    after it (EOS included): where a causal encoder (CLIP) carries the concept to the UNet, and
    the states a bidirectional one changes most (there the prefix and padding see it too)."""
    rows = []
    for concept in concepts:
        prompts = [fill(t, concept) for t in templates]
        anchors = [fill(t, anchor) for t in templates]
        ids, lengths = tokenize(components.tokenizer, prompts)
        anchor_ids, anchor_lengths = tokenize(components.tokenizer, anchors)
        states = encode(components.text_encoder, ids)
        for i in range(len(prompts)):
            span = align_tokens(ids[i].tolist(), int(lengths[i]), anchor_ids[i].tolist(), int(anchor_lengths[i])).concept_span
            if span:
                rows.append(states[i, span[-1] : int(lengths[i])])
    if not rows:
        raise ValueError(f"no state of {concepts!r} survived tokenisation: every prompt was truncated before it")
    return torch.cat(rows).double()


@dataclass
class Capacity:
    rho: float  # mean fraction of an erased state's norm outside the retained subspace
    rank: int  # dimensions of the retained subspace (energy)
    width: int  # the text space's width

    def __str__(self) -> str:
        return f"{self.rho:.3f} (retained rank {self.rank}/{self.width})"


def capacity(erased: torch.Tensor, retained: torch.Tensor, energy: float = 0.99) -> Capacity:
    """rho of ``erased`` (n, d) states against the dominant subspace of ``retained`` (m, d)."""
    _, singular, vh = torch.linalg.svd(retained.double(), full_matrices=False)
    cumulative = torch.cumsum(singular**2, 0) / (singular**2).sum()
    rank = int((cumulative < energy).sum()) + 1
    basis = vh[:rank].T  # (d, rank)
    outside = erased.double() - erased.double() @ basis @ basis.T
    rho = (outside.norm(dim=1) / erased.double().norm(dim=1).clamp_min(1e-12)).mean()
    return Capacity(float(rho), rank, erased.shape[1])
