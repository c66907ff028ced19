"""The audit flow's own decisions, without servers: MLflow in SQLite, the worker's audit in-process."""

import logging

import pytest
import typer

from erasure.spec import RequestError

REQUEST = {
    "model": "CompVis/stable-diffusion-v1-4",
    "concepts": [{"name": "snoopy", "anchor": "a dog"}],
    "preserve": {"concepts": ["mickey mouse"]},
}


@pytest.fixture
def embedded_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / ".erasure"))
    monkeypatch.delenv("ERASURE_ALLOWED_JUDGES", raising=False)


def test_a_judge_that_does_not_load_is_an_inconclusive_audit_run_not_an_escaped_error(embedded_mlflow, monkeypatch):
    """A policy naming a judge not on the worker's allow-list used to escape the flow as a
    JudgeLoadError: no audit run, and a traceback for the user."""
    from mlflow.tracking import MlflowClient

    import flows.audit as audit_module
    from erasure.audit.run import run_audit
    from tasks.registry import completed

    monkeypatch.setattr(audit_module, "get_run_logger", lambda: logging.getLogger("audit-test"))
    # the worker's audit, in this process; it loads the judge before it samples anything
    monkeypatch.setattr(audit_module, "audit_stage", lambda job, workers: run_audit(None, None, job.request, job.policy, job.seed))
    policy = {"judges": {"object": {"entry_point": "my_judges:make"}}, "attacks": []}
    with pytest.raises(audit_module.AuditInconclusive, match="not allowed here") as caught:
        audit_module.audit_flow.fn(REQUEST["model"], policy, request=REQUEST)
    assert caught.value.exit_code == 3
    run = MlflowClient().get_run(caught.value.result["run_id"])
    assert run.data.tags["erasure.outcome"] == "inconclusive" and completed(run)
    assert "ERASURE_ALLOWED_JUDGES" in run.data.tags["erasure.reasons"]


def test_every_product_error_reaches_the_user_as_its_message_and_exit_code(capsys):
    from cli.app import report_errors
    from erasure.errors import ErasureError
    from erasure.evaluation.judges import JudgeLoadError
    from flows.audit import ConceptLeak
    from tasks.registry import RegistryError

    for error, code in ((JudgeLoadError("judge x is not allowed here"), 3), (RegistryError("MLflow at y: down"), 2),
                        (ConceptLeak("red drawn"), 1), (ZeroDivisionError("a bug"), 4)):
        assert isinstance(error, ErasureError) == (code != 4)  # a bug never exits 1, which says a concept leaked

        def call(error=error):
            raise error

        with pytest.raises(typer.Exit) as exited:
            report_errors(call)
        assert exited.value.exit_code == code
        assert str(error) in capsys.readouterr().err


def test_an_audit_that_crashes_is_recorded_as_an_error_and_the_crash_still_reaches_the_caller(embedded_mlflow, monkeypatch):
    from mlflow.tracking import MlflowClient

    import flows.audit as audit_module
    from tasks.registry import completed

    monkeypatch.setattr(audit_module, "get_run_logger", lambda: logging.getLogger("audit-test"))
    started = []
    real_start = audit_module.start_audit
    monkeypatch.setattr(audit_module, "start_audit", lambda *args: started.append(real_start(*args)) or started[-1])

    def crash(*args):
        raise MemoryError("the worker ran out of memory")

    monkeypatch.setattr(audit_module, "audit_stage", crash)
    with pytest.raises(MemoryError):
        audit_module.audit_flow.fn(REQUEST["model"], {"attacks": []}, request=REQUEST)
    run = MlflowClient().get_run(started[0])
    assert completed(run) and run.data.tags["erasure.outcome"] == "error"
    assert "MemoryError: the worker ran out of memory" in run.data.tags["erasure.reasons"]


