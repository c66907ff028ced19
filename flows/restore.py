"""restore: remove concepts from a registered model (a new version fused without them; nothing retrains).

Concurrent with other takedowns and restores of the model as ``flows.takedown`` says:
the parent is decided under the model's lock.
"""

from __future__ import annotations

from prefect import flow

from erasure.spec import ErasureRequest, normalise
from flows.erase import run_erasure
from flows.takedown import ConceptStateError, inheritance, parent_reference, under_lock
from tasks.registry import RegisteredVersion, resolve, verified_request


def remove_concepts(parent: RegisteredVersion, request: ErasureRequest, concepts: list[str]) -> ErasureRequest:
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
    return ErasureRequest.model_validate(
        request.model_dump(mode="json") | {"concepts": [c.model_dump(mode="json") for c in kept]}
    )


@flow(name="restore")
def restore_flow(model: str, concepts: list[str], workers: int = 1, evaluate: bool = True) -> dict:
    """``model``: NAME, NAME@ALIAS or NAME/VERSION of the parent (see ``flows.takedown``);
    ``concepts``: names to restore; ``evaluate`` False skips the new version's evaluation."""
    reference = parent_reference(model)
    parent = resolve(reference)
    parent_request = verified_request(parent)
    request = remove_concepts(parent, parent_request, concepts)
    return run_erasure(
        request, parent.name, workers, "restore", parent_version=parent.version,
        parent_base=parent.tags.get("base_fingerprint"),
        rebase=lambda: under_lock(
            reference, parent, request, lambda current, base: remove_concepts(current, base, concepts), inheritance,
        ),
        evaluate=evaluate, inheritance=inheritance(parent, parent_request),
    )
