"""erase: request -> per-concept stages fanned out over Ray workers -> fusion -> evaluation -> registered version."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow, get_run_logger

from erasure.artifacts import summary_aliases
from erasure.erase_pipeline import check_supported
from erasure.errors import ErasureError
from erasure.loading import pipeline_family
from erasure.spec import ErasureRequest, parse_request
from tasks.compute import worker_pool
from tasks.jobs import ConceptJob, EvaluateJob, FuseJob, PriorJob
from tasks.keys import (
    concept_key,
    concept_set_hash,
    concept_slug,
    key_slug,
    model_key,
    prior_key,
    request_hash,
    subtracted_prior_key,
)
from tasks.registry import check_model_name
from tasks.stages import evaluation_stage, run_stage, stage_captions, stage_model_reference, stage_register
from tasks.store import ArtifactError, model_lock, store_from_url, store_settings


class BaseModelChanged(ErasureError, ValueError):
    """A takedown or restore whose parent was erased from another base model than the one its
    request names today: fusing its concepts onto this model would be meaningless."""

    retry_helps = False


@dataclass(frozen=True)
class Inheritance:
    """What a takedown or restore keeps from its parent version: each carried concept's artifact
    (by the concept's slug) and the parent's prior, less the retained concepts the takedown erases
    (``removed``, drawn for ``made_from``, the parent's retained concepts). A takedown of a concept
    the parent preserved then runs that concept alone: the others were made against a prior that
    also kept it, which protects more, never less."""

    concept_keys: dict[str, str]
    prior_key: str
    made_from: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @classmethod
    def of(cls, keys: list[str], prior: str, made_from: tuple[str, ...] = (), removed: tuple[str, ...] = ()) -> Inheritance:
        return cls({key_slug(key): key for key in keys}, prior, made_from, removed)


@dataclass
class Lineage:
    """What a new version is built from, decided under the model's lock."""

    request: ErasureRequest
    parent_version: str | None
    move_candidate: bool = True  # False: register without moving the candidate alias (``note`` says why)
    note: str = ""
    inheritance: Inheritance | None = None  # what it keeps of the version it was rebased on


def run_erasure(
    request: ErasureRequest, name: str, workers: int, flow_label: str, parent_version: str | None,
    rebase: Callable[[], Lineage] | None = None, parent_base: str | None = None, evaluate: bool = True,
    inheritance: Inheritance | None = None,
) -> dict:
    """The shared DAG of erase, takedown and restore (they differ only in the concept set and lineage).

    The per-concept stages run first, outside the model's lock (``tasks.store.model_lock``);
    fusion, evaluation, registration and the ``candidate`` alias run under it, so concurrent
    flows on one model take turns there. ``rebase``, called under the lock, decides the
    lineage on the model's state at that moment (a parent that moved meanwhile gives a new
    concept set); concepts are content addressed, so those another flow published are reused.
    """
    logger = get_run_logger()
    family = pipeline_family(request.model)
    if family is not None:  # what the family path cannot do is refused before any worker starts
        check_supported(request, family)
    timer = time.perf_counter()
    pool = worker_pool(request.model, workers)
    base = pool.fingerprint
    if pool.pipeline_class is not None:  # and again as the workers see the model (a folder only they can read)
        check_supported(request, pool.pipeline_class)
    seconds = {"workers": time.perf_counter() - timer}  # Ray and the actors' model loading, when not warm
    if parent_base and parent_base != base:
        raise BaseModelChanged(
            f"{name} version {parent_version} was erased from {request.model} with fingerprint {parent_base[:12]}..., "
            f"but {request.model} now loads {base[:12]}... (a different model: e.g. builtin:toyworld became the "
            "MiniLM world; the CLIP world is builtin:toyworld-clip); erase the concepts anew from the intended model"
        )
    first = _concept_stages(request, workers, seconds, inheritance)
    timer = time.perf_counter()
    with model_lock(name) as lock:
        seconds["lock"] = time.perf_counter() - timer  # waiting for another flow on this model
        lineage = rebase() if rebase is not None else Lineage(request, parent_version)
        stages = first if lineage.request == request else _concept_stages(lineage.request, workers, seconds, lineage.inheritance)
        version = _fuse_and_register(lineage, name, workers, flow_label, stages, lock, evaluate, seconds)
    if lineage.note:
        logger.info(lineage.note)
    ran = [k for k in stages["keys"] if k in first["ran"] or k in stages["ran"]]
    logger.info("stage seconds: %s", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return version | {
        "ran": ran, "reused": [k for k in stages["keys"] if k not in ran],
        "aliases": first["aliases"] | stages["aliases"],  # of the concepts that ran here, by name
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "concept_workers": _per_worker(ran, first["worker_of"] | stages["worker_of"]),
    }


def _per_worker(ran: list[str], worker_of: dict[str, str]) -> dict[str, int]:
    """How many of the concepts that ran (in the version's lineage) each actor ran."""
    counts: dict[str, int] = {}
    for key in ran:
        counts[worker_of[key]] = counts.get(worker_of[key], 0) + 1
    return counts


def _concept_stages(
    request: ErasureRequest, workers: int, seconds: dict[str, float], inheritance: Inheritance | None = None
) -> dict:
    """The prior and the per-concept stages: the heavy, parallel part. A stage whose artifact is
    already published is not submitted at all (a restore, or a takedown on a large model, runs
    no task per concept it reuses); the worker checks again, so a race only costs a lookup. The
    prior's job runs whenever a concept will (it checks every concept's name first)."""
    logger = get_run_logger()
    pool = worker_pool(request.model, workers)
    base = pool.fingerprint
    store = store_from_url(*store_settings())

    timer = time.perf_counter()
    captions = stage_captions(request)
    prior_job = PriorJob(
        request.model, prior_key(base, request), request.preserve, request.fusion, captions, request.concepts,
        judged=tuple(request.judged_settings()),
    )
    request_prior = prior_job.key
    kept: list[str | None] = [None] * len(request.concepts)
    if inheritance is not None and _published(store, inheritance.prior_key):  # else: the request's own prior
        if inheritance.removed:
            prior_job = dataclasses.replace(
                prior_job, key=subtracted_prior_key(inheritance.prior_key, inheritance.removed),
                subtract_from=inheritance.prior_key, made_from=inheritance.made_from, removed=inheritance.removed,
            )
        else:
            prior_job = dataclasses.replace(prior_job, key=inheritance.prior_key)
    if inheritance is not None:
        # a carried concept keeps its parent's artifact while it is published (else it is made anew)
        kept = [inheritance.concept_keys.get(concept_slug(c)) for c in request.concepts]
    p_key = prior_job.key
    # a concept made here against another prior than the request's own names it in its key
    made = [concept_key(base, c, request, None if p_key == request_prior else p_key) for c in request.concepts]
    keys = [key if key is not None and _published(store, key) else mine for key, mine in zip(kept, made)]
    own = p_key == request_prior and keys == made
    missing = [i for i, key in enumerate(keys) if not _published(store, key)]
    if missing or not _published(store, p_key):  # the prior's job also checks the concepts' names first
        run_stage(prior_job, workers)
    seconds["prior"] = seconds.get("prior", 0.0) + time.perf_counter() - timer  # with the captions and the lookups

    timer = time.perf_counter()
    # one task per missing concept, all submitted at once: each runs on whichever worker is idle
    futures = [run_stage.submit(ConceptJob.of(request, i, keys[i], p_key), workers) for i in missing]
    concepts = [future.result() for future in futures]
    seconds["concepts"] = seconds.get("concepts", 0.0) + time.perf_counter() - timer
    ran = [c.key for c in concepts if not c.reused]
    worker_of = {c.key: c.worker or "unknown" for c in concepts if not c.reused}  # which actor ran each
    logger.info("per-concept stages: %d ran, %d reused", len(ran), len(keys) - len(ran))
    aliases = {c.summary["name"]: found for c in concepts if (found := summary_aliases(c.summary)) is not None}
    for name, found in aliases.items():
        logger.info("aliases of %s found in the base model and erased with it: %s", name, ", ".join(found) or "none")
    return {
        "base": base, "prior_key": p_key, "keys": keys, "ran": ran, "worker_of": worker_of, "aliases": aliases,
        # the prior is named in the model's key when it is not the request's own (keys kept from a parent)
        "own": own,
    }



def _published(store, key: str) -> bool:
    """Whether ``key`` is published; a lookup that fails (a store hiccup) counts as missing: the
    stage's task then runs, with its retries, and its worker looks again."""
    try:
        return store.exists(key)
    except ArtifactError as error:
        get_run_logger().warning("could not look up %s (%s); its stage will look again", key, error)
        return False


def _fuse_and_register(
    lineage: Lineage, name: str, workers: int, flow_label: str, stages: dict, lock, evaluate: bool,
    seconds: dict[str, float],
) -> dict:
    """Fusion, evaluation (unless ``evaluate`` is False: a takedown in a hurry; the audit judges the
    version before any promotion anyway), registration (under the model's lock)."""
    request, base, p_key, keys = lineage.request, stages["base"], stages["prior_key"], stages["keys"]
    m_key = model_key(base, keys, request, None if stages["own"] else p_key)
    timer = time.perf_counter()
    fused = run_stage(FuseJob(
        request.model, m_key, p_key, tuple(keys), request.preserve, request.fusion,
        request.seed, request.method.sampler_steps, request.method.guidance_scale,
    ), workers)
    seconds["fuse"] = time.perf_counter() - timer
    timer = time.perf_counter()
    evaluation = evaluation_stage(EvaluateJob(request, m_key), workers) if evaluate else None
    seconds["evaluate"] = time.perf_counter() - timer
    metrics = {k: v for k, v in (evaluation.metrics if evaluation else {}).items() if isinstance(v, float)}

    tags = {
        "flow": flow_label,
        "base_model": request.model,
        "base_fingerprint": base,
        "concepts": concept_list_tag(request),
        "concept_set_hash": concept_set_hash(request),
        "request_hash": request_hash(request),
        "parent_version": lineage.parent_version or "",
        "model_key": m_key,
        "prior_key": p_key,
    } | ({"closure": json.dumps(fused.summary["closure"])} if fused.summary.get("closure") else {})
    params = {
        "concepts": len(request.concepts), "lam1": request.preserve.lam1, "lam2": request.preserve.lam2,
        "ridge": request.preserve.ridge, "lora_steps": request.method.lora_steps, "lora_lr": request.method.lora_lr,
        "lora_rank": request.method.lora_rank, "images_per_concept": request.method.images_per_concept,
        "workers": workers, "seed": request.seed, "evaluated": evaluate,
    }
    timer = time.perf_counter()
    reference = stage_model_reference(m_key)  # the version names its weights in the store; no copy in MLflow
    lock.ensure()  # the alias moves only while this flow holds the model's lock
    version = stage_register(
        name, reference, request.model_dump_json(), tags, params, metrics,
        evaluation.report_html if evaluation else None, keys, lineage.move_candidate,
    )
    seconds["register"] = time.perf_counter() - timer
    return version | {
        "metrics": metrics, "model_key": m_key, "parent_version": lineage.parent_version or "",
        "closure": fused.summary.get("closure"),
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
def erase_flow(request: dict, name: str, workers: int = 1, evaluate: bool = True) -> dict:
    """Erase a request's concepts and register the result as a new version of ``name``.

    ``request`` is validated exactly as a request file is (bounds, paths, caption hash), so a
    deployment's parameters are refused before any worker starts, naming the field. ``evaluate``
    False skips the new version's evaluation (the audit judges it before any promotion)."""
    spec = parse_request(request)
    check_model_name(name)
    return run_erasure(spec, name, workers, "erase", parent_version=None, evaluate=evaluate)
