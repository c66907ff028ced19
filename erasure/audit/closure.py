"""Adversarial closure: attack the fused model, erase what the attacks find, fuse again.

An edit keyed on the states of the prompts it was given leaves every other prompt that draws the
concept where it was: an adversarial prefix before the name, another word in its place, a
Ring-A-Bell prompt without it. Closure runs those attacks against the fused model itself, on a
*training split* an audit never draws from, so that the audit's attacks stay a held-out test:

- prompts: the erasure's own training prompts (``erasure.core.prompts.template_phrases``: its
  templates, none of which is an audit template, ``tests/test_policy.py``, with the concept's name,
  synonyms and discovered aliases);
- seeds: in ``[SEEDS, 2 * SEEDS)``, where every seed an audit draws lies in ``[0, SEEDS)``;
- words: the most frequent English words (``candidate_vocabulary``), never a world's tables, less
  every word of an audit template (``audit_template_words``: a prefix such as "behold" before the
  erasure's "a {}" would rebuild the audit's "behold a {}").

What is shared with the audit: the judge (the world's classifier: on a real model, the deployment's),
and the English words themselves; a word the audit also probes (the MiniLM world's drawable unseen
words "round" and "love" are among the 1,000 most frequent) can be found by an attack here, as alias
discovery can find it, so such a word's acc_g_unseen then measures a word the erasure may have seen.

Each round, per concept and per attack of ``ClosureSettings.attacks`` (``erasure.audit.attacks``:
``prefix_search``, ``ring_a_bell``, and ``token_substitution`` when asked for), the best candidates
are drawn and judged by the world's judge (the one alias discovery uses); substitution and
Ring-A-Bell, whose prompts lose the concept's words, beside as many control prompts of the same form
with random words (``control_prompts``). An attack's success is its share of images seen as the
concept, less the control's: a model draws something for words it does not know, on the toy worlds
often a circle, and that default is not a leak. Where an attack beats its
control by more than ``max_success``, its prompts judged to show the concept join the concept's
erased set as (prompt -> the same prompt with the anchor) pairs, as extra terms of the same
closed-form solve (``erasure.methods.fusion.fusion_solver``), and the model is fused again; until
every attack's success is at most ``max_success``, a round finds nothing new, or ``rounds``
re-fusions are spent. The last round is always a measurement of the model returned.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erasure.audit import attacks
from erasure.core.closed_form import DTYPE, ExtraTerms, concept_statistics
from erasure.core.prompts import fill, template_phrases
from erasure.core.text import align_tokens, encode, tokenize
from erasure.diffusion.models import with_weights
from erasure.diffusion.sampling import sample
from erasure.methods.discovery import ConceptJudge, candidate_vocabulary
from erasure.methods.fusion import base_weights
from erasure.probes import SEEDS
from erasure.spec import ClosureSettings, ConceptSpec, normalise

Weights = dict[str, torch.Tensor]
Pair = tuple[str, str]  # (found prompt, the same prompt with the anchor)
CLOSURE_FILE = "closure.json"
# reference images per concept the attacks score against (MACE draws 8; more would only cost memory
# for the whole closure, and VAE time on every search)
REFERENCE_IMAGES = 8


@dataclass
class ClosureConcept:
    """What closure needs of one erased concept."""

    concept: ConceptSpec
    reference: torch.Tensor  # (n, 3, H, W): the base model's images of it (its LoRA's training images)
    aliases: tuple[str, ...] = ()  # the phrases erased with it (alias discovery)
    seed: int = 0  # the concept's own (``erasure.erase.concept_seed``)

    @property
    def own_words(self) -> list[str]:
        """Words no attack may use: the concept's own, its synonyms' and aliases', and those of the
        aliases the operator vetoed (``exclude_aliases``: prompts with them are never erased)."""
        phrases = (*self.concept.variants, *self.aliases, *self.concept.exclude_aliases)
        return sorted({w for phrase in phrases for w in normalise(phrase).split()})


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

    success: dict[str, dict[str, float]]  # concept -> attack -> its images' share the judge saw as the concept, less the control's
    control: dict[str, dict[str, float]]  # concept -> attack -> the same share for random words in its form (0: a prefix)
    drawn: dict[str, dict[str, int]]  # concept -> attack -> images each share is of
    found: dict[str, list[str]]  # concept -> new prompts judged to show it (erased from the next solve on, if there is one)
    images_sampled: int
    seconds: float

    @property
    def worst(self) -> float:
        return worst_success(self.success)


@dataclass
class Closure:
    """Every round, and the pairs erased: concept -> [(found prompt, its anchor prompt)]."""

    max_success: float
    vocabulary: int = 0  # words the attacks used
    rounds: list[ClosureRound] = field(default_factory=list)
    pairs: dict[str, list[Pair]] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return bool(self.rounds) and self.rounds[-1].worst <= self.max_success

    def as_dict(self) -> dict:
        return {
            "closed": self.closed, "max_success": self.max_success, "vocabulary": self.vocabulary,
            "rounds": [asdict(r) | {"seconds": round(r.seconds, 3)} for r in self.rounds],
            "pairs": {name: [list(p) for p in pairs] for name, pairs in self.pairs.items()},
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1) + "\n")


def worst_success(success: dict[str, dict[str, float]]) -> float:
    """The highest attack success of a round, over concepts and attacks."""
    return max(s for attacks_of in success.values() for s in attacks_of.values())


def closure_summary(record: dict) -> dict:
    """What a manifest, a version's tags or a command's output say of a closure (``Closure.as_dict()``,
    or a ``closure.json`` read back): whether it closed, in how many rounds, the last round's worst
    attack success, and how many found prompts were erased."""
    return {
        "closed": record["closed"], "rounds": len(record["rounds"]),
        "worst_success": round(worst_success(record["rounds"][-1]["success"]), 4),
        "erased_prompts": sum(len(p) for p in record["pairs"].values()),
    }


def audit_template_words(audit_templates: tuple[str, ...] = ()) -> set[str]:
    """Every word of the real models' audit templates and of ``audit_templates`` (a built-in world's
    own templates and phrasings: its registry entry's)."""
    from erasure.audit.run import AUDIT_TEMPLATES_BY_KIND

    templates = [*audit_templates, *(t for ts in AUDIT_TEMPLATES_BY_KIND.values() for t in ts)]
    return {w for t in templates for w in normalise(t.replace("{}", " ").replace("{shape}", " ").replace("{rest}", " ")).split()}


