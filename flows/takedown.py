"""takedown: add concepts to a registered model (a new version; only the new concepts' work runs)."""

from __future__ import annotations

from prefect import flow

from erasure.spec import ConceptSpec, ErasureRequest, normalise
from flows.erase import run_erasure
from tasks.registry import resolve, version_request


class ConceptStateError(ValueError):
    """A takedown of a concept already erased, or a restore of one that is not."""


@flow(name="takedown")
def takedown_flow(model: str, concepts: list[dict], workers: int = 1) -> dict:
    """``model``: NAME, NAME@ALIAS or NAME/VERSION of the parent; ``concepts``: concept specs to add."""
    parent = resolve(model)
    request = ErasureRequest.model_validate_json(version_request(parent))
    new = [ConceptSpec.model_validate(c) for c in concepts]
    erased = {normalise(v): c.name for c in request.concepts for v in c.variants}
    for concept in new:
        for variant in concept.variants:
            if normalise(variant) in erased:
                raise ConceptStateError(
                    f"{variant!r} is already erased in {parent.name} version {parent.version} "
                    f"(as {erased[normalise(variant)]!r}); nothing to take down"
                )
    updated = ErasureRequest.model_validate(
        request.model_dump(mode="json") | {"concepts": [c.model_dump(mode="json") for c in (*request.concepts, *new)]}
    )
    return run_erasure(updated, parent.name, workers, "takedown", parent_version=parent.version)
