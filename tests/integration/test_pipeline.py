"""The pipeline against real services: S3 (SeaweedFS), MLflow and Prefect servers, local Ray."""

import threading
import time

import pytest
import torch

from erasure.spec import parse_request

# the tiny model's random 32-wide text encoder leaves the constrained fusion (the default) no null
# space to edit in: pipeline tests on it use MACE's fusion; the methods are tested on the toy world
TINY_FUSION = {"method": "mace"}

pytestmark = pytest.mark.usefixtures("services")

FAST = {"images_per_concept": 2, "sampler_steps": 3, "lora_steps": 3, "prompts_per_concept": 6}
CONCEPTS = [
    {"name": "cat", "anchor": "dog"},
    {"name": "van gogh", "kind": "style"},
    {"name": "tree", "anchor": "house"},
]


def request(concepts=CONCEPTS, method=FAST, seed=0):
    return parse_request({"model": "builtin:tiny", "concepts": concepts, "method": method, "seed": seed, "fusion": TINY_FUSION}).model_dump(mode="json")


def store():
    from tasks.store import store_from_url, store_settings

    return store_from_url(*store_settings())


def model_config(name, version):
    """What a registered version names as its weights: store URL, S3 endpoint, model key, manifest digest."""
    import mlflow

    return mlflow.models.get_model_info(f"models:/{name}/{version}").flavors["python_function"]["config"]


