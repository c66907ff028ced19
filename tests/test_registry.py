"""The MLflow registry (SQLite) with a local artifact store: idempotent, complete-or-invisible
registration, fast failure on an outage, a pyfunc logged as code that loads verified weights from
the store, and the lineage rules of concurrent takedowns/restores."""

import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from erasure.spec import parse_request
from tasks.jobs import ModelReference
from tasks.keys import request_hash
from tasks.registry import (
    CANDIDATE,
    CLIENT_DEFAULTS,
    STATUS_TAG,
    RegistryError,
    alias_version,
    register_erased_model,
    resolve,
    version_request,
)
from tasks.store import LocalStore, manifest_digest

# the tiny model's random 32-wide text encoder leaves the constrained fusion (the default) no null
# space to edit in: pipeline tests on it use MACE's fusion; the methods are tested on the toy world
TINY_FUSION = {"method": "mace"}


@pytest.fixture
def reference(tmp_path, monkeypatch, tiny_folder):
    """An MLflow in SQLite and a local store holding the tiny pipeline; the model's reference."""
    monkeypatch.chdir(tmp_path)  # MLflow's SQLite default puts run artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ERASURE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / ".erasure"))  # not a session fixture's
    for variable in CLIENT_DEFAULTS:
        monkeypatch.delenv(variable, raising=False)  # configure() sets them; restored afterwards
    store = LocalStore(tmp_path / "store")
    manifest = store.publish("models/tiny", tiny_folder)
    return ModelReference(store.url, "models/tiny", manifest_digest(manifest))


def request_of(concepts):
    return parse_request({"model": "builtin:tiny", "concepts": [{"name": c, "anchor": "house"} for c in concepts], "fusion": TINY_FUSION})


def register(reference, concepts=("cat",), flow="erase", parent="", name="m", move=True):
    request = request_of(concepts)
    tags = {
        "flow": flow, "request_hash": request_hash(request), "model_key": reference.model_key,
        "parent_version": parent, "concepts": ", ".join(concepts),
    }
    return register_erased_model(
        name, reference, request.model_dump_json(), tags, {"concepts": len(concepts)}, {"acc": 0.5}, None, ["concepts/x"], move
    )


def versions(name="m"):
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def test_an_identical_registration_reuses_its_version(reference):
    first = register(reference)
    again = register(reference)
    assert (first.version, again.version) == ("1", "1") and again.reused and not first.reused
    assert [str(v.version) for v in versions()] == ["1"]
    # the same weights reached by another lineage (a restore): a new version, the same store artifact
    restored = register(reference, flow="restore", parent="1")
    assert restored.version == "2" and alias_version("m") == "2"
    assert {v.tags["model_key"] for v in versions()} == {"models/tiny"}


