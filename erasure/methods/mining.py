"""RealEra's neighbour mining: erase what lies near a concept, keep what lies beyond it.

"Concept residue": after an erasure, inputs *near* the concept (a synonym the request did
not list, a paraphrase) still evoke it. Mining adds, per concept (docs/method.md,
"Neighbour mining (RealEra)"):

- perturbed states ``e' = |e| (cos t e/|e| + sin t u)``, ``u`` a random unit direction
  orthogonal to ``e`` and ``cos t`` uniform in the band ``[low, high]``: the same norm, a
  chosen angle. They join the fused states with the target of the state they came from:
  the fusion erases them as it erases the concept;
- beyond-concept states, built the same way with ``cos t`` uniform in ``[0, low)``: they
  join the prior, so the edit must keep them, and the neighbourhood stays a neighbourhood.
  Off by default: they still hold up to half of the concept's own direction, and under the
  constrained fusion the prior's directions are not editable, so they shrink what can erase
  the concept (measured on the MiniLM world, red and circle: the editable share of the
  concept's own states fell from 0.67 to about 0.4);
- text neighbours: words of the tokenizer's vocabulary whose state, in the concept's own
  prompt, has a cosine to the concept's state inside the band. They join the concept as
  synonyms (its CFR pairs, its fused states, its LoRA's prompts). Retained concepts, the
  concept's own words and anchor, and the template's words are never mined.

Perturbations act on the concept's own token states (its span in each prompt), the states a
bidirectional encoder and a causal one both carry the concept in.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch

from erasure.core.closed_form import ConceptStatistics
from erasure.core.prompts import TEMPLATES, fill
from erasure.core.text import align_tokens, encode, tokenize
from erasure.spec import ConceptSpec, MiningSettings, normalise


def states_at_cosine(states: torch.Tensor, low: float, high: float, per_state: int, generator: torch.Generator) -> torch.Tensor:
    """(n * per_state, d): copies of ``states`` (n, d) with the same norm and a cosine to their
    origin drawn uniformly in ``[low, high]``."""
    if per_state == 0 or len(states) == 0:
        return states.new_zeros(0, states.shape[1])
    origin = states.repeat_interleave(per_state, dim=0).double()
    unit = origin / origin.norm(dim=1, keepdim=True).clamp_min(1e-12)
    noise = torch.randn(origin.shape, generator=generator, dtype=torch.float64)
    orthogonal = noise - (noise * unit).sum(dim=1, keepdim=True) * unit
    orthogonal = orthogonal / orthogonal.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = low + (high - low) * torch.rand(len(origin), 1, generator=generator, dtype=torch.float64)
    sine = (1 - cosine**2).clamp_min(0).sqrt()
    return (origin.norm(dim=1, keepdim=True) * (cosine * unit + sine * orthogonal)).to(states.dtype)


@functools.lru_cache(maxsize=2)  # one tokenizer's vocabulary is scanned once, not per concept
def candidate_words(tokenizer, limit: int = 4000) -> tuple[str, ...]:
    """Whole alphabetic words that the tokenizer writes as one token of its own, in vocabulary
    order, at most ``limit``: where text neighbours are looked for. A word piece ("agazine",
    "##ing", a SentencePiece continuation) is not a word a prompt would use, so a candidate
    must tokenise back to exactly one token."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    words: list[str] = []
    seen: set[str] = set()
    for token, _ in vocabulary:
        if token in special:
            continue
        word = token.removesuffix("</w>").removeprefix("\u2581").removeprefix("##")
        if not re.fullmatch(r"[a-z]{3,}", word) or word in seen:
            continue
        seen.add(word)
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            words.append(word)
            if len(words) >= limit:
                break
    return tuple(words)


def word_position(tokenizer, template: str) -> int:
    """Where a one-token word put in ``template`` sits in the tokenised prompt: after the
    template's prefix (and BOS, for tokenizers that add one)."""
    prefix = tokenizer(template.split("{}")[0].strip(), add_special_tokens=True)["input_ids"]
    return len(prefix) - 1  # the prefix's closing special token (EOS) is where the word goes


# (text encoder, template, candidates) -> (words, their states): every concept of a kind
# looks for neighbours among the same candidates in the same template
_CANDIDATE_STATES: dict[tuple, tuple[list[str], torch.Tensor]] = {}


