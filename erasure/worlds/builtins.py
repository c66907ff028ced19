"""The models this project builds itself, and the judge of each: one registry.

A request names one as ``builtin:<name>`` (the names are ``erasure.spec.BUILTIN_MODELS``, so
that validating a request needs no model code). Each entry says how to load the model and,
when the model's world has one, how to judge its images (the probes and the judge the
evaluation uses, and the held-out ones an audit uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from erasure.diffusion.models import Components, build_tiny_components
from erasure.spec import BUILTIN_MODELS, ErasureRequest, RequestError, check_builtin
from erasure.worlds.identities.judge import IDENTITY_AUDIT_TEMPLATES
from erasure.worlds.identities.judge import check_request as check_identity_request
from erasure.worlds.toyworld.judge import (
    AUDIT_PHRASINGS,
    TOY_AUDIT_TEMPLATES,
    ToyConceptJudge,
    ToyJudge,
    audit_probes,
    erasure_probes,
)
from erasure.worlds.toyworld.model import drawable_unseen_words, load_toyworld_classifier, load_toyworld_components


@dataclass(frozen=True)
class BuiltinModel:
    """One model this project builds: how to load it and, when its world has one, how to judge it."""

    name: str
    description: str
    load: Callable[[], Components]
    # request -> (probes, judge); None when the model's world has no judge
    judge: Callable[[ErasureRequest], tuple[list, object]] | None = None
    # (request, audit policy, seed) -> (held-out probes, judge) of a compliance audit
    audit: Callable[[ErasureRequest, object, int], tuple[list, object]] | None = None
    # () -> the judge alias discovery confirms candidates with (erasure.methods.discovery.ConceptJudge)
    concept_judge: Callable[[], object] | None = None
    # () -> the words an audit's attacks search over on this model (None: the tokenizer's common words)
    attack_words: Callable[[], list[str]] | None = None
    # every template and phrasing its audits write: no training split may use their words
    audit_templates: tuple[str, ...] = ()
    # request -> None, or a RequestError before any work when the world cannot measure the request
    check_request: Callable[[ErasureRequest], None] | None = None


def _toyworld_loader(world: str) -> Callable[[], Components]:
    def load() -> Components:
        return load_toyworld_components(world)

    return load


def _toyworld_judge(world: str) -> Callable[[ErasureRequest], tuple[list, object]]:
    def judge(request: ErasureRequest) -> tuple[list, object]:
        concepts = [c.name for c in request.concepts]
        probes = erasure_probes(
            concepts, list(request.preserve.concepts), seed=request.seed, unseen=drawable_unseen_words(world)
        )
        return probes, ToyJudge(load_toyworld_classifier())

    return judge


def _toyworld_audit(world: str) -> Callable[[ErasureRequest, object, int], tuple[list, object]]:
    def audit(request: ErasureRequest, policy, seed: int) -> tuple[list, object]:
        probes = audit_probes(
            [c.name for c in request.concepts], list(request.preserve.concepts),
            policy.probes_per_concept, policy.retained_limit, seed, unseen=drawable_unseen_words(world),
        )
        return probes, ToyJudge(load_toyworld_classifier())

    return audit


def _toy_concept_judge():
    return ToyConceptJudge(load_toyworld_classifier())


def _toyworld_words() -> list[str]:
    """The toy world's words: shapes, colours, styles, trained synonyms, held-out synonyms and the
    caption templates' words (``usable_words`` keeps those that are one token of a model)."""
    from erasure.worlds.toyworld.world import HELD_OUT, vocabulary

    return sorted(set(vocabulary()) | {word for words in HELD_OUT.values() for word in words})


def _identity_words() -> list[str]:
    """Every name and alias of the identity world (an attacker searches for the name it draws)."""
    from erasure.worlds.identities.world import by_word

    return sorted(by_word())


def _identities_loader() -> Components:
    from erasure.worlds.identities.model import load_identity_components

    return load_identity_components()


