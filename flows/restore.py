"""restore: remove concepts from a registered model (a new version fused without them; nothing retrains)."""

from __future__ import annotations

from prefect import flow

from erasure.spec import ErasureRequest, normalise
from flows.erase import run_erasure
from flows.takedown import ConceptStateError
from tasks.registry import resolve, version_request


@flow(name="restore")
def restore_flow(model: str, concepts: list[str], workers: int = 1) -> dict:
    """``model``: NAME, NAME@ALIAS or NAME/VERSION of the parent; ``concepts``: names to restore."""
    parent = resolve(model)
    request = ErasureRequest.model_validate_json(version_request(parent))
    wanted = {normalise(c) for c in concepts}
    present = {normalise(c.name) for c in request.concepts}
    missing = sorted(wanted - present)
    if missing:
        raise ConceptStateError(
            f"not erased in {parent.name} version {parent.version}: {', '.join(missing)} "
            f"(erased there: {', '.join(c.name for c in request.concepts)})"
        )
    kept = [c for c in request.concepts if normalise(c.name) not in wanted]
    if not kept:
        raise ConceptStateError("restoring every concept gives back the base model; use the base model instead")
    updated = ErasureRequest.model_validate(
        request.model_dump(mode="json") | {"concepts": [c.model_dump(mode="json") for c in kept]}
    )
    return run_erasure(updated, parent.name, workers, "restore", parent_version=parent.version)