def candidate_states(components, template: str, candidates: list[str]) -> torch.Tensor:
    key = (id(components.text_encoder), template, tuple(candidates))
    if key not in _CANDIDATE_STATES:
        _CANDIDATE_STATES.clear()  # one at a time: a model's candidates, not every model's
        ids, _ = tokenize(components.tokenizer, [template.replace("{}", w) for w in candidates])
        states = encode(components.text_encoder, ids)[:, word_position(components.tokenizer, template)].clone()
        _CANDIDATE_STATES[key] = (list(candidates), states)
    return _CANDIDATE_STATES[key][1]


def text_neighbours(
    components,
    template: str,
    concept_state: torch.Tensor,
    band: tuple[float, float],
    count: int,
    exclude: set[str],
    candidates: list[str],
) -> list[tuple[str, float]]:
    """The ``count`` candidate words (one token each) whose state in ``template`` lies in the
    cosine band of ``concept_state``, closest first, with their cosine."""
    if not candidates or count == 0:
        return []
    states = candidate_states(components, template, candidates)
    cosine = torch.nn.functional.cosine_similarity(states.double(), concept_state.double()[None], dim=1)
    inside = [(candidates[i], float(cosine[i])) for i in torch.argsort(cosine, descending=True).tolist()
              if band[0] <= float(cosine[i]) <= band[1] and candidates[i] not in exclude]
    return inside[:count]


def never_mined(concept: ConceptSpec, retained: tuple[str, ...]) -> frozenset[str]:
    """Words mining must never erase: every word of a retained concept, of the concept's own name,
    synonyms and anchor, and of the templates. Only this concept's words: its artifact must not
    depend on the other concepts erased with it (takedown reuses it under the same key)."""
    words = {w for kept in retained for w in normalise(kept).split()}
    words |= {w for phrase in (*concept.variants, concept.anchor) for w in normalise(phrase).split()}
    words |= {w for templates in TEMPLATES.values() for t in templates for w in normalise(t.replace("{}", " ")).split()}
    return frozenset(words)


def mined_words(
    components, concept: ConceptSpec, mining: MiningSettings, exclude: frozenset[str]
) -> list[tuple[str, float]]:
    """The concept's text neighbours: words whose state, in the concept's first template, lies in
    the band around the concept's own last token's state. They join the concept as synonyms."""
    if not mining.vocabulary_words:
        return []
    template = TEMPLATES[concept.kind][0]
    ids, lengths = tokenize(components.tokenizer, [fill(template, concept.name)])
    alignment = align_tokens(ids[0].tolist(), int(lengths[0]), *_anchor_ids(components, template, concept.anchor))
    if not alignment.concept_span:
        return []
    concept_state = encode(components.text_encoder, ids)[0, alignment.concept_span[-1]]
    return text_neighbours(
        components, template, concept_state, mining.band, mining.vocabulary_words, set(exclude),
        list(candidate_words(components.tokenizer)),
    )


def with_perturbed_neighbours(
    statistics: ConceptStatistics, span_states: torch.Tensor, mining: MiningSettings, seed: int
) -> ConceptStatistics:
    """The concept's statistics with RealEra's perturbed neighbours: each state ``x`` near a
    concept state ``s`` joins the fused states and takes ``s``'s target (it is erased *as the
    concept*; mapping it through the concept's maps instead would pin the edit to zero on every
    random direction it adds). Beyond-concept states join the concept's share of the prior."""
    low, high = mining.band
    generator = torch.Generator().manual_seed(seed)
    near = states_at_cosine(span_states, low, high, mining.perturbed_per_state, generator).double()
    sources = span_states.double().repeat_interleave(mining.perturbed_per_state, dim=0)
    beyond = states_at_cosine(span_states, 0.0, low * 0.999, mining.beyond_per_state, generator).double()
    # the concept's prompts and its anchor prompts are paired one to one and padded alike
    count = statistics.anchor_count
    total = count + len(near)
    anchors = statistics.anchor_count + len(beyond)
    return dataclasses.replace(
        statistics,
        gram=(statistics.gram * count + near.T @ near) / total,
        target_cross=(statistics.source_cross * count + sources.T @ near) / total,
        anchor_gram=(statistics.anchor_gram * statistics.anchor_count + beyond.T @ beyond) / anchors,
        anchor_count=anchors,
    )


def _anchor_ids(components, template: str, anchor: str) -> tuple[list[int], int]:
    ids, lengths = tokenize(components.tokenizer, [fill(template, anchor)])
    return ids[0].tolist(), int(lengths[0])
