"""Closed-form erasure of a pipeline of any family, through its architecture adapter.

The same science as the UNet path (``erasure.erase``), stream by stream
(``erasure.architectures.base.TextStream``): each concept's (concept prompt, anchor prompt)
pairs give CFR statistics, aligned token by token within each segment of the stream (a pooled
stream has one state per prompt: concept to anchor); the retained prompts and the
unconditional input give the prior; MACE's or the constrained fusion solves every map of the
stream at once. A concept is its statistics, so erasing one more or restoring one is a new
solve over the held set, with nothing encoded again.

What this path does not do (yet): LoRA training, masks, mining and alias discovery, which
need the denoiser's attention maps and are built for UNets (``erasure.erase``). Its erasure
is the closed form alone (``method.lora_steps: 0`` on the UNet path).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from erasure.architectures.base import Architecture, TextStream, read_weight, write_weight
from erasure.core.closed_form import ConceptStatistics, PriorStatistics, concept_statistics, refinement_map
from erasure.core.prompts import augmented_pairs
from erasure.core.text import TokenAlignment, align_tokens, tokenize
from erasure.methods.fusion import accumulate, solver
from erasure.spec import ConceptSpec, FusionSettings, PreserveSpec, RequestError

Weights = dict[str, dict[str, torch.Tensor]]  # stream -> map module -> weight (its edited columns)


@dataclass
class StreamConcept:
    """One concept in one stream, as the fusion reads it (``erasure.methods.fusion.FusableConcept``)."""

    statistics: ConceptStatistics
    text_map: torch.Tensor
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # no LoRA: closed form only


@dataclass
class ErasedConcept:
    concept: ConceptSpec
    pairs: list[tuple[str, str]]
    streams: dict[str, StreamConcept]


def stream_alignments(
    pipe, stream: TextStream, pairs: list[tuple[str, str]], edit_tokens: str, architecture: Architecture
) -> list[TokenAlignment]:
    """Per pair, which positions of the concept prompt's states take which of the anchor prompt's:
    aligned segment by segment (each with its own tokenizer, on the text the pipeline tokenizes),
    each segment's offset added. A pooled stream has one state: the concept prompt's takes the
    anchor prompt's."""
    if stream.pooled:
        return [TokenAlignment(concept_span=(), pairs=((0, 0),)) for _ in pairs]
    concept_text = architecture.tokenized_text(pipe, [c for c, _ in pairs])
    anchor_text = architecture.tokenized_text(pipe, [a for _, a in pairs])
    merged = [TokenAlignment((), ()) for _ in pairs]
    offset = 0
    for segment in stream.segments:
        tokenizer = getattr(pipe, segment.tokenizer)
        concept_ids, concept_lens = tokenize(tokenizer, concept_text, segment.length)
        anchor_ids, anchor_lens = tokenize(tokenizer, anchor_text, segment.length)
        for i, so_far in enumerate(merged):
            found = align_tokens(concept_ids[i].tolist(), int(concept_lens[i]), anchor_ids[i].tolist(), int(anchor_lens[i]))
            found = found.with_concept_tokens(edit_tokens)
            merged[i] = TokenAlignment(
                concept_span=so_far.concept_span + tuple(p + offset for p in found.concept_span),
                pairs=so_far.pairs + tuple((p + offset, q + offset) for p, q in found.pairs),
                anchor_span=so_far.anchor_span + tuple(p + offset for p in found.anchor_span),
            )
        offset += segment.length
    return merged


def stream_priors(pipe, architecture: Architecture, prompts: list[str], batch_size: int = 64) -> dict[str, PriorStatistics]:
    """Per stream, the Gram statistics of ``prompts``' states (the retained set)."""
    priors: dict[str, PriorStatistics] = {}
    for start in range(0, len(prompts), batch_size):
        for name, states in architecture.states(pipe, prompts[start : start + batch_size]).items():
            priors.setdefault(name, PriorStatistics.empty(states.shape[-1])).add(states)
    return priors