def test_a_registered_version_whose_request_does_not_load_fails_its_audit_on_record(embedded_mlflow, monkeypatch):
    """Read before the audit was recorded, an unreadable request.json used to end every audit of the
    version without a run, leaving an earlier pass to count."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    import flows.audit as audit_module
    from tasks.jobs import ModelReference

    monkeypatch.setattr(audit_module, "get_run_logger", lambda: logging.getLogger("audit-test"))
    version = SimpleNamespace(name="m", version="1", tags={"model_key": "models/a"})
    monkeypatch.setattr(audit_module, "resolve", lambda model: version)
    monkeypatch.setattr(audit_module, "served_reference", lambda v: ModelReference("/store", "models/a", "s" * 64))
    monkeypatch.setattr(audit_module, "version_request", lambda v: "{not json")
    with pytest.raises(audit_module.ConceptLeak, match="request.json does not load") as caught:
        audit_module.audit_flow.fn("m/1", {"attacks": []})
    run = MlflowClient().get_run(caught.value.result["run_id"])
    assert run.data.tags["erasure.outcome"] == "failed" and run.data.tags["erasure.model_sha256"] == "s" * 64


def _registered(audit_module, monkeypatch, request=REQUEST):
    """A registered version m/1 whose request and served artifact read back as registered."""
    import json
    from types import SimpleNamespace

    from erasure.spec import parse_request
    from tasks.jobs import ModelReference
    from tasks.keys import request_hash

    monkeypatch.setattr(audit_module, "get_run_logger", lambda: logging.getLogger("audit-test"))
    version = SimpleNamespace(name="m", version="1", tags={"model_key": "models/a"})
    served = ModelReference("/store", "models/a", "s" * 64, request_hash(parse_request(request)))
    monkeypatch.setattr(audit_module, "resolve", lambda model: version)
    monkeypatch.setattr(audit_module, "served_reference", lambda v: served)
    monkeypatch.setattr(audit_module, "version_request", lambda v: json.dumps(request))
    return version


def test_a_store_outage_during_an_audit_is_an_error_on_record_not_a_failed_verdict(embedded_mlflow, monkeypatch):
    """Issue 22, finding 5: an S3 outage or one bad read was recorded as "failed", which blocks the
    version for good; only an artifact read whole that is not the registered one is a verdict."""
    from mlflow.tracking import MlflowClient

    import flows.audit as audit_module
    from tasks.registry import completed
    from tasks.store import ArtifactError, ArtifactMismatch

    _registered(audit_module, monkeypatch)
    started = []
    real_start = audit_module.start_audit
    monkeypatch.setattr(audit_module, "start_audit", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    for raised, outcome in (
        (ArtifactError("get models/a/manifest.json failed on s3://bucket: Could not connect to the endpoint URL"), "error"),
        (ArtifactMismatch("artifact 'models/a' has content 1234..., not the expected ssss..."), "failed"),
    ):
        def stage(job, workers, raised=raised):
            raise raised

        monkeypatch.setattr(audit_module, "audit_stage", stage)
        with pytest.raises(ArtifactError if outcome == "error" else audit_module.ConceptLeak):
            audit_module.audit_flow.fn("m/1", {"attacks": []})
        run = MlflowClient().get_run(started[-1])
        assert completed(run) and run.data.tags["erasure.outcome"] == outcome, outcome


def test_a_retry_repeats_the_audit_on_its_seed_and_attacks_and_names_the_run_it_settles(embedded_mlflow, monkeypatch):
    from mlflow.tracking import MlflowClient

    import flows.audit as audit_module
    from erasure.errors import NoVerdict
    from tasks.store import ArtifactError

    _registered(audit_module, monkeypatch)
    jobs = []

    def outage(job, workers):
        jobs.append(job)
        raise ArtifactError("get failed on s3://bucket: Could not connect")

    monkeypatch.setattr(audit_module, "audit_stage", outage)
    policy = {"max_acc_e": 0.2}
    with pytest.raises(ArtifactError):
        audit_module.audit_flow.fn("m/1", policy, attacks=True)
    first = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("erasure/m").experiment_id], "tags.`erasure.outcome` = 'error'"
    )[0]

    def judged(job, workers):
        jobs.append(job)
        raise NoVerdict("the judge is blind")

    monkeypatch.setattr(audit_module, "audit_stage", judged)
    with pytest.raises(audit_module.AuditInconclusive) as caught:
        audit_module.audit_flow.fn("m/1", policy, attacks=False, retry_of=first.info.run_id)  # attacks come from the run
    assert (jobs[1].seed, jobs[1].attacks) == (jobs[0].seed, True)
    retry = MlflowClient().get_run(caught.value.result["run_id"])
    assert retry.data.tags["erasure.retry_of"] == first.info.run_id and retry.data.tags["erasure.seed_chosen"] == "False"
    with pytest.raises(RequestError, match="reached its verdict"):  # the retry itself reached one
        audit_module.audit_flow.fn("m/1", policy, retry_of=retry.info.run_id)
    with pytest.raises(RequestError, match="give no seed"):
        audit_module.audit_flow.fn("m/1", policy, seed=3, retry_of=first.info.run_id)
