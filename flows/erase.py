"""erase: request -> per-concept stages fanned out over Ray workers -> fusion -> evaluation -> registered version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow, get_run_logger

from erasure.spec import ErasureRequest, parse_request
from tasks.compute import worker_pool
from tasks.keys import concept_key, concept_set_hash, model_key, prior_key, request_hash
from tasks.locks import model_lock
from tasks.registry import check_model_name
from tasks.stages import (
    stage_captions,
    stage_concept,
    stage_evaluate,
    stage_fuse,
    stage_model_reference,
    stage_prior,
    stage_register,
)


class BaseModelChanged(ValueError):
    """A takedown or restore whose parent was erased from another base model than the one its
    request names today: fusing its concepts onto this model would be meaningless."""


@dataclass
class Lineage:
    """What a new version is built from, decided under the model's lock."""

    request: ErasureRequest
    parent_version: str | None
    move_candidate: bool = True  # False: register without moving the candidate alias (``note`` says why)
    note: str = ""


def run_erasure(
    request: ErasureRequest, name: str, workers: int, flow_label: str, parent_version: str | None,
    rebase: Callable[[], Lineage] | None = None, parent_base: str | None = None, evaluate: bool = True,
) -> dict:
    """The shared DAG of erase, takedown and restore (they differ only in the concept set and lineage).

    The per-concept stages run first, outside the model's lock (``tasks.locks.model_lock``);
    fusion, evaluation, registration and the ``candidate`` alias run under it, so concurrent
    flows on one model take turns there. ``rebase``, called under the lock, decides the
    lineage on the model's state at that moment (a parent that moved meanwhile gives a new
    concept set); concepts are content addressed, so those another flow published are reused.
    """
    logger = get_run_logger()
    base = worker_pool(request.model, workers).fingerprint
    if parent_base and parent_base != base:
        raise BaseModelChanged(
            f"{name} version {parent_version} was erased from {request.model} with fingerprint {parent_base[:12]}..., "
            f"but {request.model} now loads {base[:12]}... (a different model: e.g. builtin:toyworld became the "
            "MiniLM world; the CLIP world is builtin:toyworld-clip); erase the concepts anew from the intended model"
        )
    first = _concept_stages(request, workers)
    with model_lock(name) as lock:
        lineage = rebase() if rebase is not None else Lineage(request, parent_version)
        stages = first if lineage.request == request else _concept_stages(lineage.request, workers)
        version = _fuse_and_register(lineage, name, workers, flow_label, stages, lock, evaluate)
    if lineage.note:
        logger.info(lineage.note)
    ran = [k for k in stages["keys"] if k in first["ran"] or k in stages["ran"]]
    return version | {"ran": ran, "reused": [k for k in stages["keys"] if k not in ran]}


def _concept_stages(request: ErasureRequest, workers: int) -> dict:
    """The prior and the per-concept stages: the heavy, parallel part (skipped where published)."""
    logger = get_run_logger()
    pool = worker_pool(request.model, workers)
    base = pool.fingerprint

    p_key = prior_key(base, request)
    stage_captions(request)
    stage_prior(request, p_key, workers)
    keys = [concept_key(base, concept, request) for concept in request.concepts]
    # one task per concept, all submitted at once: each runs on whichever worker is idle
    futures = [stage_concept.submit(request, i, key, p_key, workers) for i, key in enumerate(keys)]
    concepts = [future.result() for future in futures]
    ran = [c["key"] for c in concepts if not c["reused"]]
    logger.info("per-concept stages: %d ran, %d reused", len(ran), len(keys) - len(ran))
    return {"base": base, "prior_key": p_key, "keys": keys, "ran": ran}


def _fuse_and_register(
    lineage: Lineage, name: str, workers: int, flow_label: str, stages: dict, lock, evaluate: bool = True
) -> dict:
    """Fusion, evaluation (unless ``evaluate`` is False: a takedown in a hurry; the audit judges the
    version before any promotion anyway), registration (under the model's lock)."""
    request, base, p_key, keys = lineage.request, stages["base"], stages["prior_key"], stages["keys"]
    m_key = model_key(base, keys, request)
    stage_fuse(request, keys, p_key, m_key, workers)
    evaluation = stage_evaluate(request, m_key, workers) if evaluate else None
    metrics = {k: v for k, v in (evaluation or {}).get("metrics", {}).items() if isinstance(v, float)}

    tags = {
        "flow": flow_label,
        "base_model": request.model,
        "base_fingerprint": base,
        "concepts": concept_list_tag(request),
        "concept_set_hash": concept_set_hash(request),
        "request_hash": request_hash(request),
        "parent_version": lineage.parent_version or "",
        "model_key": m_key,
    }
    params = {
        "concepts": len(request.concepts), "lam1": request.preserve.lam1, "lam2": request.preserve.lam2,
        "ridge": request.preserve.ridge, "lora_steps": request.method.lora_steps, "lora_lr": request.method.lora_lr,
        "lora_rank": request.method.lora_rank, "images_per_concept": request.method.images_per_concept,
        "workers": workers, "seed": request.seed, "evaluated": evaluate,
    }
    reference = stage_model_reference(m_key)  # the version names its weights in the store; no copy in MLflow
    lock.ensure()  # the alias moves only while this flow holds the model's lock
    version = stage_register(
        name, reference, request.model_dump_json(), tags, params, metrics,
        (evaluation or {}).get("report_html"), keys, lineage.move_candidate,
    )
    return version | {
        "metrics": metrics, "model_key": m_key, "parent_version": lineage.parent_version or "",
        "note": "; ".join(n for n in (lineage.note, version.pop("registry_note", "")) if n),
    }


TAG_CHARS = 5000  # MLflow refuses tag values over 100,000 characters; a tag is for reading, request.json has all


def concept_list_tag(request: ErasureRequest) -> str:
    names = ", ".join(c.name for c in request.concepts)
    if len(names) <= TAG_CHARS:
        return names
    shown = names[:TAG_CHARS].rsplit(", ", 1)[0]
    return f"{shown}, ... ({len(request.concepts)} concepts in all; see request.json)"


@flow(name="erase")
def erase_flow(request: dict, name: str, workers: int = 1) -> dict:
    """Erase a request's concepts and register the result as a new version of ``name``.

    ``request`` is validated exactly as a request file is (bounds, paths, caption hash), so a
    deployment's parameters are refused before any worker starts, naming the field."""
    spec = parse_request(request)
    check_model_name(name)
    return run_erasure(spec, name, workers, "erase", parent_version=None)