class PipelineEraser:
    """The erased weights of a set of concepts on one base pipeline; ``add`` erases one more,
    ``remove`` restores one, and ``weights`` is the set's solve (the base's own weights, exactly,
    when the set is empty).

    ``retained``: prompts whose conditioning must not move (the empty prompt is always added;
    ``erasure.erase.prior_prompts`` makes them from a ``PreserveSpec``)."""

    def __init__(
        self, pipe, architecture: Architecture, retained: list[str], preserve: PreserveSpec | None = None,
        fusion: FusionSettings | None = None, prompts_per_concept: int = 8, edit_tokens: str = "span",
    ):
        self.pipe, self.architecture = pipe, architecture
        self.preserve, self.fusion = preserve or PreserveSpec(), fusion or FusionSettings()
        if self.fusion.method == "separable":
            raise RequestError("fusion.method separable needs trained increments; this path is closed form: use mace or constrained")
        if self.fusion.adversarial_rounds or self.fusion.closure is not None:
            raise RequestError("adversarial rounds and closure need the UNet path; set fusion.adversarial_rounds 0, closure off")
        self.prompts_per_concept, self.edit_tokens = prompts_per_concept, edit_tokens
        self.streams = {stream.name: stream for stream in architecture.streams(pipe)}
        denoiser = architecture.denoiser(pipe)
        self.base: Weights = {
            name: {m.module: read_weight(denoiser, m) for m in stream.maps} for name, stream in self.streams.items()
        }
        self.prior = stream_priors(pipe, architecture, list(dict.fromkeys(["", *retained])))
        self.invariants = architecture.unconditional_states(pipe)
        self.concepts: dict[str, ErasedConcept] = {}

    def add(self, concept: ConceptSpec, seed: int = 0) -> ErasedConcept:
        """Erase ``concept``: its prompt pairs encoded once, kept as statistics per stream."""
        if concept.name in self.concepts:
            raise RequestError(f"concept {concept.name!r} is already erased")
        pairs = augmented_pairs(concept.kind, concept.variants, concept.anchor, self.prompts_per_concept, concept.prompts, seed)
        concept_states = self.architecture.states(self.pipe, [c for c, _ in pairs])
        anchor_states = self.architecture.states(self.pipe, [a for _, a in pairs])
        streams = {}
        for name, stream in self.streams.items():
            alignments = stream_alignments(self.pipe, stream, pairs, self.edit_tokens, self.architecture)
            statistics = concept_statistics(concept_states[name], anchor_states[name], alignments)
            prior = self.prior[name].with_anchors([statistics]).gram()
            text_map = refinement_map([statistics], prior, self.preserve.lam1, self.preserve.ridge)
            streams[name] = StreamConcept(statistics, text_map)
        erased = ErasedConcept(concept, pairs, streams)
        self.concepts[concept.name] = erased
        return erased

    def remove(self, name: str) -> None:
        """Restore concept ``name``: it leaves the set, and the next solve is the rest's."""
        if name not in self.concepts:
            raise RequestError(f"concept {name!r} is not erased here; erased: {', '.join(self.concepts) or 'none'}")
        del self.concepts[name]

    def weights(self) -> Weights:
        if not self.concepts:
            return {name: dict(maps) for name, maps in self.base.items()}
        solved: Weights = {}
        for name, base in self.base.items():
            members = [c.streams[name] for c in self.concepts.values()]
            statistics = accumulate(base, members, self.fusion, self.prior[name])
            invariants = self.invariants[name].reshape(-1, self.invariants[name].shape[-1]).double()
            solve = solver(invariants, statistics.accumulator, statistics.edited, statistics.prior.gram(), self.preserve, self.fusion)
            solved[name] = statistics.base | solve(None)
        return solved

    def erased_pipeline(self):
        """A copy of the pipeline with the set's weights (the base pipeline is left as it was)."""
        erased = copy.deepcopy(self.pipe)
        apply_weights(erased, self.architecture, self.streams, self.weights())
        return erased


def apply_weights(pipe, architecture: Architecture, streams: dict[str, TextStream], weights: Weights) -> None:
    denoiser = architecture.denoiser(pipe)
    for name, stream in streams.items():
        for edited in stream.maps:
            write_weight(denoiser, edited, weights[name][edited.module])