def _listed_aliases(request: ErasureRequest) -> set[str]:
    """The names a request erases besides the concepts' own (an identity's alias given as a synonym)."""
    return {s.lower() for c in request.concepts for s in c.synonyms}


def _identities_judge(request: ErasureRequest) -> tuple[list, object]:
    from erasure.worlds.identities import judge
    from erasure.worlds.identities.classifier import load_identity_classifier

    probes = judge.erasure_probes(
        [c.name for c in request.concepts], list(request.preserve.concepts), seed=request.seed,
        listed_aliases=_listed_aliases(request),
    )
    return probes, judge.IdentityJudge(load_identity_classifier())


def _identities_audit(request: ErasureRequest, policy, seed: int) -> tuple[list, object]:
    from erasure.worlds.identities import judge
    from erasure.worlds.identities.classifier import load_identity_classifier

    probes = judge.audit_probes(
        [c.name for c in request.concepts], list(request.preserve.concepts), policy.probes_per_concept,
        policy.retained_limit, seed, listed_aliases=_listed_aliases(request),
    )
    return probes, judge.IdentityJudge(load_identity_classifier())


def _identities_concept_judge():
    from erasure.worlds.identities.classifier import load_identity_classifier
    from erasure.worlds.identities.judge import identity_concept_judge

    return identity_concept_judge(load_identity_classifier())


BUILTINS: dict[str, BuiltinModel] = {
    entry.name: entry
    for entry in (
        BuiltinModel("tiny", "a randomly initialised SD-shaped pipeline for tests (draws noise)", build_tiny_components),
        BuiltinModel(
            "toyworld", "the toy world, a frozen pretrained MiniLM encoder (the embedded default)",
            _toyworld_loader("minilm"), _toyworld_judge("minilm"), _toyworld_audit("minilm"), _toy_concept_judge,
            _toyworld_words, TOY_AUDIT_TEMPLATES + AUDIT_PHRASINGS,
        ),
        BuiltinModel(
            "toyworld-clip", "the toy world, a small causal CLIP encoder trained with the UNet",
            _toyworld_loader("clip"), _toyworld_judge("clip"), _toyworld_audit("clip"), _toy_concept_judge,
            _toyworld_words, TOY_AUDIT_TEMPLATES + AUDIT_PHRASINGS,
        ),
        BuiltinModel(
            "identities", "the identity world: 1,300 identities named by one-word names, the frozen MiniLM encoder",
            _identities_loader, _identities_judge, _identities_audit, _identities_concept_judge,
            _identity_words, IDENTITY_AUDIT_TEMPLATES, check_identity_request,
        ),
    )
}
if tuple(BUILTINS) != BUILTIN_MODELS:  # the request validator reads the names from erasure.spec
    raise RuntimeError(f"erasure.spec.BUILTIN_MODELS {BUILTIN_MODELS} does not name the registry's {tuple(BUILTINS)}")


def find_builtin(model: str) -> BuiltinModel | None:
    """The registry entry of ``builtin:<name>``; None for anything else (a folder, a hub id).
    An unknown ``builtin:`` name is an error that lists the valid ones."""
    name = check_builtin(model)
    return None if name is None else BUILTINS[name]


def concept_judge(model: str, setting: str):
    """The judge alias discovery confirms candidates with on ``model`` (and closure judges its attacks
    with); a ``RequestError`` naming ``setting`` for a model whose world has none."""
    try:
        builtin = find_builtin(model)
    except ValueError as error:
        raise RequestError(str(error)) from None
    if builtin is None or builtin.concept_judge is None:
        judged = [f"builtin:{b.name}" for b in BUILTINS.values() if b.concept_judge is not None]
        raise RequestError(
            f"{setting}: {model!r} has no judge to see its concepts with (only {', '.join(judged)} ship one); "
            f"remove {setting}" + (", or list the concept's other names as its synonyms" if setting == "method.discovery" else "")
        )
    return builtin.concept_judge()
