"""Alias discovery: the words the base model draws as a concept, found from the model itself.

A request names a concept one way; the model knows it by others ("crimson" and "scarlet" for
red, "ball" for circle). An edit keyed on the states of the words the request typed leaves the
others drawing the concept, and text-encoder neighbours do not find them (red-crimson is 0.39
in MiniLM, yet the UNet draws both as one colour). What the model draws as the concept is the
ground truth, so the aliases are looked for in the model, word by word of the concept's name (a
"slot": "blue" and "star" of "blue star"), among an English vocabulary (``candidate_vocabulary``):

1. text screen (cheap): each candidate's keys and values, in every cross-attention layer, against
   the slot word's; the ``screened`` closest go on;
2. model screen: the UNet's one-step prediction of the clean image for the concept's phrase with
   the candidate in the slot, from fixed noise, against the concept's own prediction (its distance
   relative to the pool's median); the ``confirmed`` closest go on;
3. confirmation: ``samples`` images of each on the base model, in the erasure's own templates,
   judged by the world's judge (the one the audit uses). A word the model does not know still draws
   *something*, often the same colour or shape again and again, so a candidate is an alias only when
   the judge sees the concept in at least ``min_rate`` of its images *and* that count is improbable
   (binomial p below ``p_value``) at the base rate: how often ``controls`` random vocabulary words in
   the same slot, templates and seeds are drawn as the concept.

Nothing here reads a world's synonym tables or an evaluation's probes: only the model, the
vocabulary and the judge, so it works the same on a real model.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from erasure.core.attention import cross_attention_projections
from erasure.core.prompts import TEMPLATES, fill
from erasure.core.text import encode, tokenize
from erasure.diffusion.sampling import initial_noise, predicted_noise, sample
from erasure.methods.mining import word_position
from erasure.spec import ConceptSpec, DiscoverySettings, normalise

SCREEN_TIMESTEP = 0.7  # of the training schedule: late enough that the prompt decides the colour and shape
SCREEN_SEEDS = (0, 1)
BATCH = 256


@dataclass(frozen=True)
class Alias:
    """A phrase the base model draws as the concept, and the evidence."""

    phrase: str  # the concept's name with ``word`` in slot ``slot``
    slot: int
    word: str
    screen: float  # model-screen score: 1 = the concept's own prediction, 0 = the pool's median distance
    hits: int  # images the judge saw as the concept
    samples: int
    base_rate: float  # the controls' rate (add-one smoothed)
    p_value: float  # P(at least ``hits`` of ``samples`` at the base rate)


@dataclass
class Discovery:
    """One concept's discovery: the aliases found, and what it cost."""

    aliases: list[Alias] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)  # every sampled candidate: phrase, slot, hits, p_value, alias
    base_rates: list[float] = field(default_factory=list)  # per word of the name: the controls' rate
    candidates: int = 0  # vocabulary words screened per slot
    images: int = 0  # sampled for confirmation (candidates and controls)
    seconds: float = 0.0

    @property
    def phrases(self) -> list[str]:
        return [alias.phrase for alias in self.aliases]

    def as_dict(self) -> dict:
        return {
            "aliases": [asdict(a) for a in self.aliases], "checked": self.checked, "base_rates": self.base_rates,
            "candidates": self.candidates, "images": self.images,
            "seconds": round(self.seconds, 3),
        }


class ConceptJudge(Protocol):
    """What discovery asks of a judge (a world's, ``erasure.worlds.builtins``): can it see ``concept``
    at all (``check`` raises a ValueError saying why not), and does each image show it?"""

    def check(self, concept: ConceptSpec) -> None: ...

    def shows(self, images: torch.Tensor, concept: ConceptSpec) -> list[bool]: ...


@functools.lru_cache(maxsize=4)
def candidate_vocabulary(limit: int) -> tuple[str, ...]:
    """Where aliases are looked for: the ``limit`` most frequent English words (wordfreq's list,
    alphabetic, three letters or more), words of several tokens included ("asterisk" is
    ``as ##ter ##isk`` to MiniLM). Not the tokenizer's own vocabulary: a model's tokenizer may have
    been built from the very captions (and synonyms) the model was trained on, as the CLIP toy
    world's was, and what discovery reads must be independent of them."""
    import wordfreq

    return tuple(w for w in wordfreq.top_n_list("en", limit * 2) if re.fullmatch(r"[a-z]{3,}", w))[:limit]