def unet_weights(name, version):
    """The erased UNet of a registered version: fetched from the artifact store its model names, verified."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from tasks.store import store_from_url

    config = model_config(name, version)
    with tempfile.TemporaryDirectory() as folder:
        store_from_url(config["store_url"], config["s3_endpoint"]).fetch(config["model_key"], Path(folder), config["sha256"])
        return load_file(str(next(Path(folder).rglob("unet/*.safetensors"))))


def mlflow_files(name, version):
    import tempfile
    from pathlib import Path

    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=folder)
        return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())


def version_request_json(name, version):
    import json

    from tasks.registry import resolve, version_request

    return json.loads(version_request(resolve(f"{name}/{version}")))


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
    assert again["version"] == "1"  # and registers no second version: idempotent

    taken = takedown_flow("lineage/1", [{"name": "car", "anchor": "truck"}], workers=2)
    assert taken["version"] == "2" and len(taken["ran"]) == 1 and taken["ran"][0].startswith("concepts/car-")
    assert version_tags("lineage", "2")["parent_version"] == "1" and taken["candidate"]
    with pytest.raises(ConceptStateError, match="already erased"):
        takedown_flow("lineage/2", [{"name": "Cat", "anchor": "dog"}], workers=2)

    v1 = unet_weights("lineage", "1")
    store().delete(first["model_key"])  # make the restore recompute the fusion instead of reusing v1's model
    restored = restore_flow("lineage/2", ["car"], workers=2)
    assert restored["version"] == "3" and restored["ran"] == [] and version_tags("lineage", "3")["parent_version"] == "2"
    # the same weights as version 1: the same store artifact (recomputed here), not a copy in MLflow
    assert model_config("lineage", "3")["model_key"] == model_config("lineage", "1")["model_key"] == first["model_key"]
    assert not [f for f in mlflow_files("lineage", "3") if f.endswith((".safetensors", ".pkl", ".bin"))]
    v3 = unet_weights("lineage", "3")
    assert v1.keys() == v3.keys()
    assert max(float((v1[k] - v3[k]).abs().max()) for k in v1) < 1e-6
    v2 = unet_weights("lineage", "2")
    assert max(float((v1[k] - v2[k]).abs().max()) for k in v1) > 1e-6  # the takedown did change the model
    print(f"\nerase + reuse + takedown + restore: {time.time() - started:.1f} s")


def test_a_takedown_of_a_preserved_concept_runs_that_concept_alone():
    """Issue 18, incremental prior: taking down a concept the parent preserved reran every concept
    (its prior changed). Now the prior loses it by subtraction and the others keep their artifacts."""
    import tempfile
    from pathlib import Path

    from erasure.artifacts import PRIOR_FILE, load_prior, prior_lineage
    from flows.erase import erase_flow
    from flows.restore import restore_flow
    from flows.takedown import takedown_flow

    spec = parse_request({
        "model": "builtin:tiny", "concepts": CONCEPTS[:2], "method": FAST, "fusion": TINY_FUSION,
        "preserve": {"concepts": ["bird", "car"]},
    }).model_dump(mode="json")
    first = erase_flow(spec, "moved", workers=2)
    taken = takedown_flow("moved/1", [{"name": "bird", "anchor": "fish"}], workers=2)
    assert len(taken["ran"]) == 1 and taken["ran"][0].startswith("concepts/bird-"), taken
    assert sorted(taken["reused"]) == sorted(first["ran"])
    assert "no longer preserved, now erased: bird" in taken["note"]
    before, after = version_tags("moved", "1")["prior_key"], version_tags("moved", "2")["prior_key"]
    with tempfile.TemporaryDirectory() as folder:
        parent = load_prior(store().fetch(before, Path(folder) / "a") / PRIOR_FILE)
        fetched = store().fetch(after, Path(folder) / "b")
        child = load_prior(fetched / PRIOR_FILE)
        assert prior_lineage(fetched) == (("bird", "car"), ("bird",))
    from erasure.erase import without_retained
    from erasure.loading import load_components

    expected = without_retained(load_components("builtin:tiny"), parent, ("bird", "car"), ("bird",))
    assert child.count == expected.count < parent.count  # bird's states, and only they, left it
    assert torch.allclose(child.total, expected.total)
    # the new concept was made against that prior: its key says so (a run of the request alone differs)
    from tasks.keys import concept_key

    spec_now = parse_request(version_request_json("moved", "2"))
    bird = next(c for c in spec_now.concepts if c.name == "bird")
    assert taken["ran"][0] != concept_key(version_tags("moved", "2")["base_fingerprint"], bird, spec_now)
    # the next change keeps building on that lineage: a restore reruns nothing, and its model
    # names its prior (not the one its request alone implies)
    restored = restore_flow("moved/2", ["bird"], workers=2)
    assert restored["ran"] == [] and version_tags("moved", "3")["prior_key"] == after
    assert restored["model_key"] != first["model_key"]  # version 1 kept bird; version 3 neither keeps nor erases it


def test_registered_model_generates_through_pyfunc():
    import mlflow

    from flows.erase import erase_flow
    from tasks.registry import PromotionRefused, promote

    result = erase_flow(request(CONCEPTS[:1]), "pyfunc", workers=2)
    with pytest.raises(PromotionRefused, match="no audit under the current policy"):
        promote("pyfunc", result["version"])  # production needs a passing audit
    promote("pyfunc", result["version"], override_reason="the tiny model has no judge; this tests the pyfunc")
    assert "model_code_path" in mlflow.models.get_model_info("models:/pyfunc@production").flavors["python_function"]
    model = mlflow.pyfunc.load_model("models:/pyfunc@production")
    images = model.predict(["a photo of the cat", "a tree"])
    assert images.shape == (2, 16, 16, 3) and images.dtype.name == "uint8"


def test_two_takedowns_at_once_the_last_candidate_holds_every_concept():
    from flows.erase import erase_flow
    from flows.takedown import takedown_flow
    from tasks.registry import resolve

    erase_flow(request(CONCEPTS[:1]), "concurrent", workers=2)
    results, errors = {}, []

    def take(concept):
        try:
            results[concept] = takedown_flow("concurrent", [{"name": concept, "anchor": "house"}], workers=2)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=take, args=(c,)) for c in ("car", "boat")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(r["version"] for r in results.values()) == ["2", "3"]
    assert version_tags("concurrent", "2")["parent_version"] == "1"
    last = version_tags("concurrent", "3")  # the second to take the lock rebased on the first
    assert last["parent_version"] == "2" and set(last["concepts"].split(", ")) == {"cat", "car", "boat"}
    assert resolve("concurrent@candidate").version == "3"
    assert sorted(k.split("-")[0] for r in results.values() for k in r["ran"]) == ["concepts/boat", "concepts/car"]

    # an explicit parent that is no longer the candidate: registered, the candidate stays
    explicit = takedown_flow("concurrent/1", [{"name": "plane", "anchor": "house"}], workers=2)
    assert explicit["version"] == "4" and not explicit["candidate"] and "candidate stays at version 3" in explicit["note"]
    assert version_tags("concurrent", "4")["concepts"] == "cat, plane" and resolve("concurrent@candidate").version == "3"


def wait_for_published_concepts(count, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        listing = store().client.list_objects_v2(Bucket="erasure", Prefix="artifacts/concepts/")
        published = [o for o in listing.get("Contents", []) if o["Key"].endswith("_manifest.json")]
        if len(published) >= count:
            return published
        time.sleep(0.2)
    raise TimeoutError("no concept was published")


def test_killed_workers_are_replaced_and_the_run_resumes_from_finished_concepts():
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
    finished = {o["Key"]: o["LastModified"] for o in _concept_manifests()}
    for actor in list(pool.actors):
        ray.kill(actor, no_restart=True)  # every worker dies mid-run
    runner.join()
    # the pool replaced its workers and re-ran only the interrupted stages: the run completed
    assert outcome["error"] is None, outcome["error"]
    after = {o["Key"]: o["LastModified"] for o in _concept_manifests()}
    assert all(after[key] == when for key, when in finished.items())  # finished concepts were not redone
    drop_pools()
    rerun = erase_flow(spec, "killed", workers=2)  # and the same request again: nothing runs, nothing new
    assert rerun["version"] == "1" and rerun["reused_version"]
    assert rerun["ran"] == [] and len(rerun["reused"]) == 3


def _concept_manifests() -> list[dict]:
    listing = store().client.list_objects_v2(Bucket="erasure", Prefix="artifacts/concepts/")
    return [o for o in listing.get("Contents", []) if o["Key"].endswith("_manifest.json")]


def _published_manifests():
    return len(_concept_manifests())


def _run_catching(flow, spec, name):
    try:
        flow(spec, name, workers=2)
    except Exception as error:
        return error
    return None


def test_s3_outage_mid_run_fails_clearly_registers_nothing_and_the_rerun_resumes(services):
    from mlflow.tracking import MlflowClient

    from cli import services as svc
    from erasure.errors import ErasureError
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
        error = outcome["error"]
        # a product error that names the store it lost (its endpoint), not an anonymous crash
        assert isinstance(error, ErasureError), repr(error)
        assert f"127.0.0.1:{services['ports'].s3}" in str(error), str(error)
        assert MlflowClient().search_model_versions("name='outage'") == []
    finally:
        svc.start_s3(services["ports"])
    # once the store is back, the rerun resumes from what was published before the outage
    rerun = erase_flow(spec, "outage", workers=2)
    assert rerun["version"] == "1" and len(rerun["reused"]) >= 1 and len(rerun["ran"]) + len(rerun["reused"]) == 2


def test_mlflow_outage_fails_the_flow_fast_and_the_rerun_registers_once(services):
    from mlflow.tracking import MlflowClient

    from cli import services as svc
    from flows.erase import erase_flow

    spec = request([{"name": "lamp", "anchor": "house"}], seed=13)
    port = services["ports"].mlflow
    svc.stop("mlflow")
    try:
        started = time.time()
        with pytest.raises(Exception, match=f"MLflow at http://127.0.0.1:{port}"):
            erase_flow(spec, "mlflow-outage", workers=2)
        print(f"\nflow with MLflow down failed after {time.time() - started:.1f} s (per-concept work included)")
    finally:
        svc.start_mlflow(services["ports"], backend_uri=services["mlflow_backend"])
    rerun = erase_flow(spec, "mlflow-outage", workers=2)
    assert rerun["version"] == "1" and rerun["ran"] == []  # the concept survived in the store
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='mlflow-outage'")] == ["1"]


def test_seaweedfs_store_refuses_crafted_paths_unpublishes_corrupt_artifacts_and_holds_locks(tmp_path):
    import hashlib
    import json

    from tasks.locks import LockTimeout, S3Lock
    from tasks.store import ArtifactError

    s3 = store()
    (tmp_path / "a" / "unet").mkdir(parents=True)
    (tmp_path / "a" / "unet" / "model.bin").write_bytes(b"weights")
    manifest = s3.publish("models/real", tmp_path / "a")
    assert s3.publish("models/real", tmp_path / "a")["prefix"] == manifest["prefix"]  # published: kept as is
    name = s3._object("models/real", manifest["prefix"], "unet/model.bin")
    s3.client.put_object(Bucket=s3.bucket, Key=name, Body=b"weighta")  # one flipped bit
    with pytest.raises(ArtifactError, match="'models/real'.*corrupt.*unpublished"):
        s3.fetch("models/real", tmp_path / "out")
    assert not s3.exists("models/real")

    crafted = {"files": {"../../escape.bin": hashlib.sha256(b"x").hexdigest()}}
    s3.client.put_object(Bucket=s3.bucket, Key=s3._object("models/evil", "_manifest.json"), Body=json.dumps(crafted).encode())
    with pytest.raises(ArtifactError, match="'models/evil'.*outside"):
        s3.fetch("models/evil", tmp_path / "fetch" / "a" / "b")
    assert not (tmp_path / "fetch" / "escape.bin").exists() and not s3.exists("models/evil")

    key = s3._object(".locks", "registry", "integration")
    with S3Lock(s3.client, s3.bucket, key, where=s3.url, wait_s=5):  # SeaweedFS honours conditional writes
        with pytest.raises(LockTimeout):
            S3Lock(s3.client, s3.bucket, key, where=s3.url, wait_s=0.5).acquire()
    with S3Lock(s3.client, s3.bucket, key, where=s3.url, wait_s=5):
        pass  # released


def test_audit_passes_on_the_erased_model_and_names_the_leak_on_the_base_model():
    from flows.audit import ConceptLeak, audit_flow
    from flows.erase import erase_flow

    spec = parse_request({
        # a model with a judge, where this small erasure (4 images, 30 LoRA steps) reaches acc_e 0: the
        # CLIP world (on the MiniLM world one colour keeps acc_g above the policy without alias discovery, see the README)
        "model": "builtin:toyworld-clip",
        "concepts": [{"name": "red", "anchor": "white"}],
        "preserve": {"concepts": ["green", "blue", "yellow", "purple", "orange", "cyan", "white"], "lam1": 5, "lam2": 5},
        "method": {"images_per_concept": 4, "lora_steps": 30},
    }).model_dump(mode="json")
    result = erase_flow(spec, "toy-audit", workers=2)
    assert result["metrics"]["acc_e"] <= 0.10
    policy = {"probes_per_concept": 8, "retained_limit": 7}  # the default policy's checks, fewer prompts
    passed = audit_flow("toy-audit@candidate", policy, workers=2, seed=3)
    assert passed["outcome"] == "passed" and passed["metrics"]["acc_e"] <= 0.10
    with pytest.raises(ConceptLeak, match=r"red: drawn from its name in 100%"):
        audit_flow("builtin:toyworld-clip", policy, seed=3, request=spec)