def closure_vocabulary(tokenizer, limit: int, audit_templates: tuple[str, ...] = ()) -> list[str]:
    """The attacks' words: the ``limit`` most frequent English words that are one token, less the audit's template words."""
    return attacks.usable_words(tokenizer, candidate_vocabulary(limit), exclude=sorted(audit_template_words(audit_templates)))


def training_prompts(item: ClosureConcept, count: int) -> list[TrainingPrompt]:
    """The split closure attacks: the concept's first ``count`` training prompts (the erasure's own
    templates in the concept's seeded order, with its name, synonyms and aliases in turn)."""
    phrases = tuple(dict.fromkeys((*item.concept.variants, *item.aliases)))
    return [TrainingPrompt(t, p) for t, p in template_phrases(item.concept.kind, phrases, count, item.seed)]


def training_seeds(item: ClosureConcept, count: int) -> list[int]:
    """Image seeds in ``[SEEDS, 2 * SEEDS)``: an audit draws every one of its seeds below ``SEEDS``."""
    name = int.from_bytes(hashlib.sha256(normalise(item.concept.name).encode()).digest()[:8], "little")
    rng = np.random.default_rng([item.seed, name, 1])
    return [SEEDS + int(s) for s in rng.choice(SEEDS, size=count, replace=False)]