def _span_states(components, prompts: list[str], words: list[str], template: str) -> torch.Tensor:
    """(n, d): the mean state of each word's own tokens in its prompt (the template's prefix first)."""
    prefix = word_position(components.tokenizer, template)
    ids, _ = tokenize(components.tokenizer, prompts)
    states = encode(components.text_encoder, ids)
    lengths = [max(1, len(components.tokenizer(w, add_special_tokens=False)["input_ids"])) for w in words]
    out = torch.stack([states[i, prefix : min(prefix + n, states.shape[1])].mean(0) for i, n in enumerate(lengths)])
    return out.double()


# text encoder -> {(template, vocabulary): states}: every concept of a run screens the same words;
# weak, so a model let go takes its states with it (and a new one never finds an old one's)
_VOCABULARY_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary_states(components, template: str, words: tuple[str, ...]) -> torch.Tensor:
    """(n, d): each word's mean token state in ``template``, computed once per model and template."""
    cache = _VOCABULARY_STATES.setdefault(components.text_encoder, {})
    if (template, words) not in cache:
        cache.clear()  # one template's at a time
        parts = [
            _span_states(components, [fill(template, w) for w in words[i : i + BATCH]], list(words[i : i + BATCH]), template)
            for i in range(0, len(words), BATCH)
        ]
        cache[(template, words)] = torch.cat(parts)
    return cache[(template, words)]


def text_screen(components, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n,): mean over cross-attention K/V projections of the cosine between each state's output and
    ``target``'s: how alike the UNet reads them."""
    scores = torch.zeros(len(states), dtype=torch.float64)
    projections = cross_attention_projections(components.unet)
    for projection in projections.values():
        weight = projection.weight.detach().to("cpu", torch.float64)
        scores += torch.nn.functional.cosine_similarity(states @ weight.T, (target @ weight.T)[None], dim=1)
    return scores / len(projections)


@torch.no_grad()
def one_step_predictions(components, prompts: list[str]) -> torch.Tensor:
    """(n, k): the UNet's prediction of the clean sample for each prompt from fixed noise at one
    late timestep, flattened over ``SCREEN_SEEDS``."""
    scheduler = components.scheduler
    step = int(SCREEN_TIMESTEP * scheduler.config.num_train_timesteps)
    alpha_bar = scheduler.alphas_cumprod[step].double()
    out = []
    for start in range(0, len(prompts), BATCH):
        ids, _ = tokenize(components.tokenizer, prompts[start : start + BATCH])
        states = encode(components.text_encoder, ids).to(components.device, components.unet.dtype)
        per_seed = []
        for seed in SCREEN_SEEDS:
            noisy = initial_noise(components, [seed] * len(states)).to(components.unet.dtype)
            t = torch.full((len(states),), step, device=components.device)
            eps = predicted_noise(scheduler, components.unet(noisy, t, encoder_hidden_states=states).sample, noisy, t)
            clean = (noisy.double() - (1 - alpha_bar).sqrt() * eps.double()) / alpha_bar.sqrt()
            per_seed.append(clean.flatten(1).cpu())
        out.append(torch.cat(per_seed, dim=1))
    return torch.cat(out)


def binomial_tail(hits: int, samples: int, rate: float) -> float:
    """P(X >= hits) for X ~ Binomial(samples, rate)."""
    return float(sum(math.comb(samples, k) * rate**k * (1 - rate) ** (samples - k) for k in range(hits, samples + 1)))


def is_alias(hits: int, samples: int, base_rate: float, settings: DiscoverySettings) -> bool:
    """Drawn as the concept often enough (``min_rate``), and more often than the base rate explains."""
    return hits >= settings.min_rate * samples and binomial_tail(hits, samples, base_rate) < settings.p_value


def with_word(words: list[str], slot: int, word: str) -> str:
    return " ".join(word if i == slot else w for i, w in enumerate(words))


