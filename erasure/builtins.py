"""The models this project builds itself, and the judge of each: one registry.

A request names one as ``builtin:<name>``. Each entry says how to load the model
and, when the model's world has one, how to judge its images (the probes and
the judge the evaluation uses). Loaders and judges import lazily, so this module
is cheap to import (the request validator reads the names from it) and
``erasure.models`` does not import the toy world at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from erasure.models import Components
    from erasure.spec import ErasureRequest

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    load: Callable[[], Components]
    # request -> (probes, judge); None when the model's world has no judge
    judge: Callable[[ErasureRequest], tuple[list, object]] | None = None
    # (request, audit policy, seed) -> (held-out probes, judge) of a compliance audit
    audit: Callable[[ErasureRequest, object, int], tuple[list, object]] | None = None


def _load_tiny() -> Components:
    from erasure.models import build_tiny_components

    return build_tiny_components()


def _toyworld_loader(world: str) -> Callable[[], Components]:
    def load() -> Components:
        from erasure.toyworld.model import load_toyworld_components

        return load_toyworld_components(world)

    return load


def _toyworld_judge(world: str) -> Callable[[ErasureRequest], tuple[list, object]]:
    def judge(request: ErasureRequest) -> tuple[list, object]:
        from erasure.toyworld.judge import ToyJudge, erasure_probes
        from erasure.toyworld.model import drawable_unseen_words, load_toyworld_classifier

        concepts = [c.name for c in request.concepts]
        probes = erasure_probes(
            concepts, list(request.preserve.concepts), seed=request.seed, unseen=drawable_unseen_words(world)
        )
        return probes, ToyJudge(load_toyworld_classifier())

    return judge


def _toyworld_audit(world: str) -> Callable[[ErasureRequest, object, int], tuple[list, object]]:
    def audit(request: ErasureRequest, policy, seed: int) -> tuple[list, object]:
        from erasure.toyworld.judge import ToyJudge, audit_probes
        from erasure.toyworld.model import drawable_unseen_words, load_toyworld_classifier

        probes = audit_probes(
            [(c.name, c.synonyms) for c in request.concepts], list(request.preserve.concepts),
            policy.probes_per_concept, policy.retained_limit, seed, unseen=drawable_unseen_words(world),
        )
        return probes, ToyJudge(load_toyworld_classifier())

    return audit


BUILTINS: dict[str, BuiltinModel] = {
    entry.name: entry
    for entry in (
        BuiltinModel("tiny", "a randomly initialised SD-shaped pipeline for tests (draws noise)", _load_tiny),
        BuiltinModel(
            "toyworld", "the toy world, a frozen pretrained MiniLM encoder (the embedded default)",
            _toyworld_loader("minilm"), _toyworld_judge("minilm"), _toyworld_audit("minilm"),
        ),
        BuiltinModel(
            "toyworld-clip", "the toy world, a small causal CLIP encoder trained with the UNet",
            _toyworld_loader("clip"), _toyworld_judge("clip"), _toyworld_audit("clip"),
        ),
    )
}
DEFAULT_MODEL = BUILTIN_PREFIX + "toyworld"


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + name for name in BUILTINS]


def find_builtin(model: str) -> BuiltinModel | None:
    """The registry entry of ``builtin:<name>``; None for anything else (a folder, a hub id).
    An unknown ``builtin:`` name is an error that lists the valid ones."""
    if not model.startswith(BUILTIN_PREFIX):
        return None
    entry = BUILTINS.get(model[len(BUILTIN_PREFIX) :])
    if entry is None:
        raise ValueError(f"unknown built-in {model!r}; valid: {', '.join(builtin_names())}")
    return entry
