"""Deployment definitions parse and point at flows and entry points that exist."""

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_prefect_deployments_reference_real_flows_and_parameters():
    import inspect

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in config["deployments"]}
    assert {"erase", "takedown", "restore", "audit-production"} <= names
    for deployment in config["deployments"]:
        module_path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert hasattr(flow, "fn"), f"{function} is not a Prefect flow"
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
    audit = next(d for d in config["deployments"] if d["name"] == "audit-production")
    cron = audit["schedules"][0]["cron"].split()
    assert len(cron) == 5


def test_ray_cluster_has_gpu_workers_and_the_worker_image():
    (cluster,) = load_all(ROOT / "infra" / "ray" / "cluster.yaml")
    assert cluster["kind"] == "RayCluster"
    workers = cluster["spec"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert workers["rayStartParams"]["num-gpus"] == "1"


def test_service_definitions_parse_and_configure_the_pipeline():
    kinds = {}
    for path in (ROOT / "infra" / "k8s").glob("*.yaml"):
        for doc in load_all(path):
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert {"mlflow", "prefect-server", "prefect-worker"} <= set(kinds["Deployment"])
    assert kinds["StatefulSet"] == ["postgres"] and "erasure-artifacts" in kinds["Bucket"]
    (config,) = [d for d in load_all(ROOT / "infra" / "k8s" / "config.yaml") if d["kind"] == "ConfigMap"]
    # the same variables the code reads: switching to distributed mode is configuration only
    for variable in ("ERASURE_STORE", "ERASURE_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"):
        assert variable in config["data"]
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    assert '".[pipeline]"' in dockerfile and "COPY flows" in dockerfile


def test_console_entry_point_exists():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, attribute = scripts["erasure"].split(":")
    app = getattr(importlib.import_module(module), attribute)
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"erase", "generate", "evaluate", "run", "takedown", "restore", "audit", "promote"} <= names