def discover_aliases(
    components,
    concept: ConceptSpec,
    settings: DiscoverySettings,
    judge: ConceptJudge,
    steps: int,
    guidance_scale: float,
    seed: int,
    exclude: frozenset[str] = frozenset(),
    progress: Callable[[str, int, int], None] | None = None,
) -> Discovery:
    """The aliases of ``concept`` that the base model ``components`` draws as it (module docstring).
    ``exclude``: words never taken (retained concepts', the concept's own, the templates'); the
    concept's ``exclude_aliases`` are added. Deterministic per ``seed``."""
    started = time.perf_counter()
    template = TEMPLATES[concept.kind][0]
    words = normalise(concept.name).split()
    vetoed = vetoes(concept)
    excluded = set(exclude) | vetoed
    everything = candidate_vocabulary(settings.vocabulary)
    kept = [i for i, w in enumerate(everything) if w not in excluded]
    vocabulary = [everything[i] for i in kept]
    discovery = Discovery(candidates=len(vocabulary))
    if not vocabulary:
        return discovery
    states = vocabulary_states(components, template, everything)[kept]
    rng = np.random.default_rng(seed)
    sample_templates = TEMPLATES[concept.kind][: max(1, settings.samples // 2)]
    prompts_of = lambda phrase: [fill(sample_templates[i % len(sample_templates)], phrase) for i in range(settings.samples)]  # noqa: E731
    sample_seeds = [int(s) for s in rng.integers(0, 2**31 - 1, settings.samples)]

    def judged(phrases: list[str]) -> list[int]:
        prompts = [p for phrase in phrases for p in prompts_of(phrase)]
        images, _ = sample(components, prompts, sample_seeds * len(phrases), steps, guidance_scale, batch_size=64)
        discovery.images += len(prompts)
        verdicts = judge.shows(images, concept)
        return [sum(verdicts[i * settings.samples : (i + 1) * settings.samples]) for i in range(len(phrases))]

    for slot, word in enumerate(words):
        if progress:
            progress(f"discover {concept.name}", slot, len(words))
        target = _span_states(components, [fill(template, word)], [word], template)[0]
        order = torch.argsort(text_screen(components, states, target), descending=True)
        pool = [vocabulary[i] for i in order[: settings.screened].tolist()]
        phrases = [with_word(words, slot, w) for w in pool]
        predictions = one_step_predictions(components, [fill(template, p) for p in phrases])
        own = one_step_predictions(components, [fill(template, concept.name)])[0]
        distance = ((predictions - own) ** 2).sum(1)
        score = 1 - distance / distance.median().clamp_min(1e-12)
        ranked = [
            i for i in torch.argsort(score, descending=True).tolist() if score[i] > 0 and normalise(phrases[i]) not in vetoed
        ][: settings.confirmed]
        chosen = [phrases[i] for i in ranked]
        screened = set(pool[i] for i in ranked)
        others = [w for w in vocabulary if w not in screened]
        controls = [with_word(words, slot, others[i]) for i in rng.choice(len(others), min(settings.controls, len(others)), replace=False)]
        hits = judged(chosen + controls)
        control_hits = sum(hits[len(chosen) :])
        base_rate = (control_hits + 1) / (len(controls) * settings.samples + 2)
        discovery.base_rates.append(round(base_rate, 4))
        found = []
        for index, phrase, count in zip(ranked, chosen, hits):
            p_value = binomial_tail(count, settings.samples, base_rate)
            alias = is_alias(count, settings.samples, base_rate, settings)
            discovery.checked.append({"phrase": phrase, "slot": slot, "hits": count, "p_value": float(f"{p_value:.3g}"), "alias": alias})
            if alias:
                found.append(Alias(phrase, slot, pool[index], round(float(score[index]), 4), count, settings.samples,
                                   round(base_rate, 4), float(f"{p_value:.3g}")))
        discovery.aliases += found[: settings.max_per_word]
    if progress:
        progress(f"discover {concept.name}", len(words), len(words))
    discovery.seconds = time.perf_counter() - started
    return discovery


def alias_phrases(concept: ConceptSpec, discovery: Discovery, limit: int) -> list[str]:
    """The phrases a concept's edit erases beyond its own variants: each alias, and for a name of
    several words, the aliases of different slots combined ("azure asterisk"), at most ``limit``."""
    words = normalise(concept.name).split()
    options = [[w] + [a.word for a in discovery.aliases if a.slot == slot] for slot, w in enumerate(words)]
    combined = [" ".join(choice) for choice in itertools.product(*options)]
    own = {normalise(v) for v in concept.variants}
    phrases = [p for p in dict.fromkeys([*discovery.phrases, *combined]) if p not in own and p not in vetoes(concept)]
    return phrases[:limit]


def vetoes(concept: ConceptSpec) -> set[str]:
    """The operator's vetoes (``exclude_aliases``), normalised: a whole phrase, or a word in any slot."""
    return {normalise(p) for p in concept.exclude_aliases}
