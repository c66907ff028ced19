"""The pipeline against real services: S3 (SeaweedFS), MLflow and Prefect servers on Postgres, local Ray."""

import threading
import time

import pytest

from erasure.spec import parse_request

pytestmark = pytest.mark.usefixtures("services")

FAST = {"images_per_concept": 2, "sampler_steps": 3, "lora_steps": 3, "prompts_per_concept": 6}
CONCEPTS = [
    {"name": "cat", "anchor": "dog"},
    {"name": "van gogh", "kind": "style"},
    {"name": "tree", "anchor": "house"},
]


def request(concepts=CONCEPTS, method=FAST, seed=0):
    return parse_request({"model": "builtin:tiny", "concepts": concepts, "method": method, "seed": seed}).model_dump(mode="json")


def store():
    from tasks.store import store_from_url, store_settings

    return store_from_url(*store_settings())


def unet_weights(name, version):
    """The erased UNet as registered in MLflow (downloaded from the MLflow server)."""
    import tempfile
    from pathlib import Path

    import mlflow
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=folder)
        return load_file(str(next(Path(path).rglob("unet/*.safetensors"))))


def version_tags(name, version):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version(name, version).tags


def test_erase_takedown_restore_lineage_and_reuse():
    from flows.erase import erase_flow
    from flows.restore import restore_flow
    from flows.takedown import ConceptStateError, takedown_flow

    started = time.time()
    first = erase_flow(request(), "lineage", workers=2)
    assert first["version"] == "1" and len(first["ran"]) == 3
    objects = store().client.list_objects_v2(Bucket="erasure", Prefix="artifacts/concepts/")
    assert {o["Key"].split("/")[2] for o in objects["Contents"]} == set(k.split("/")[1] for k in first["ran"])
    tags = version_tags("lineage", "1")
    assert tags["concepts"] == "cat, van gogh, tree" and tags["parent_version"] == "" and len(tags["base_fingerprint"]) == 64
    assert tags["flow"] == "erase" and tags["request_hash"] and tags["concept_set_hash"]

    again = erase_flow(request(), "lineage", workers=2)
    assert again["ran"] == [] and len(again["reused"]) == 3  # the same request runs no per-concept work

    taken = takedown_flow("lineage/1", [{"name": "car", "anchor": "truck"}], workers=2)
    assert taken["version"] == "3" and len(taken["ran"]) == 1 and taken["ran"][0].startswith("concepts/car-")
    assert version_tags("lineage", "3")["parent_version"] == "1"
    with pytest.raises(ConceptStateError, match="already erased"):
        takedown_flow("lineage/3", [{"name": "Cat", "anchor": "dog"}], workers=2)

    store().delete(first["model_key"])  # make the restore recompute the fusion instead of reusing v1's model
    restored = restore_flow("lineage/3", ["car"], workers=2)
    assert restored["version"] == "4" and restored["ran"] == [] and version_tags("lineage", "4")["parent_version"] == "3"
    v1, v4 = unet_weights("lineage", "1"), unet_weights("lineage", "4")
    assert v1.keys() == v4.keys()
    assert max(float((v1[k] - v4[k]).abs().max()) for k in v1) < 1e-6
    v3 = unet_weights("lineage", "3")
    assert max(float((v1[k] - v3[k]).abs().max()) for k in v1) > 1e-6  # the takedown did change the model
    print(f"\nerase + reuse + takedown + restore: {time.time() - started:.1f} s")


def test_registered_model_generates_through_pyfunc():
    import mlflow

    from flows.erase import erase_flow
    from tasks.registry import promote

    result = erase_flow(request(CONCEPTS[:1]), "pyfunc", workers=2)
    promote("pyfunc", result["version"])
    model = mlflow.pyfunc.load_model("models:/pyfunc@production")
    images = model.predict(["a photo of the cat", "a tree"])
    assert images.shape == (2, 16, 16, 3) and images.dtype.name == "uint8"


