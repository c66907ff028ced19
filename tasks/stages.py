"""Prefect tasks: each stage of a flow, run on the Ray worker pool; they take a typed job and return a
small typed result (``tasks.jobs``): keys, seconds, metrics. Big data stays in the artifact store.

Retries are declared on the decorators: a stage that lost its worker or met a
storage hiccup runs again, and finds whatever it had already published.
"""

from __future__ import annotations

from prefect import task

from erasure.errors import ErasureError
from erasure.spec import ErasureRequest
from tasks.compute import worker_pool
from tasks.jobs import Job, ModelReference, StageReport, StageResult


def retry_helps(task, task_run, state) -> bool:
    """A stage is retried for what a rerun can mend (a lost worker, a store or registry outage),
    not for bad input or a missing judge, which fail the same way again (``ErasureError.retry_helps``)."""
    error = state.data
    return not (isinstance(error, ErasureError) and not error.retry_helps)


# The model-bound stages run on the process's worker pool (``tasks.compute``): ``workers``
# actors on ``device`` (None: ``ERASURE_DEVICE``, else auto), each stage on an idle one.


@task(name="captions", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_helps)
def stage_captions(request: ErasureRequest) -> str | None:
    """Put the request's caption file into the store under its content hash (once), so workers read
    it from there, never from the submitting machine's path."""
    import shutil
    import tempfile
    from pathlib import Path

    from erasure.spec import inside_input_root, read_captions
    from tasks.keys import CAPTIONS_FILE, captions_key
    from tasks.store import store_from_url, store_settings

    if request.preserve.captions is None:
        return None
    key = captions_key(request)
    store = store_from_url(*store_settings())
    if not store.exists(key):
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / CAPTIONS_FILE
            # checked again: a registered request's path was checked on another machine, or before a root was set
            shutil.copyfile(inside_input_root(Path(request.preserve.captions), "preserve.captions"), copy)
            read_captions(copy, request.preserve.captions_sha256)  # the copy is the validated content
            store.publish(key, Path(folder))
    return key


@task(name="stage", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_helps, task_run_name="{job.label}")
def run_stage(job: Job, workers: int, device: str | None = None) -> StageResult | StageReport | None:
    """One model-bound stage (``tasks.jobs``) on the process's worker pool, on whichever actor is idle."""
    return worker_pool(job.model, workers, device).run(job)


# a lost worker is already replaced by the pool, and evaluation is only a report: one retry
evaluation_stage = run_stage.with_options(name="evaluate", retries=1)
# no retries: a judge missing or an artifact that fails its checksum would only fail again, and the
# next scheduled audit is the retry
audit_stage = run_stage.with_options(name="audit", retries=0)


@task(name="model-reference", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_helps)
def stage_model_reference(key: str) -> ModelReference:
    """The erased model as a registered version names it: store, key and the digest of its
    manifest (the weights stay in the store; nothing is downloaded)."""
    from tasks.store import manifest_digest, store_from_url, store_settings

    url, endpoint = store_settings()
    manifest = store_from_url(url, endpoint).read_manifest(key)
    return ModelReference(url, key, manifest_digest(manifest), endpoint)


@task(name="register")  # no retries: an MLflow outage fails the flow fast; its re-run completes the registration
def stage_register(
    name, reference, request_json, tags, params, metrics, report_html, concept_keys, move_candidate=True
) -> dict:
    """Register the erased model as a new version (see ``tasks.registry.register_erased_model``)."""
    from tasks.registry import register_erased_model

    version = register_erased_model(
        name, reference, request_json, tags, params, metrics, report_html, concept_keys, move_candidate
    )
    return {
        "name": version.name, "version": version.version, "run_id": version.run_id,
        "candidate": version.candidate, "reused_version": version.reused,  # an identical earlier registration
        "registry_note": version.note,
    }