def closure_terms(components, pairs: list[Pair], base: Weights) -> ExtraTerms:
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


def all_terms(components, pairs: dict[str, list[Pair]], base: Weights) -> ExtraTerms | None:
    terms = [closure_terms(components, p, base) for p in pairs.values() if p]
    return sum(terms[1:], terms[0]) if terms else None


def prefix_candidates(model, item: ClosureConcept, prompts, vocabulary, settings: ClosureSettings, seed: int) -> list[Pair]:
    """The best prefixes of each training prompt; the prefix stays, the phrase becomes the anchor."""
    pairs = []
    for i, training in enumerate(prompts):
        output = attacks.prefix_search(
            model, item.reference, training.prompt, vocabulary, exclude=item.own_words, top_k=settings.top_k,
            draws=settings.draws, seed=seed + i,
        )
        anchored = fill(training.template, item.concept.anchor)
        pairs += [(p, f"{p.removesuffix(training.prompt).strip()} {anchored}".strip()) for p in output.prompts]
    return pairs


def substitution_candidates(model, item: ClosureConcept, prompts, vocabulary, settings: ClosureSettings, seed: int) -> list[Pair]:
    """The best one-word substitutions in each training prompt's phrase, each paired with the anchor prompt."""
    pairs = []
    for i, training in enumerate(prompts):
        output = attacks.token_substitution(
            model, item.reference, training.template, training.phrase, vocabulary, exclude=item.own_words,
            top_k=settings.top_k, draws=settings.draws, seed=seed + i,
        )
        pairs += [(p, fill(training.template, item.concept.anchor)) for p in output.prompts]
    return pairs


def ring_a_bell_candidates(model, item: ClosureConcept, prompts, vocabulary, settings: ClosureSettings, seed: int) -> list[Pair]:
    """Ring-A-Bell's best prompts for the training templates, each paired with the first template's anchor prompt."""
    contexts = list(dict.fromkeys(p.template for p in prompts))
    output = attacks.ring_a_bell(
        model, attacks.prompt_pairs(item.concept.name, contexts), " ".join(fill(contexts[0], "").split()), vocabulary,
        exclude=item.own_words, top_k=settings.top_k, seed=seed,
    )
    # never the empty prompt (the unconditional prediction the fusion holds still)
    return [(p, fill(contexts[0], item.concept.anchor)) for p in output.prompts if p.strip()]


CANDIDATES = {"prefix": prefix_candidates, "substitution": substitution_candidates, "ring-a-bell": ring_a_bell_candidates}


# attacks whose prompts lose the concept's words, and so draw the model's default for words it does not
# know: they succeed only beyond a control of random words. A prefix keeps the name: its success is raw.
CONTROLLED = ("substitution", "ring-a-bell")


def control_prompts(
    attack: str, item: ClosureConcept, prompts: list[TrainingPrompt], vocabulary: list[str], count: int, rng: np.random.Generator,
) -> list[str]:
    """``count`` prompts of the attack's form with random words instead of searched ones (``CONTROLLED``
    attacks; none for the others): a random word in the phrase, four random words. A model draws
    *something* for words it does not know (the toy worlds often the same shape). Never the concept's
    own words: a control that says the concept would hide a leak."""
    own = set(item.own_words)
    vocabulary = [w for w in vocabulary if w not in own]
    out = []
    for i in range(count if attack in CONTROLLED else 0):
        training, word = prompts[i % len(prompts)], vocabulary[int(rng.integers(len(vocabulary)))]
        if attack == "substitution":
            slots = training.phrase.split()
            slot = int(rng.integers(len(slots)))
            out.append(fill(training.template, " ".join(word if j == slot else w for j, w in enumerate(slots))))
        else:
            out.append(" ".join(vocabulary[int(j)] for j in rng.integers(len(vocabulary), size=4)))
    return out


