"""Adversarial closure: attack the fused model, erase what the attacks find, fuse again.

An edit keyed on the states of the prompts it was given leaves every other prompt that draws the
concept where it was: an adversarial prefix before the name, another word in its place, a
Ring-A-Bell prompt without it. Closure runs those attacks against the fused model itself, on a
*training split* an audit never draws from, so that the audit's attacks stay a held-out test:

- templates: the erasure's own (``erasure.core.prompts.TEMPLATES``), which no audit template is
  (``tests/test_policy.py``), filled with the concept's name, synonyms and discovered aliases;
- seeds: in ``[SEEDS, 2 * SEEDS)``, where every seed an audit draws lies in ``[0, SEEDS)``;
- words: the most frequent English words (``candidate_vocabulary``), never a world's tables.

Each round, per concept and per attack (``erasure.audit.attacks``: ``prefix_search``,
``token_substitution``, ``ring_a_bell``), the best candidates are drawn and judged by the world's
judge (the one alias discovery uses). The prompts judged to show the concept join its erased set as
(prompt -> the same prompt with the anchor) pairs, as extra terms of the same closed-form solve
(``erasure.methods.fusion.fusion_solver``), and the model is fused again; until every attack's
success on the split is at most ``max_success``, or ``rounds`` re-fusions are spent. The last
round is always a measurement of the model returned.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from erasure.audit import attacks
from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import DTYPE, ExtraTerms, concept_statistics
from erasure.core.prompts import TEMPLATES, fill
from erasure.core.text import align_tokens, encode, tokenize
from erasure.diffusion.models import with_weights
from erasure.diffusion.sampling import sample
from erasure.methods.discovery import ConceptJudge, candidate_vocabulary
from erasure.probes import SEEDS
from erasure.spec import ClosureSettings, ConceptSpec, normalise

Weights = dict[str, torch.Tensor]


@dataclass
class ClosureConcept:
    """What closure needs of one erased concept."""

    concept: ConceptSpec
    reference: torch.Tensor  # (n, 3, H, W): the base model's images of it (its LoRA's training images)
    aliases: tuple[str, ...] = ()  # the phrases erased with it (alias discovery)
    seed: int = 0  # the concept's own (``erasure.erase.concept_seed``)


@dataclass(frozen=True)
class TrainingPrompt:
    template: str
    phrase: str  # the concept's name, a synonym or an alias

    @property
    def prompt(self) -> str:
        return fill(self.template, self.phrase)


@dataclass
class ClosureRound:
    """One measurement of the fused model on the training split, and what it added."""

    success: dict[str, dict[str, float]]  # concept -> attack -> share of its images the judge saw as the concept
    found: dict[str, list[str]]  # concept -> new prompts judged to show it (erased from the next solve on, if there is one)
    images: int
    seconds: float

    @property
    def worst(self) -> float:
        return max((s for attack in self.success.values() for s in attack.values()), default=0.0)


@dataclass
class Closure:
    """Every round, and the pairs erased: concept -> [(found prompt, its anchor prompt)]."""

    rounds: list[ClosureRound] = field(default_factory=list)
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    max_success: float = 0.05

    @property
    def closed(self) -> bool:
        return bool(self.rounds) and self.rounds[-1].worst <= self.max_success

    def as_dict(self) -> dict:
        return {
            "closed": self.closed, "max_success": self.max_success,
            "rounds": [asdict(r) | {"seconds": round(r.seconds, 3)} for r in self.rounds],
            "pairs": {name: [list(p) for p in pairs] for name, pairs in self.pairs.items()},
        }


def training_prompts(item: ClosureConcept, count: int) -> list[TrainingPrompt]:
    """The split closure attacks: the erasure's own templates (seeded order) with the concept's
    phrases in turn (name, synonyms, aliases)."""
    templates = list(TEMPLATES[item.concept.kind])
    random.Random(item.seed).shuffle(templates)
    phrases = list(dict.fromkeys((*item.concept.variants, *item.aliases)))
    return [TrainingPrompt(templates[i % len(templates)], phrases[i % len(phrases)]) for i in range(count)]


def training_seeds(item: ClosureConcept, count: int) -> list[int]:
    """Image seeds in ``[SEEDS, 2 * SEEDS)``: an audit draws every one of its seeds below ``SEEDS``."""
    name = int.from_bytes(hashlib.sha256(normalise(item.concept.name).encode()).digest()[:8], "little")
    rng = np.random.default_rng([item.seed, name, 1])
    return [SEEDS + int(s) for s in rng.choice(SEEDS, size=count, replace=False)]


def closure_terms(components, pairs: list[tuple[str, str]], base: Weights) -> ExtraTerms:
    """(found prompt -> anchor prompt) pairs as extra terms of the solve: every aligned token state
    of the found prompt (its span with the anchor's, as ``edit_tokens: span`` pairs them) is sent
    where the base model sends the anchor prompt's, ``W g``. One concept's pairs weigh as one concept."""
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    found_ids, found_lens = tokenize(tokenizer, [p for p, _ in pairs])
    anchor_ids, anchor_lens = tokenize(tokenizer, [a for _, a in pairs])
    alignments = [
        align_tokens(found_ids[i].tolist(), int(found_lens[i]), anchor_ids[i].tolist(), int(anchor_lens[i])).with_concept_tokens("span")
        for i in range(len(pairs))
    ]
    statistics = concept_statistics(encode(text_encoder, found_ids), encode(text_encoder, anchor_ids), alignments)
    return ExtraTerms(
        gram=statistics.aligned_gram,
        cross={name: w.to(DTYPE) @ statistics.aligned_cross for name, w in base.items()},
    )


def all_terms(components, pairs: dict[str, list[tuple[str, str]]], base: Weights) -> ExtraTerms | None:
    terms = [closure_terms(components, p, base) for p in pairs.values() if p]
    return sum(terms[1:], terms[0]) if terms else None


def attack_candidates(
    model, item: ClosureConcept, prompts: list[TrainingPrompt], vocabulary: list[str], settings: ClosureSettings, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """attack -> its best (prompt, anchor prompt) candidates against ``model`` on the split."""
    concept, anchor = item.concept, item.concept.anchor or ""
    found: dict[str, list[tuple[str, str]]] = {}
    own_words = [w for v in concept.variants for w in normalise(v).split()]
    for name in settings.attacks:
        candidates = []
        if name == "ring-a-bell":
            contexts = list(dict.fromkeys(p.template for p in prompts))
            output = attacks.ring_a_bell(
                model, attacks.prompt_pairs(concept.name, contexts), " ".join(fill(contexts[0], "").split()), vocabulary,
                exclude=own_words, top_k=settings.top_k, seed=seed,
            )
            candidates = [(p, fill(contexts[0], anchor)) for p in output.prompts]
        for i, item_prompt in enumerate(prompts if name != "ring-a-bell" else ()):
            anchor_prompt = fill(item_prompt.template, anchor)
            if name == "prefix":
                output = attacks.prefix_search(
                    model, item.reference, item_prompt.prompt, vocabulary, top_k=settings.top_k, draws=settings.draws, seed=seed + i,
                )
                # the prefix stays, the concept's phrase becomes the anchor
                candidates += [(p, f"{p[: len(p) - len(item_prompt.prompt)].strip()} {anchor_prompt}".strip()) for p in output.prompts]
            else:  # substitution
                output = attacks.token_substitution(
                    model, item.reference, item_prompt.template, item_prompt.phrase, vocabulary, exclude=own_words,
                    top_k=settings.top_k, draws=settings.draws, seed=seed + i,
                )
                candidates += [(p, anchor_prompt) for p in output.prompts]
        found[name] = list(dict.fromkeys(candidates))
    return found


def close(
    base,
    concepts: list[ClosureConcept],
    solve: Callable[[ExtraTerms | None], Weights],
    judge: ConceptJudge,
    settings: ClosureSettings,
    steps: int,
    guidance_scale: float,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Weights, Closure]:
    """Adversarial closure of a fused model (module docstring). ``solve``: extra terms -> fused
    weights (``fusion_solver``). Returns the final weights and the record of every round."""
    vocabulary = attacks.usable_words(base.tokenizer, candidate_vocabulary(settings.vocabulary))
    base_weights = {n: p.weight.data.detach().cpu() for n, p in cross_attention_projections(base.unet).items()}
    closure = Closure(pairs={c.concept.name: [] for c in concepts}, max_success=settings.max_success)
    weights = solve(None)
    for number in range(settings.rounds + 1):
        started = time.perf_counter()
        model = with_weights(base, weights)
        success, found, new_pairs, images = {}, {}, {}, 0
        for index, item in enumerate(concepts):
            if progress:
                progress(f"closure round {number}", index, len(concepts))
            name = item.concept.name
            prompts = training_prompts(item, settings.prompts)
            seeds = training_seeds(item, settings.images)
            candidates = attack_candidates(model, item, prompts, vocabulary, settings, seed=item.seed + 1000 * number)
            success[name], new_pairs[name] = {}, []
            for attack, pairs in candidates.items():
                drawn = [p for p, _ in pairs for _ in seeds]
                pictures, _ = sample(model, drawn, seeds * len(pairs), steps, guidance_scale, batch_size=64)
                verdicts = judge.shows(pictures, item.concept)
                images += len(drawn)
                success[name][attack] = float(np.mean(verdicts)) if verdicts else 0.0
                for k, pair in enumerate(pairs):
                    known = closure.pairs[name] + new_pairs[name]
                    if any(verdicts[k * len(seeds) : (k + 1) * len(seeds)]) and pair not in known:
                        new_pairs[name].append(pair)
            found[name] = [p for p, _ in new_pairs[name]]
        closure.rounds.append(ClosureRound(success, found, images, time.perf_counter() - started))
        if closure.rounds[-1].worst <= settings.max_success or number == settings.rounds:
            break
        for name, pairs in new_pairs.items():
            closure.pairs[name] += pairs
        weights = solve(all_terms(base, closure.pairs, base_weights))
    if progress:
        progress(f"closure round {len(closure.rounds) - 1}", len(concepts), len(concepts))
    return weights, closure
