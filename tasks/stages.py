"""Prefect tasks: each stage of a flow, run on the Ray worker pool; they return small values (keys, metrics).

Retries are declared on the decorators: a stage that lost its worker or met a
storage hiccup runs again, and finds whatever it had already published.
"""

from __future__ import annotations

from prefect import task

from tasks.compute import worker_pool


@task(name="prior", retries=2, retry_delay_seconds=2)
def stage_prior(model: str, workers: int, request_json: str, key: str) -> dict:
    return worker_pool(model, workers).call("prior", request_json, key)


@task(name="concept", retries=2, retry_delay_seconds=2, task_run_name="concept-{index}")
def stage_concept(model: str, workers: int, request_json: str, index: int, key: str, prior_key: str) -> dict:
    # concept i always goes to actor i mod workers: a fan-out over all actors
    return worker_pool(model, workers).call("concept", request_json, index, key, prior_key, actor=index)


@task(name="fuse", retries=2, retry_delay_seconds=2)
def stage_fuse(model: str, workers: int, request_json: str, concept_keys: list[str], prior_key: str, key: str) -> dict:
    return worker_pool(model, workers).call("fuse", request_json, concept_keys, prior_key, key)


@task(name="evaluate", retries=1, retry_delay_seconds=2)
def stage_evaluate(model: str, workers: int, request_json: str, model_key: str | None) -> dict | None:
    return worker_pool(model, workers).call("evaluate", request_json, model_key)


@task(name="fetch-model", retries=2, retry_delay_seconds=2)
def stage_fetch(key: str, folder: str) -> str:
    from pathlib import Path

    from tasks.store import store_from_url, store_settings

    return str(store_from_url(*store_settings()).fetch(key, Path(folder)))


@task(name="register")
def stage_register(name, model_dir, request_json, tags, params, metrics, report_html, concept_keys) -> dict:
    from tasks.registry import register_erased_model

    version = register_erased_model(name, model_dir, request_json, tags, params, metrics, report_html, concept_keys)
    return {"name": version.name, "version": version.version, "run_id": version.run_id}
