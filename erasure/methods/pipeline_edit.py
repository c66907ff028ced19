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
from erasure.core.closed_form import (
    ConceptStatistics,
    FusionAccumulator,
    PriorStatistics,
    concept_statistics,
    refinement_map,
)
from erasure.core.prompts import augmented_pairs
from erasure.core.text import TokenAlignment, align_tokens, tokenize
from erasure.methods.fusion import solver
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
        for name, states in finite_states(architecture.states(pipe, prompts[start : start + batch_size])).items():
            priors.setdefault(name, PriorStatistics.empty(states.shape[-1])).add(states)
    return priors


class PipelineEraser:
    """The erased weights of a set of concepts on one base pipeline; ``add`` erases one more,
    ``remove`` restores one, and ``weights`` is the set's solve (the base's own weights, exactly,
    when the set is empty).

    Per stream it holds the fusion's sufficient statistics (``FusionAccumulator``) and the prior,
    whose size does not depend on the number of concepts; ``restorable`` also keeps each concept's
    own statistics (four d x d float64 matrices per stream: 512 MiB a concept at FLUX's d = 4096),
    which ``remove`` subtracts. ``prior_prompts``: prompts whose conditioning must not move, the
    empty prompt among them (``erasure.erase.prior_prompts`` makes them from a ``PreserveSpec``)."""

    def __init__(
        self, pipe, architecture: Architecture, prior_prompts: list[str], preserve: PreserveSpec | None = None,
        fusion: FusionSettings | None = None, prompts_per_concept: int = 8, edit_tokens: str = "span",
        restorable: bool = True, prior: dict[str, PriorStatistics] | None = None,
    ):
        self.pipe, self.architecture, self.restorable = pipe, architecture, restorable
        self.preserve, self.fusion = preserve or PreserveSpec(), fusion or FusionSettings()
        check_fusion(self.fusion)
        self.prompts_per_concept, self.edit_tokens = prompts_per_concept, edit_tokens
        self.streams = {stream.name: stream for stream in architecture.streams(pipe)}
        denoiser = architecture.denoiser(pipe)
        self.base: Weights = {
            name: {m.module: read_weight(denoiser, m) for m in stream.maps} for name, stream in self.streams.items()
        }
        # a prior made earlier from the same prompts (a distributed run's published one) is used as is
        self.prior = prior if prior is not None else stream_priors(pipe, architecture, prior_prompts)
        check_prior_streams(self.prior, self.streams)
        self.invariants = {
            name: states.reshape(-1, states.shape[-1]).double() for name, states in architecture.unconditional_states(pipe).items()
        }
        self.accumulators = {
            name: FusionAccumulator(self.prior[name].total.shape[0], {n: tuple(w.shape) for n, w in base.items()})
            for name, base in self.base.items()
        }
        self.anchors = {name: PriorStatistics.empty(prior.total.shape[0]) for name, prior in self.prior.items()}
        self.concepts: dict[str, ErasedConcept] = {}

    def add(self, concept: ConceptSpec, seed: int = 0) -> ErasedConcept:
        """Erase ``concept``: its prompt pairs encoded once, added to every stream's statistics."""
        if concept.name in self.concepts:
            raise RequestError(f"concept {concept.name!r} is already erased")
        return self.include(self.concept(concept, seed))

    def concept(self, concept: ConceptSpec, seed: int = 0) -> ErasedConcept:
        r"""``concept``'s statistics in every stream, against this eraser's prior, without erasing it
        (a distributed run publishes them, and its fusion ``include``\ s them)."""
        return concept_streams(
            self.pipe, self.architecture, concept, self.prior, self.preserve, self.prompts_per_concept, self.edit_tokens, seed
        )

    def include(self, erased: ErasedConcept) -> ErasedConcept:
        """Erase a concept whose statistics ``concept`` made (here, or on another worker)."""
        if erased.concept.name in self.concepts:
            raise RequestError(f"concept {erased.concept.name!r} is already erased")
        if set(erased.streams) != set(self.streams):
            raise RequestError(
                f"concept {erased.concept.name!r} has statistics for streams {sorted(erased.streams)}, but this "
                f"pipeline's are {sorted(self.streams)}: it was made on another model family"
            )
        for name, kept_concept in erased.streams.items():
            if kept_concept.text_map.shape[0] != self.prior[name].total.shape[0]:
                raise RequestError(f"concept {erased.concept.name!r}'s {name} statistics are of another width than this pipeline's")
        for name, kept_concept in erased.streams.items():
            self.accumulators[name].add(kept_concept.statistics, kept_concept.text_map, {})
            self.anchors[name].add_anchors(kept_concept.statistics)
        kept = erased if self.restorable else ErasedConcept(erased.concept, erased.pairs, {})
        self.concepts[erased.concept.name] = kept
        return kept

    def remove(self, name: str) -> None:
        """Restore concept ``name``: its statistics leave the set, and the next solve is the rest's."""
        if name not in self.concepts:
            raise RequestError(f"concept {name!r} is not erased here; erased: {', '.join(self.concepts) or 'none'}")
        if not self.restorable:
            raise RequestError("this eraser keeps no concept's own statistics (restorable=False): erase the rest anew")
        for stream, concept in self.concepts.pop(name).streams.items():
            self.accumulators[stream].remove(concept.statistics, concept.text_map, {})
            anchors = self.anchors[stream]
            anchors.total -= concept.statistics.anchor_gram * concept.statistics.anchor_count
            anchors.count -= concept.statistics.anchor_count

    def weights(self) -> Weights:
        if not self.concepts:
            return {name: dict(maps) for name, maps in self.base.items()}
        solved: Weights = {}
        for name, base in self.base.items():
            prior = PriorStatistics(self.prior[name].total + self.anchors[name].total, self.prior[name].count + self.anchors[name].count)
            solve = solver(self.invariants[name], self.accumulators[name], base, prior.gram(), self.preserve, self.fusion)
            solved[name] = base | solve(None)
        return solved

    def held_bytes(self) -> int:
        """What the eraser holds beyond the pipeline: statistics, priors, base weights, kept concepts."""
        tensors = [*(t for maps in self.base.values() for t in maps.values()), *self.invariants.values()]
        for name, accumulator in self.accumulators.items():
            tensors += [accumulator.gram_sum, accumulator.mapped_gram_sum, *accumulator.lora_terms.values(),
                        self.prior[name].total, self.anchors[name].total]
        for concept in self.concepts.values():
            for kept in concept.streams.values():
                tensors += [*kept.statistics.to_tensors().values(), kept.text_map]
        return sum(t.numel() * t.element_size() for t in tensors)

    def erased_pipeline(self):
        """The pipeline with the set's weights: a copy of its denoiser, every other component
        shared with the base pipeline (which is left as it was)."""
        denoiser = copy.deepcopy(self.architecture.denoiser(self.pipe))
        apply_weights(denoiser, self.streams, self.weights())
        erased = copy.copy(self.pipe)
        erased.register_modules(**{self.architecture.denoiser_name: denoiser})  # on the copy's own config
        return erased