def test_pyfunc_is_code_not_pickle_and_loads_verified_weights_from_the_store(reference, tmp_path):
    import mlflow
    import yaml

    register(reference)
    register(reference, flow="restore", parent="1")  # same weights: both versions name one artifact
    for number in ("1", "2"):
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/m/{number}", dst_path=str(tmp_path / f"v{number}")))
        files = {p.name for p in folder.rglob("*") if p.is_file()}
        assert not any(n.endswith((".pkl", ".safetensors", ".bin")) for n in files), files  # no pickle, no weights
        pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
        # the weights' reference, and the hash of the request it was registered with (what an audit checks)
        assert "model_code_path" in pyfunc and pyfunc["config"] == dataclasses.replace(reference, request_hash=request_hash(request_of(("cat",)))).as_config()
    weights = [p for p in (tmp_path / "mlruns").rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights == []  # nothing copied into MLflow

    model = mlflow.pyfunc.load_model(f"models:/m@{CANDIDATE}")
    images = model.predict(["a photo of a cat", "a house"])
    assert images.shape[0] == 2 and images.shape[3] == 3 and images.dtype.name == "uint8"
    for bad, message in (([], "1 to 256 prompts"), (["x"] * 257, "1 to 256 prompts"), (["a cat\u202e"], "prompt 0: contains U\\+202E")):
        with pytest.raises(Exception, match=message):  # bounded before any sampling
            model.predict(bad)

    unet = next((tmp_path / "store" / "models" / "tiny").rglob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[:-1] + bytes([unet.read_bytes()[-1] ^ 1]))  # one flipped bit
    with pytest.raises(Exception, match="models/tiny.*corrupt"):
        mlflow.pyfunc.load_model("models:/m/1")


def test_an_interrupted_registration_stays_invisible_and_the_rerun_completes_it(reference, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def outage(self, *args, **kwargs):
        raise MlflowException("API request to http://mlflow.example/api/2.0/... failed with exception: connection refused")

    # (patches are put back one by one: monkeypatch.undo() would also drop the fixture's MLflow and store)
    complete, move_alias = MlflowClient.set_model_version_tag, MlflowClient.set_registered_model_alias
    # interrupted before the version is complete: nothing sees it, no alias names it
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", outage)
    with pytest.raises(RegistryError, match="MLflow at sqlite:.*registering a version of 'm'"):
        register(reference)
    (pending,) = versions()
    assert pending.tags[STATUS_TAG] == "pending" and alias_version("m") is None
    with pytest.raises(LookupError, match="no registered model 'm'"):
        resolve("m")  # lookups skip it
    with pytest.raises(LookupError, match="incomplete"):
        resolve("m/1")
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", complete)
    done = register(reference)
    assert done.version == "1" and [str(v.version) for v in versions()] == ["1"]
    assert versions()[0].tags[STATUS_TAG] == "ready" and resolve("m").version == "1" and alias_version("m") == "1"

    # interrupted between completing the version and moving the alias: the re-run moves it
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", outage)
    with pytest.raises(RegistryError):
        register(reference, concepts=("cat", "boat"), flow="takedown", parent="1")
    assert alias_version("m") == "1"  # still the parent: nothing points at the new version yet
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", move_alias)
    finished = register(reference, concepts=("cat", "boat"), flow="takedown", parent="1")
    assert finished.version == "2" and finished.reused and finished.candidate and alias_version("m") == "2"


def test_rerunning_an_old_erase_never_moves_candidate_back_past_a_takedown(reference):
    register(reference)  # erase: version 1
    register(reference, concepts=("cat", "jane doe"), flow="takedown", parent="1")  # version 2, candidate
    again = register(reference)  # the original erase, run again (or an old crashed run re-run)
    assert again.version == "1" and again.reused and not again.candidate
    assert "candidate stays at version 2" in again.note
    assert alias_version("m") == "2"  # the takedown is not silently undone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_mlflow_server_fails_fast_naming_it(reference, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(RegistryError, match=f"MLflow at http://127.0.0.1:{port}"):
        register(reference)
    _assert_bounded_client()


def _assert_bounded_client():
    """What makes a dead or hanging server an error within about a minute: the client's timeout
    and retries are bounded (MLflow's own defaults retry for minutes)."""
    assert float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 10 and int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2


@pytest.mark.slow  # about 30 s: the client's own timeouts and retries run out
def test_a_hanging_mlflow_server_fails_within_a_minute(reference, monkeypatch):
    """A server that accepts connections and never answers (overloaded, half down)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
            resolve("m@candidate")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()
    print(f"\nhanging MLflow: failed after {elapsed:.1f} s")
    _assert_bounded_client()
    assert 1 <= len(accepted) <= 1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])  # each try gave up and retried


def test_lineage_under_the_lock_rebases_on_a_moved_alias_and_keeps_explicit_parents(reference):
    from erasure.spec import ConceptSpec
    from flows.restore import remove_concepts
    from flows.takedown import add_concepts, parent_reference, under_lock

    register(reference, ["cat"])
    v1 = resolve("m/1")
    assert parent_reference("m") == "m@candidate" and parent_reference("m/1") == "m/1"
    boat = [ConceptSpec.model_validate({"name": "boat", "anchor": "house"})]
    prepared = add_concepts(v1, request_of(["cat"]), boat)

    unchanged = under_lock("m@candidate", v1, prepared, lambda p, r: add_concepts(p, r, boat))
    assert unchanged.request is prepared and unchanged.parent_version == "1" and unchanged.move_candidate

    register(reference, ["cat", "car"], flow="takedown", parent="1")  # a concurrent takedown landed first
    rebased = under_lock("m@candidate", v1, prepared, lambda p, r: add_concepts(p, r, boat))
    assert [c.name for c in rebased.request.concepts] == ["cat", "car", "boat"]
    assert rebased.parent_version == "2" and rebased.move_candidate and "rebased on version 2" in rebased.note

    explicit = under_lock("m/1", v1, prepared, lambda p, r: add_concepts(p, r, boat))
    assert [c.name for c in explicit.request.concepts] == ["cat", "boat"] and explicit.parent_version == "1"
    assert not explicit.move_candidate and "candidate stays at version 2" in explicit.note

    restore = under_lock("m@candidate", v1, request_of(["cat"]), lambda p, r: remove_concepts(p, r, ["car"]))
    assert [c.name for c in restore.request.concepts] == ["cat"] and restore.parent_version == "2"
    assert version_request(resolve("m@candidate")) == request_of(["cat", "car"]).model_dump_json()


def test_embedded_run_artifacts_stay_in_the_state_folder_and_passwords_stay_out_of_messages(reference, tmp_path, monkeypatch):
    import mlflow

    from tasks.registry import tracking_uri

    register(reference)
    assert not (tmp_path / "mlruns").exists()  # not in whatever folder the flow ran in
    assert list((tmp_path / ".erasure" / "mlflow-artifacts").rglob("request.json"))
    mlflow.set_tracking_uri("https://alice:s3cret@mlflow.example/")
    assert tracking_uri() == "https://alice:***@mlflow.example/"


def test_an_audit_is_recorded_before_it_samples_and_every_audit_counts_however_many(reference, monkeypatch):
    """An audit's start is a RUNNING run tagged ``started``; only ``log_audit`` completes it. The
    lookup pages through every audit (it used to read the newest 200 only)."""
    from erasure.audit.policy import AuditPolicy
    from tasks import registry

    version = register(reference)
    policy = AuditPolicy(attacks=[])
    started = [registry.start_audit("m", version, policy, seed, reference.sha256) for seed in (1, 2, 3)]
    runs = registry.version_audits("m", version.version, policy.digest(), reference.sha256)
    assert {r.info.run_id for r in runs} == set(started)
    assert all(r.info.status == "RUNNING" and r.data.tags["erasure.outcome"] == "started" and not registry.completed(r) for r in runs)
    registry.log_audit(started[0], "m", "passed", [], policy, False, {"acc_e": 0.0}, {}, None)
    monkeypatch.setattr(registry, "AUDIT_PAGE", 1)  # one run a page: the lookup must page through all three
    runs = {r.info.run_id: r for r in registry.version_audits("m", version.version, policy.digest(), reference.sha256)}
    assert set(runs) == set(started)
    assert registry.completed(runs[started[0]]) and runs[started[0]].data.tags["erasure.outcome"] == "passed"
    assert runs[started[0]].data.params["seed"] == "1"
    assert not registry.completed(runs[started[1]])


def test_deleting_an_audit_run_or_its_experiment_hides_nothing_from_promotion(reference):
    from mlflow.tracking import MlflowClient

    from erasure.audit.policy import AuditPolicy
    from tasks import registry

    version = register(reference)
    policy = AuditPolicy(attacks=[])
    registry.set_deployment_policy("m", policy, reason="this test runs no attacks")
    killed = registry.start_audit("m", version, policy, 7, reference.sha256)
    client = MlflowClient()
    client.delete_run(killed)
    runs = registry.version_audits("m", version.version, policy.digest(), reference.sha256)
    assert [r.info.run_id for r in runs] == [killed]
    with pytest.raises(registry.PromotionRefused, match="has not completed"):
        registry.promote("m", version.version)
    client.delete_experiment(client.get_experiment_by_name("erasure/m").experiment_id)
    with pytest.raises(RegistryError, match="experiment erasure/m is deleted.*restore it"):
        registry.version_audits("m", version.version, policy.digest(), reference.sha256)


def test_a_version_whose_request_json_was_edited_is_never_built_upon(reference):
    """takedown and restore read the parent's request.json; one edited after registration (a
    concept deleted from it, say) must not become the next version's request."""
    from mlflow.tracking import MlflowClient

    from erasure.spec import RequestError
    from tasks.registry import resolve, verified_request

    register(reference, concepts=("cat", "dog"))
    version = resolve("m/1")
    assert [c.name for c in verified_request(version).concepts] == ["cat", "dog"]
    MlflowClient().log_text(version.run_id, request_of(("cat",)).model_dump_json(), "request.json")
    with pytest.raises(RequestError, match="request.json is not the request it was registered with"):
        verified_request(resolve("m/1"))


def test_promotion_is_judged_by_the_registered_deployment_policy_never_the_promoters_environment(reference, monkeypatch):
    """Issue 22, finding 7: `promote` used whatever policy the promoter's ERASURE_AUDIT_POLICY
    named, so a laxer policy with no attacks was recorded as "audit passed"."""
    from mlflow.tracking import MlflowClient

    from erasure.audit.policy import AuditPolicy
    from tasks import registry

    version = register(reference)
    strict, lax = AuditPolicy(), AuditPolicy(attacks=[], max_acc_e=0.5)
    assert registry.deployment_policy("m").digest() == strict.digest()  # none set: the built-in default
    # an audit that passed under the lax policy, with no attacks
    run = registry.start_audit("m", version, lax, 5, reference.sha256)
    registry.log_audit(run, "m", "passed", [], lax, False, {"concepts": [], "base": {}}, {}, None)
    with pytest.raises(registry.PromotionRefused, match="no audit under the current policy"):
        registry.promote("m", version.version)
    with pytest.raises(registry.PolicyRefused, match="more leniently.*max_acc_e 0.1 -> 0.5.*attack prefix dropped.*--reason"):
        registry.set_deployment_policy("m", lax)
    assert registry.deployment_policy("m").digest() == strict.digest()  # refused: nothing changed
    assert registry.set_deployment_policy("m", AuditPolicy(max_acc_e=0.05)) == []  # stricter: no reason needed
    assert registry.set_deployment_policy("m", lax, reason="the toy test model") != []
    assert registry.deployment_policy("m").digest() == lax.digest()
    changes = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("erasure/m").experiment_id], "tags.`erasure.flow` = 'policy'"
    )
    assert len(changes) == 2 and {r.data.tags["erasure.reason"] for r in changes} == {"", "the toy test model"}
    # an edited policy tag is refused, not obeyed
    MlflowClient().set_registered_model_tag("m", registry.POLICY_TAG, AuditPolicy(max_acc_e=0.5, attacks=[], max_acc_g=0.5).model_dump_json())
    with pytest.raises(RegistryError, match="not the policy that was set"):
        registry.promote("m", version.version)


