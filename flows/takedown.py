"""takedown: add concepts to a registered model (a new version; only the new concepts' work runs).

Concurrent takedowns and restores of one model are safe: the new concepts train in
parallel, then each flow takes the model's lock and decides its parent there
(``under_lock``). Given ``NAME@ALIAS`` (or ``NAME``, meaning ``NAME@candidate``), the
parent is the version the alias points at then: a takedown that finished meanwhile is
built upon (its concepts plus ours), so the last candidate holds every concept. Given
``NAME/VERSION``, the parent is that version, and ``candidate`` moves to the result
only if it still points at that parent; otherwise the version is registered without
moving it, and the result's ``note`` says so.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, get_run_logger

from erasure.errors import ErasureError
from erasure.spec import ConceptSpec, ErasureRequest, normalise, parse_concepts
from flows.erase import Inheritance, Lineage, run_erasure
from tasks.registry import (
    CANDIDATE,
    RegisteredVersion,
    alias_version,
    is_explicit,
    resolve,
    verified_request,
    version_lineage,
)


class ConceptStateError(ErasureError, ValueError):
    """A takedown of a concept already erased, or a restore of one that is not."""

    retry_helps = False


def parent_reference(model: str) -> str:
    """``NAME`` alone means ``NAME@candidate`` (the latest version for a model without the alias)."""
    if "@" in model or is_explicit(model) or alias_version(model, CANDIDATE) is None:
        return model
    return f"{model}@{CANDIDATE}"


def under_lock(
    reference: str, parent: RegisteredVersion, request: ErasureRequest,
    build: Callable[[RegisteredVersion, ErasureRequest], ErasureRequest],
    keep: Callable[[RegisteredVersion, ErasureRequest], Inheritance | None] | None = None,
) -> Lineage:
    """The lineage of a change prepared on ``parent`` (giving ``request``), decided under the model's
    lock: rebased on what ``reference`` points at now (``build`` applies the change to that
    version's request, ``keep`` says what of that version it keeps), or kept on an explicit version;
    ``candidate`` moves to the result only if it points at the parent used (or does not exist)."""
    current = parent if is_explicit(reference) else resolve(reference)
    note, kept = "", None
    if current.version != parent.version:
        current_request = verified_request(current)
        request = build(current, current_request)
        kept = keep(current, current_request) if keep is not None else None
        note = f"rebased on version {current.version}: {reference} moved from version {parent.version} while this ran"
    candidate = alias_version(parent.name, CANDIDATE)
    if candidate not in (None, current.version):
        note = (note + "; " if note else "") + (
            f"{CANDIDATE} stays at version {candidate}: it no longer points at the parent, version "
            f"{current.version} (another flow moved it); promote this version explicitly if it should replace it"
        )
        return Lineage(request, current.version, move_candidate=False, note=note, inheritance=kept)
    return Lineage(request, current.version, move_candidate=True, note=note, inheritance=kept)


def add_concepts(parent: RegisteredVersion, request: ErasureRequest, new: list[ConceptSpec]) -> ErasureRequest:
    """The parent's request with ``new`` erased too. A concept the parent preserved moves from
    ``preserve.concepts`` to the erased ones (a takedown of a formerly protected concept)."""
    erased = {normalise(v): c.name for c in request.concepts for v in c.variants}
    for concept in new:
        for variant in concept.variants:
            if normalise(variant) in erased:
                raise ConceptStateError(
                    f"{variant!r} is already erased in {parent.name} version {parent.version} "
                    f"(as {erased[normalise(variant)]!r}); nothing to take down"
                )
    taken = {normalise(v) for c in new for v in c.variants}
    data = request.model_dump(mode="json")
    data["concepts"] = [c.model_dump(mode="json") for c in (*request.concepts, *new)]
    data["preserve"]["concepts"] = [p for p in request.preserve.concepts if normalise(p) not in taken]
    return ErasureRequest.model_validate(data)


def no_longer_preserved(request: ErasureRequest, new: list[ConceptSpec]) -> list[str]:
    """The parent's preserved concepts that ``new`` takes down."""
    taken = {normalise(v) for c in new for v in c.variants}
    return [p for p in request.preserve.concepts if normalise(p) in taken]


def inheritance(parent: RegisteredVersion, request: ErasureRequest, removed: tuple[str, ...] = ()) -> Inheritance | None:
    """What a change of ``parent`` keeps: its concepts' artifacts and its prior, less the retained
    concepts ``removed``; None for a version registered before it logged them (everything reruns)."""
    found = version_lineage(parent, request)
    if found is None:
        return None
    keys, prior = found
    return Inheritance.of(keys, prior, tuple(request.preserve.concepts), removed)


def rerun_notice(model: str, concepts: list[dict]) -> str | None:
    """What to tell the operator before a takedown of a concept the parent preserves starts: it
    leaves the prior by subtraction and the other concepts' artifacts are kept, or, for a parent
    registered before versions logged their artifacts, every concept reruns. None otherwise."""
    parent = resolve(parent_reference(model))
    request = verified_request(parent)
    moved = no_longer_preserved(request, parse_concepts(concepts))
    if not moved:
        return None
    said = f"{', '.join(moved)} {'is' if len(moved) == 1 else 'are'} preserved in {parent.name} version {parent.version}: "
    if inheritance(parent, request, tuple(moved)) is not None:
        return said + (
            f"{'it leaves' if len(moved) == 1 else 'they leave'} the prior by subtraction, and the other concepts keep "
            "their artifacts (made against a prior that also kept it: they protect more, never less)"
        )
    return said + (
        f"taking {'it' if len(moved) == 1 else 'them'} down changes the prior that every concept was made against, and "
        f"version {parent.version} predates logged artifact keys, so all {len(request.concepts) + len(concepts)} concepts "
        "rerun (as long as erasing them from scratch), not only the new one"
    )


@flow(name="takedown")
def takedown_flow(model: str, concepts: list[dict], workers: int = 1, evaluate: bool = True) -> dict:
    """``model``: NAME, NAME@ALIAS or NAME/VERSION of the parent (see the module's docstring);
    ``concepts``: concept specs to add; ``evaluate`` False skips the new version's evaluation."""
    reference = parent_reference(model)
    parent = resolve(reference)
    new = parse_concepts(concepts)
    parent_request = verified_request(parent)
    request = add_concepts(parent, parent_request, new)
    moved = no_longer_preserved(parent_request, new)
    kept = inheritance(parent, parent_request, tuple(moved))
    if moved:  # a deployment run's log says it too (the command line says it before the flow starts)
        get_run_logger().warning(
            "%s no longer preserved: %s", ", ".join(moved),
            "it leaves the parent's prior by subtraction; the other concepts keep their artifacts" if kept is not None
            else "the parent predates logged artifact keys, so every concept reruns against the changed prior",
        )
    result = run_erasure(
        request, parent.name, workers, "takedown", parent_version=parent.version,
        parent_base=parent.tags.get("base_fingerprint"),
        rebase=lambda: under_lock(
            reference, parent, request, lambda current, base: add_concepts(current, base, new),
            lambda current, base: inheritance(current, base, tuple(no_longer_preserved(base, new))),
        ),
        evaluate=evaluate, inheritance=kept,
    )
    if moved:
        said = f"no longer preserved, now erased: {', '.join(moved)}"
        result["note"] = f"{said}; {result['note']}" if result.get("note") else said
    return result
