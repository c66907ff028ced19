"""MLflow: every flow run is a run; every erased model a registered version with its lineage.

Embedded default: tracking and registry in a SQLite file (``erasure-mlflow.db``);
set ``MLFLOW_TRACKING_URI`` to use an MLflow server. A version is registered only
after every artifact it needs is published and logged.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

CANDIDATE, PRODUCTION = "candidate", "production"


def configure() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('erasure-mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


class ErasedPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts in, images out (uint8 array, (n, H, W, 3)).

    Input: a list of prompts or a DataFrame with a ``prompt`` column (optional
    ``seed`` column). Sampler settings are the model's own defaults.
    """

    def load_context(self, context):
        from erasure.models import load_components

        self.components = load_components(context.artifacts["pipeline"], "cpu")

    def predict(self, context, model_input, params=None):
        import numpy as np

        from erasure.models import sampling_defaults
        from erasure.sampling import sample

        if hasattr(model_input, "columns"):
            prompts = [str(p) for p in model_input["prompt"]]
            seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input.columns else list(range(len(prompts)))
        else:
            prompts = [str(p) for p in model_input]
            seeds = list(range(len(prompts)))
        defaults = sampling_defaults(self.components)
        images, _ = sample(self.components, prompts, seeds, defaults["sampler_steps"], defaults["guidance_scale"])
        return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "diffusers", "transformers", "peft", "safetensors", "mlflow")] + [
        f"erasure=={version('erasure')}"
    ]


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    tags: dict


def register_erased_model(
    name: str,
    model_dir: Path,
    request_json: str,
    tags: dict,
    params: dict,
    metrics: dict,
    report_html: str | None,
    concept_keys: list[str],
) -> RegisteredVersion:
    """Log a run (params, metrics, request, report, model) and register its model as a new version."""
    configure()
    mlflow.set_experiment(f"erasure/{name}")
    client = MlflowClient()
    with mlflow.start_run(run_name=tags.get("flow", "erase")) as run:
        mlflow.log_params(params)
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tags({f"erasure.{k}": str(v) for k, v in tags.items()})
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "request.json").write_text(request_json)
            (folder / "concept_keys.json").write_text(json.dumps(concept_keys, indent=1))
            mlflow.log_artifact(str(folder / "request.json"))
            mlflow.log_artifact(str(folder / "concept_keys.json"))
            if report_html is not None:
                (folder / "report.html").write_text(report_html)
                mlflow.log_artifact(str(folder / "report.html"))
        model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ErasedPipelineModel(),
            artifacts={"pipeline": str(model_dir)},
            pip_requirements=_requirements(),  # stated, not inferred: inference imports and samples the model
        )
        run_id = run.info.run_id
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # exists already (or was just created by a concurrent flow)
    version = client.create_model_version(
        name, model_info.model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_info.model_id
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return RegisteredVersion(name, version.version, run_id, tags)


def resolve(reference: str) -> RegisteredVersion:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> the version (``NAME`` alone: the latest)."""
    configure()
    client = MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in reference and reference.rsplit("/", 1)[1].isdigit():
        name, number = reference.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        name = reference
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise LookupError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}")
        version = max(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, str(version.version), version.run_id, dict(version.tags))


def version_request(version: RegisteredVersion) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="request.json", dst_path=folder)
        return Path(path).read_text()


def promote(name: str, version: str, alias: str = PRODUCTION) -> None:
    configure()
    MlflowClient().set_registered_model_alias(name, alias, version)


def log_audit(name: str, version: RegisteredVersion | None, metrics: dict, passed: bool, report_html: str | None, failures: list[str]) -> str:
    configure()
    mlflow.set_experiment(f"erasure/{name}")
    with mlflow.start_run(run_name="audit") as run:
        mlflow.set_tags({"erasure.flow": "audit", "erasure.passed": str(passed), "erasure.leaked": ",".join(failures)}
                        | ({"erasure.version": version.version} if version else {}))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if report_html is not None:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "audit_report.html").write_text(report_html)
                mlflow.log_artifact(str(Path(folder) / "audit_report.html"))
        return run.info.run_id