def concept_streams(
    pipe, architecture: Architecture, concept: ConceptSpec, prior: dict[str, PriorStatistics], preserve: PreserveSpec,
    prompts_per_concept: int, edit_tokens: str, seed: int = 0,
) -> ErasedConcept:
    """``concept``'s statistics and CFR map in every stream of ``pipe``, against ``prior``: all a
    concept job makes (no base weights copied, no fusion sums allocated)."""
    streams_of = {stream.name: stream for stream in architecture.streams(pipe)}
    check_prior_streams(prior, streams_of)
    pairs = augmented_pairs(concept.kind, concept.variants, concept.anchor, prompts_per_concept, concept.prompts, seed)
    alignments = {
        name: stream_alignments(pipe, stream, pairs, edit_tokens, architecture)
        for name, stream in streams_of.items()
    }
    # a pair whose concept every token stream truncated away says nothing about the concept
    tokens = [name for name, stream in streams_of.items() if not stream.pooled]
    kept = [i for i in range(len(pairs)) if any(alignments[name][i].concept_span for name in tokens)]
    if not kept:
        raise RequestError(
            f"concept {concept.name!r}: no prompt kept the concept's tokens apart from its anchor's (truncated, "
            "tokenised like the anchor, or removed by the pipeline's text preprocessing); use the words a prompt would use"
        )
    pairs = [pairs[i] for i in kept]
    alignments = {name: [found[i] for i in kept] for name, found in alignments.items()}
    concept_states = finite_states(architecture.states(pipe, [c for c, _ in pairs]))
    anchor_states = finite_states(architecture.states(pipe, [a for _, a in pairs]))
    streams = {}
    for name in streams_of:  # every stream solved before the eraser changes any: a failure leaves its set as it was
        statistics = concept_statistics(concept_states[name], anchor_states[name], alignments[name])
        gram = prior[name].with_anchors([statistics]).gram()
        text_map = refinement_map([statistics], gram, preserve.lam1, preserve.ridge)
        streams[name] = StreamConcept(statistics, text_map)
    return ErasedConcept(concept, pairs, streams)


def finite_states(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``states``, refused when any is NaN or infinite (T5 overflows in float16)."""
    for name, tensor in states.items():
        if not torch.isfinite(tensor).all():
            raise RequestError(
                f"the {name} stream's text states hold NaN or infinite values: the text encoders overflow in this "
                "dtype (T5 does in float16); load the model in bfloat16 or float32"
            )
    return states


def check_prior_streams(prior: dict[str, PriorStatistics], streams: dict[str, TextStream]) -> None:
    """A prior must cover exactly the pipeline's streams (one published for another family would not)."""
    if set(prior) != set(streams):
        raise RequestError(f"the prior holds streams {sorted(prior)}, but this pipeline's are {sorted(streams)}")


def check_fusion(fusion: FusionSettings) -> None:
    """Refuse the fusion settings this path does not implement, saying what to set."""
    if fusion.method == "separable":
        raise RequestError("fusion.method separable needs trained increments; this path is closed form: use mace or constrained")
    if fusion.adversarial_rounds or fusion.closure is not None:
        raise RequestError("adversarial rounds and closure need the UNet path; set fusion.adversarial_rounds 0, closure off")
    if fusion.projections != "kv":
        raise RequestError(
            "fusion.projections: v edits attn2's values alone, but SD 3's and FLUX's shared text projection and every "
            "pooled projection are not split in keys and values: use fusion.projections: kv"
        )


def apply_weights(denoiser, streams: dict[str, TextStream], weights: Weights) -> None:
    for name, stream in streams.items():
        for edited in stream.maps:
            write_weight(denoiser, edited, weights[name][edited.module])