def test_the_retired_policy_variable_is_refused_not_silently_ignored(monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("ERASURE_AUDIT_POLICY", "lax.yaml")
    for command in (["promote", "m", "1"], ["audit", "m/1"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "ERASURE_AUDIT_POLICY is no longer read" in result.output, command


def test_an_audit_without_a_verdict_is_retried_on_its_own_probes_and_attacks_only(reference):
    """Issue 22, finding 5: an outage's "error" must not block a version for good, and retrying
    it must not draw new probes (that would let a caller stop bad audits until one passes)."""
    from erasure.audit.policy import AuditPolicy
    from erasure.spec import RequestError
    from tasks import registry

    version = register(reference)
    policy = AuditPolicy()
    crashed = registry.start_audit("m", version, policy, 11, reference.sha256, attacks=True)
    registry.log_audit(crashed, "m", "error", ["ArtifactError: S3 down"], policy, False, {}, {}, None)
    assert registry.audit_to_retry(crashed, version, policy, reference.sha256) == (11, True, False)
    killed = registry.start_audit("m", version, policy, 12, reference.sha256, attacks=False)
    assert registry.audit_to_retry(killed, version, policy, reference.sha256) == (12, False, False)
    judged = registry.start_audit("m", version, policy, 13, reference.sha256)
    registry.log_audit(judged, "m", "failed", ["red drawn"], policy, False, {}, {}, None)
    with pytest.raises(RequestError, match="reached its verdict \\(failed\\)"):
        registry.audit_to_retry(judged, version, policy, reference.sha256)
    with pytest.raises(RequestError, match="policy_digest"):
        registry.audit_to_retry(crashed, version, AuditPolicy(max_acc_e=0.05), reference.sha256)
    with pytest.raises(RequestError, match="model_sha256"):
        registry.audit_to_retry(crashed, version, policy, "0" * 64)
    with pytest.raises(LookupError, match="to retry it"):
        registry.audit_to_retry("f" * 32, version, policy, reference.sha256)
    with pytest.raises(RequestError, match="32-character MLflow run id"):
        registry.audit_to_retry("../x", version, policy, reference.sha256)


def test_a_password_mlflow_repeats_in_its_own_message_never_reaches_one_of_ours(monkeypatch, capsys):
    """Issue 22, finding 6: the URL prefix was masked, but MLflow's message repeated the full URL."""
    import typer
    from mlflow.exceptions import MlflowException

    from cli.app import report_errors
    from tasks import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pa%40ss-w0rd@127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    echoed = "API request to http://alice:pa%40ss-w0rd@127.0.0.1:1/api/2.0/mlflow/runs/get failed (password pa@ss-w0rd)"
    with pytest.raises(RegistryError) as caught, registry._mlflow("reading a run"):
        raise MlflowException(echoed)
    assert "pa%40ss-w0rd" not in str(caught.value) and "pa@ss-w0rd" not in str(caught.value)
    assert "alice:***@127.0.0.1" in str(caught.value)
    from tasks.state import scrub

    assert "hunter22" not in scrub("postgresql://u@h/db?sslmode=require&password=hunter22 refused")
    assert "w0rd" not in scrub("http://alice:pa%40ss-w0rd@x") and "pa%40ss" not in scrub("got pa%40ss-w0rd back".upper().lower())
    for error in (caught.value, RuntimeError(f"{echoed}; key aws-secret-value"), LookupError(echoed)):
        def call(error=error):
            raise error

        with pytest.raises(typer.Exit):
            report_errors(call)
        printed = capsys.readouterr().err
        assert "w0rd" not in printed and "aws-secret-value" not in printed and "***" in printed, printed


@pytest.mark.parametrize("command, message", [
    (["audit", "x@"], "model reference 'x@' is not one of"),
    (["audit", "x/abc"], "model reference 'x/abc' is not one of"),
    (["audit", "tm abc"], "model reference 'tm abc' is not one of"),
    (["restore", "x/0", "cat"], "model reference 'x/0' is not one of"),
    (["takedown", "m@", "cat", "--anchor", "dog"], "model reference 'm@' is not one of"),
    (["promote", "x", "abc"], "version 'abc' is not a version number"),
    (["policy", "show", "x@y"], "model name 'x@y'"),
])
def test_a_bad_model_reference_is_a_message_before_anything_starts(monkeypatch, tmp_path, command, message):
    """Issue 22, finding 15: `tm abc`, `x@` and `x/abc` were tracebacks, after a Prefect server had started."""
    from typer.testing import CliRunner

    from cli import pipeline
    from cli.main import app

    def started(*args, **kwargs):
        raise AssertionError("the state folder or Prefect was touched before the reference was checked")

    monkeypatch.setattr(pipeline, "_private_state", started)
    monkeypatch.setattr(pipeline, "_start_prefect", started)
    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_policy_whose_probe_file_changed_is_replaced_with_a_reason_and_tightening_needs_none(reference, tmp_path):
    """Review: a policy whose probe file changed could not be set again (the command meant to fix
    it failed the same way), and tightening a policy with a probe file was called loosening."""
    from erasure.audit.policy import AuditPolicy
    from tasks import registry

    register(reference)
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "a cat", "concept": "cat", "expected": "absent"}\n')
    assert registry.set_deployment_policy("m", AuditPolicy(probe_file=probes, max_acc_e=0.08)) == []
    assert registry.set_deployment_policy("m", AuditPolicy(probe_file=probes, max_acc_e=0.05)) == []  # stricter
    probes.write_text('{"prompt": "a dog", "concept": "cat", "expected": "absent"}\n')
    with pytest.raises(RegistryError, match="not the policy that was set"):
        registry.deployment_policy("m")
    with pytest.raises(registry.PolicyRefused, match="cannot be read"):
        registry.set_deployment_policy("m", AuditPolicy(probe_file=probes, max_acc_e=0.05))
    registry.set_deployment_policy("m", AuditPolicy(probe_file=probes, max_acc_e=0.05), reason="probes revised")
    assert registry.deployment_policy("m").max_acc_e == 0.05
