"""audit: a scheduled compliance check. Can the served model still draw what it must not?

The deployment's policy decides (``erasure.audit.policy``), never the audited request: a
registered model's is kept in the registry (``erasure policy set``), never read from
whoever runs the audit or the promotion.
A registered version is audited on the artifact it serves (the reference inside
its logged pyfunc, checked against its recorded digest), not on what its editable
tags say. Every audit is an MLflow run, passed or not.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from prefect import flow, get_run_logger

from erasure.audit.policy import AuditPolicy, judge_verdict, load_policy, parse_policy
from erasure.errors import LeakFound, NoVerdict
from erasure.probes import SEEDS
from erasure.spec import RequestError, inside_input_root, parse_request, registered_request
from tasks.jobs import AuditJob, StageReport
from tasks.registry import (
    audit_to_retry,
    deployment_policy,
    log_audit,
    registration_changes,
    resolve,
    served_reference,
    start_audit,
    version_request,
)
from tasks.stages import audit_stage
from tasks.store import ArtifactMismatch


class ConceptLeak(LeakFound, RuntimeError):
    """The audited model breaks the policy (a concept leaked, specificity lost, an attack succeeded,
    or the artifact is not the one registered)."""


class AuditInconclusive(NoVerdict, RuntimeError):
    """Nothing could be proved: a judge cannot see a concept on the base model, or an attack fails
    even there. Never a pass."""


@flow(name="audit")
def audit_flow(
    model: str, policy: dict | None = None, workers: int = 1, attacks: bool = False, seed: int | None = None,
    request: dict | None = None, policy_file: str | None = None, retry_of: str | None = None,
) -> dict:
    """Audit a registered model (NAME, NAME@ALIAS, NAME/VERSION) against the request it was erased
    with, or any model folder against ``request``. The policy: ``policy`` or the ``policy_file`` it
    names; else a registered model's deployment policy (``tasks.registry.deployment_policy``), and
    a folder's the built-in one (``audit-policy.yaml`` spells it out). ``seed`` reruns an earlier
    audit's probes (default: a new one, recorded). ``retry_of`` repeats an audit run that reached
    no verdict (an outage, a crash, a kill) on its own probes and attacks. Raises ``ConceptLeak``
    naming every failure, or ``AuditInconclusive``."""
    logger = get_run_logger()
    if retry_of is not None and (seed is not None or request is not None):
        raise RequestError("a retry repeats a registered version's audit on its own seed: give no seed and no request")
    # a seed given by hand reruns an audit: recorded as such, it never counts for a promotion
    seed_chosen = seed is not None
    version = reference = spec = None
    if request is None:
        version = resolve(model)
        reference = served_reference(version)
        policy = audit_policy(policy, policy_file, version.name)
        name, served_sha256 = version.name, reference.sha256
        target, label = reference, f"{version.name} version {version.version}"
        if retry_of is not None:
            seed, attacks, seed_chosen = audit_to_retry(retry_of, version, policy, served_sha256)
    else:
        policy = audit_policy(policy, policy_file)
        spec = parse_request(request)
        name, served_sha256 = model.replace("builtin:", "builtin-").replace("/", "-").strip("-.") or "model", None
        if model == spec.model:
            target, label = None, model  # the base model itself
        else:  # a folder on the runner: only under $ERASURE_INPUT_ROOT where the operator set one
            target, label = inside_input_root(Path(model).expanduser().resolve(), "model"), model
    seed = secrets.randbelow(SEEDS) if seed is None else int(seed)

    # recorded before anything is read from the registration or sampled: an audit stopped before its
    # verdict still counts, as not passed
    run_id = start_audit(name, version, policy, seed, served_sha256, seed_chosen, attacks, retry_of)
    logger.info("audit of %s started (seed %d, MLflow run %s)", model, seed, run_id)
    try:
        outcome, reasons, result = _judge(version, reference, spec, target, label, policy, seed, attacks, workers)
    except BaseException as error:  # a crash, an outage, an interrupt: no verdict, and on record as such
        reasons = [f"the audit did not reach a verdict: {type(error).__name__}: {error}"]
        try:
            log_audit(run_id, name, "error", reasons, policy, False, {}, {}, None)
        except Exception as logging_error:  # noqa: BLE001 (the run stays 'started', which blocks promotion too)
            logger.warning("could not record the audit's error in MLflow run %s: %s", run_id, logging_error)
        raise
    attacks_run = result is not None and attacks and bool(policy.attacks)
    result = result or StageReport({}, None)
    log_audit(run_id, name, outcome, reasons, policy, attacks_run, result.metrics, result.summary, result.report_html)
    return _verdict(logger, model, outcome, reasons, seed, run_id, result)


def _judge(version, reference, spec, target, label, policy, seed, attacks, workers) -> tuple[str, list[str], StageReport | None]:
    """The audit's outcome, its reasons and the worker's result (None when nothing was sampled)."""
    if version is not None:
        try:
            spec = registered_request(version_request(version))
        except RequestError as error:  # the registration cannot be read back: not what was registered
            return "failed", [f"the version's request.json does not load: {error}"], None
        failures = registration_changes(version, reference, spec)
        if failures:  # nothing to sample: the registration itself is not what it claims
            return "failed", failures, None
    try:
        result = audit_stage(AuditJob(spec, target, policy, seed, attacks, label), workers)
    except ArtifactMismatch as error:  # read whole, and not what was registered: a verdict on the version
        return "failed", [f"the served artifact does not match its registration: {error}"], None
    except (NoVerdict, RequestError) as error:  # nothing was judged (no judge, one that does not load or
        return "inconclusive", [str(error)], None  # calibrate, bad probes): recorded, and never a pass
    verdict = judge_verdict(result.metrics, policy, result.summary["calibration"], result.summary["attacks"])
    return verdict.outcome, verdict.failures + verdict.inconclusive, result


BUNDLED_POLICY = Path(__file__).resolve().parents[1] / "audit-policy.yaml"  # the deployment's, shipped with it


def audit_policy(settings: dict | None, policy_file: str | None, registered: str | None = None) -> AuditPolicy:
    """The policy from its settings or its file; given neither, registered model ``registered``'s
    deployment policy, else the built-in one. A file is the deployment's own (``audit-policy.yaml``
    beside the flows) or lies under $ERASURE_INPUT_ROOT where the operator set one: a run parameter
    must not make the worker read its other files."""
    if settings is not None and policy_file is not None:
        raise RequestError("give the audit policy as settings or as a file, not both")
    if settings is None and policy_file is None and registered is not None:
        return deployment_policy(registered)
    if policy_file is None:
        return parse_policy(settings, "audit policy")
    path = Path(policy_file).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    return load_policy(path if path == BUNDLED_POLICY else inside_input_root(path, "policy_file"))


def _verdict(logger, model: str, outcome: str, reasons: list[str], seed: int, run_id: str, result: StageReport) -> dict:
    """The audit's result once logged; a failed or inconclusive one is raised, carrying its numbers."""
    flat = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    logger.info("audit of %s (seed %d): %s %s", model, seed, outcome, json.dumps(flat))
    out = {"outcome": outcome, "reasons": reasons, "metrics": flat, "summary": result.summary, "seed": seed, "run_id": run_id}
    if outcome != "passed":
        error = (ConceptLeak if outcome == "failed" else AuditInconclusive)(
            f"{model}: audit {outcome} (seed {seed}, MLflow run {run_id}): " + "; ".join(reasons)
        )
        error.result = out  # the numbers, for whoever reports the failure
        raise error
    return out

__all__ = ["AuditInconclusive", "ConceptLeak", "audit_flow"]