def test_two_takedowns_at_once_both_land_with_the_right_parent():
    from flows.erase import erase_flow
    from flows.takedown import takedown_flow

    erase_flow(request(CONCEPTS[:1]), "concurrent", workers=2)
    results, errors = {}, []

    def take(concept):
        try:
            results[concept] = takedown_flow("concurrent/1", [{"name": concept, "anchor": "house"}], workers=2)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=take, args=(c,)) for c in ("car", "boat")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(r["version"] for r in results.values()) == ["2", "3"]
    for concept, result in results.items():
        tags = version_tags("concurrent", result["version"])
        assert tags["parent_version"] == "1" and tags["concepts"] == f"cat, {concept}"


def wait_for_published_concepts(count, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        listing = store().client.list_objects_v2(Bucket="erasure", Prefix="artifacts/concepts/")
        published = [o for o in listing.get("Contents", []) if o["Key"].endswith("_manifest.json")]
        if len(published) >= count:
            return published
        time.sleep(0.2)
    raise TimeoutError("no concept was published")


def test_killed_worker_rerun_resumes_from_finished_concepts():
    import ray

    from flows.erase import erase_flow
    from tasks.compute import drop_pools, worker_pool

    slow = FAST | {"lora_steps": 150}
    spec = request([{"name": n, "anchor": "house"} for n in ("boat", "plane", "ship")], slow, seed=11)
    baseline = _published_manifests()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("error", _run_catching(erase_flow, spec, "killed")))
    pool = worker_pool("builtin:tiny", 2)
    runner.start()
    wait_for_published_concepts(baseline + 1)
    for actor in pool.actors:
        ray.kill(actor, no_restart=True)  # every worker dies mid-run
    runner.join()
    assert outcome["error"] is not None  # the run failed, and registered nothing
    drop_pools()
    rerun = erase_flow(spec, "killed", workers=2)
    assert rerun["version"] == "1"
    assert 1 <= len(rerun["reused"]) < 3 and len(rerun["ran"]) == 3 - len(rerun["reused"])


def _published_manifests():
    listing = store().client.list_objects_v2(Bucket="erasure", Prefix="artifacts/concepts/")
    return len([o for o in listing.get("Contents", []) if o["Key"].endswith("_manifest.json")])


def _run_catching(flow, spec, name):
    try:
        flow(spec, name, workers=2)
    except Exception as error:
        return error
    return None


def test_s3_outage_mid_run_fails_clearly_and_registers_nothing(services):
    from mlflow.tracking import MlflowClient

    from cli import services as svc
    from flows.erase import erase_flow

    spec = request([{"name": n, "anchor": "house"} for n in ("apple", "cup")], FAST | {"lora_steps": 100}, seed=12)
    baseline = _published_manifests()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("error", _run_catching(erase_flow, spec, "outage")))
    runner.start()
    wait_for_published_concepts(baseline + 1)
    svc.stop("s3")
    runner.join()
    try:
        assert outcome["error"] is not None
        assert "127.0.0.1" in str(outcome["error"]) or "s3" in str(outcome["error"]).lower()
        assert MlflowClient().search_model_versions("name='outage'") == []
    finally:
        svc.start_s3(services["ports"])


def test_audit_passes_on_the_erased_model_and_names_the_leak_on_the_base_model():
    from flows.audit import ConceptLeak, audit_flow
    from flows.erase import erase_flow

    spec = parse_request({
        "concepts": [{"name": "red", "anchor": "white"}],  # the toy world: a model with a judge
        "preserve": {"concepts": ["green", "blue", "yellow", "purple", "orange", "cyan", "white"], "lam1": 5, "lam2": 5},
        "method": {"images_per_concept": 4, "lora_steps": 30},
        "audit": {"max_acc_e": 0.25, "max_acc_g": 0.35},
    }).model_dump(mode="json")
    result = erase_flow(spec, "toy-audit", workers=2)
    assert result["metrics"]["acc_e"] <= 0.25
    passed = audit_flow("toy-audit@candidate")
    assert passed["passed"] and passed["metrics"]["acc_e"] <= 0.25
    with pytest.raises(ConceptLeak, match=r"1 concept\(s\) leaked.*red \(acc_e"):
        audit_flow("builtin:toyworld", spec)
