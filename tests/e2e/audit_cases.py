"""Run in a subprocess by ``tests/test_audit_e2e.py``, on the embedded default (local store,
SQLite MLflow, in-process Prefect and Ray): the nightly deployment's audit of the production
version, and three versions that must fail it. Prints one JSON line of outcomes."""

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]


def publish_model(components, key: str) -> dict:
    from erasure.diffusion.models import save_components
    from tasks.stages import stage_model_reference
    from tasks.store import store_from_url, store_settings

    with tempfile.TemporaryDirectory() as folder:
        save_components(components, Path(folder) / "model")
        store_from_url(*store_settings()).publish(key, Path(folder) / "model")
    return stage_model_reference.fn(key)


def register(name: str, components, key: str, request: dict) -> str:
    from erasure.spec import registered_request
    from tasks.keys import request_hash
    from tasks.registry import register_erased_model

    reference = publish_model(components, key)
    digest = request_hash(registered_request(json.dumps(request)))
    tags = {"request_hash": digest, "model_key": key, "flow": "erase", "parent_version": "", "base_model": request["model"]}
    version = register_erased_model(name, reference, json.dumps(request), tags, {}, {}, None, [])
    return f"{name}/{version.version}"


def audit(model: str, policy_file: str) -> dict:
    from flows.audit import AuditInconclusive, ConceptLeak, audit_flow

    try:
        result = audit_flow(model, policy_file=policy_file)
    except (ConceptLeak, AuditInconclusive) as error:
        return {"outcome": error.result["outcome"], "reasons": error.result["reasons"]}
    return {"outcome": result["outcome"], "reasons": result["reasons"]}


def main(policy_file: str, request_file: str) -> None:
    from mlflow.tracking import MlflowClient

    from erasure.loading import load_components
    from erasure.spec import load_request
    from flows.audit import audit_flow
    from tasks.registry import configure, resolve

    outcomes = {}
    # the nightly deployment, as prefect.yaml declares it (its policy file swapped for the test's
    # smaller one, attacks off: the attacks are tested on their own)
    deployment = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "audit-production")
    parameters = deployment["parameters"] | {"policy_file": policy_file, "attacks": False}
    nightly = audit_flow(**parameters)
    outcomes["nightly"] = {"outcome": nightly["outcome"], "model": parameters["model"]}
    # rerun with the nightly's seed: the same probes, the same numbers
    rerun = audit_flow(**parameters | {"seed": nightly["seed"]})
    outcomes["rerun_same"] = rerun["summary"]["concepts"] == nightly["summary"]["concepts"]

    request = json.loads(load_request(Path(request_file)).model_dump_json())
    base = load_components(request["model"])
    noise = load_components(request["model"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in noise.unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    outcomes["noise"] = audit(register("noise", noise, "models/test-noise", request), policy_file)

    # the base model itself, registered with a request that once set its own thresholds to 100 %
    loosened = request | {"audit": {"max_acc_e": 1.0, "max_acc_g": 1.0}}
    outcomes["loosened"] = audit(register("loosened", base, "models/test-base", loosened), policy_file)

    # a version whose model_key tag was edited to name another artifact
    configure()
    version = resolve("erased-models@production")
    MlflowClient().set_model_version_tag(version.name, version.version, "model_key", "models/test-noise")
    outcomes["edited_tag"] = audit("erased-models@production", policy_file)
    print("OUTCOMES " + json.dumps(outcomes))


if __name__ == "__main__":
    main(*sys.argv[1:])
