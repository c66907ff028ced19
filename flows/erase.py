"""erase: request -> per-concept stages fanned out over Ray workers -> fusion -> evaluation -> registered version."""

from __future__ import annotations

import tempfile

from prefect import flow, get_run_logger

from erasure.spec import ErasureRequest
from tasks.compute import worker_pool
from tasks.keys import concept_key, concept_set_hash, model_key, prior_key, request_hash
from tasks.stages import stage_concept, stage_evaluate, stage_fetch, stage_fuse, stage_prior, stage_register


def run_erasure(request: ErasureRequest, name: str, workers: int, flow_label: str, parent_version: str | None) -> dict:
    """The shared DAG of erase, takedown and restore (they differ only in the concept set and lineage)."""
    logger = get_run_logger()
    pool = worker_pool(request.model, workers)
    request_json = request.model_dump_json()
    base = pool.fingerprint

    p_key = prior_key(base, request)
    stage_prior(request.model, workers, request_json, p_key)
    keys = [concept_key(base, concept, request) for concept in request.concepts]
    futures = [
        stage_concept.submit(request.model, workers, request_json, i, key, p_key) for i, key in enumerate(keys)
    ]
    concepts = [future.result() for future in futures]
    ran = [c["key"] for c in concepts if not c["reused"]]
    logger.info("per-concept stages: %d ran, %d reused", len(ran), len(keys) - len(ran))

    m_key = model_key(base, keys, request)
    stage_fuse(request.model, workers, request_json, keys, p_key, m_key)
    evaluation = stage_evaluate(request.model, workers, request_json, m_key)
    metrics = {k: v for k, v in (evaluation or {}).get("metrics", {}).items() if isinstance(v, float)}

    tags = {
        "flow": flow_label,
        "base_model": request.model,
        "base_fingerprint": base,
        "concepts": ", ".join(c.name for c in request.concepts),
        "concept_set_hash": concept_set_hash(request),
        "request_hash": request_hash(request),
        "parent_version": parent_version or "",
        "model_key": m_key,
    }
    params = {
        "concepts": len(request.concepts), "lam1": request.preserve.lam1, "lam2": request.preserve.lam2,
        "ridge": request.preserve.ridge, "lora_steps": request.method.lora_steps, "lora_lr": request.method.lora_lr,
        "lora_rank": request.method.lora_rank, "images_per_concept": request.method.images_per_concept,
        "workers": workers, "seed": request.seed,
    }
    with tempfile.TemporaryDirectory() as folder:
        model_dir = stage_fetch(m_key, folder)
        version = stage_register(
            name, model_dir, request_json, tags, params, metrics,
            (evaluation or {}).get("report_html"), keys,
        )
    return version | {"ran": ran, "reused": [k for k in keys if k not in ran], "metrics": metrics, "model_key": m_key}


@flow(name="erase")
def erase_flow(request: dict, name: str, workers: int = 1) -> dict:
    """Erase a request's concepts and register the result as a new version of ``name``."""
    spec = ErasureRequest.model_validate(request)
    return run_erasure(spec, name, workers, "erase", parent_version=None)