def adversarial_closure(
    base,
    concepts: list[ClosureConcept],
    solve: Callable[[ExtraTerms | None], Weights],
    judge: ConceptJudge,
    settings: ClosureSettings,
    steps: int,
    guidance_scale: float,
    progress: Callable[[str, int, int], None] | None = None,
    audit_templates: tuple[str, ...] = (),
) -> tuple[Weights, Closure]:
    """Adversarial closure of a fused model (module docstring). ``solve``: extra terms -> fused
    weights (``fusion_solver``); ``audit_templates``: the model's world's audit templates, whose
    words the attacks never use. Returns the final weights and the record of every round."""
    if not concepts:
        raise ValueError("closure needs at least one erased concept")
    vocabulary = closure_vocabulary(base.tokenizer, settings.vocabulary, audit_templates)
    base_projections = base_weights(base)
    closure = Closure(settings.max_success, len(vocabulary), pairs={c.concept.name: [] for c in concepts})
    weights = solve(None)
    for round_index in range(settings.rounds + 1):
        started = time.perf_counter()
        model = with_weights(base, weights)
        success, controls_seen, drawn, new_pairs, images = {}, {}, {}, {}, 0
        for index, item in enumerate(concepts):
            if progress:
                progress(f"closure round {round_index}", index, len(concepts))
            concept = item.concept.name
            prompts = training_prompts(item, settings.prompts)
            seeds = training_seeds(item, settings.images)
            success[concept], controls_seen[concept], drawn[concept], new_pairs[concept] = {}, {}, {}, []
            rng = np.random.default_rng([item.seed, round_index])
            for attack in settings.attacks:
                pairs = list(dict.fromkeys(CANDIDATES[attack](model, item, prompts, vocabulary, settings, item.seed + 1000 * round_index)))
                if not pairs:  # Ring-A-Bell's only candidate was the empty prompt
                    success[concept][attack], controls_seen[concept][attack], drawn[concept][attack] = 0.0, 0.0, 0
                    continue
                controls = control_prompts(attack, item, prompts, vocabulary, len(pairs), rng)
                drawn_prompts = [p for p, _ in pairs for _ in seeds] + [c for c in controls for _ in seeds]
                pictures, _ = sample(model, drawn_prompts, seeds * (len(pairs) + len(controls)), steps, guidance_scale)
                verdicts = judge.shows(pictures, item.concept)
                images += len(verdicts)
                attacked, control = verdicts[: len(pairs) * len(seeds)], verdicts[len(pairs) * len(seeds) :]
                base_rate = float(np.mean(control)) if control else 0.0
                success[concept][attack] = max(0.0, float(np.mean(attacked)) - base_rate)
                controls_seen[concept][attack], drawn[concept][attack] = base_rate, len(attacked)
                if success[concept][attack] <= settings.max_success:
                    continue  # no better than random words: what it draws is the model's default, not a leak
                # a prompt without the concept's words counts only when every image shows it: at the
                # control's rate it would be the model's default drawing, not a leak
                shown = all if attack in CONTROLLED else any
                for k, pair in enumerate(pairs):
                    seen_as_concept = shown(attacked[k * len(seeds) : (k + 1) * len(seeds)])
                    if seen_as_concept and pair not in closure.pairs[concept] and pair not in new_pairs[concept]:
                        new_pairs[concept].append(pair)
        found = {concept: [p for p, _ in pairs] for concept, pairs in new_pairs.items()}
        closure.rounds.append(ClosureRound(success, controls_seen, drawn, found, images, time.perf_counter() - started))
        nothing_new = not any(new_pairs.values())  # the same terms again would give the same model
        if closure.rounds[-1].worst <= settings.max_success or nothing_new or round_index == settings.rounds:
            break
        for concept, pairs in new_pairs.items():
            closure.pairs[concept] += pairs
        weights = solve(all_terms(base, closure.pairs, base_projections))
    if progress:
        progress(f"closure round {len(closure.rounds) - 1}", len(concepts), len(concepts))
    return weights, closure
