"""MLflow: every flow run is a run; every erased model a registered version with its lineage.

Embedded default: tracking and registry in a SQLite file (``mlflow.db`` in the local
state folder, ``tasks.state``);
set ``MLFLOW_TRACKING_URI`` to use an MLflow server.

- A version holds no weights: its pyfunc is logged as code (``tasks/pyfunc_model.py``,
  no pickle) with a ``model_config`` that names the erased model in the artifact store
  by key and content digest. Versions of the same weights share one store artifact.
- Registration is idempotent: an identical registration (same request, model key,
  flow and parent) reuses its version instead of adding one.
- A version is complete once tagged ``erasure.status=ready``, the last step after its
  alias moved. Lookups skip versions still ``pending`` (an interrupted registration);
  the re-run completes them.
- The MLflow client fails fast (short timeouts, two retries) and an unreachable or
  failing server raises ``RegistryError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from erasure.errors import ErasureError
from erasure.spec import ErasureRequest, RequestError
from tasks.jobs import ModelReference
from tasks.state import private_dir, scrub, state_dir, without_password

CANDIDATE, PRODUCTION = "candidate", "production"
STATUS_TAG, READY, PENDING = "erasure.status", "ready", "pending"
IDENTITY_TAGS = ("request_hash", "model_key", "flow", "parent_version")  # what makes two registrations the same
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CLIENT_DEFAULTS = {  # fail within about a minute when the server is down (MLflow's own defaults retry for minutes)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_LOGICAL = {"RESOURCE_ALREADY_EXISTS", "INVALID_PARAMETER_VALUE"}


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_model_name(name: str) -> str:
    """A registered model's name: 1-100 letters, digits, '.', '_' or '-' (it appears in
    experiment names, URIs, lock keys and file names)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise RequestError(
            f"model name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class RegistryError(ErasureError, RuntimeError):
    """The MLflow server cannot be reached or failed a request."""


def tracking_uri() -> str:
    """The tracking URI as messages may show it: a password in it is replaced by ``***``."""
    return without_password(mlflow.get_tracking_uri())


def experiment(name: str) -> str:
    """Make ``erasure/<name>`` the active experiment and return its id. With the embedded SQLite
    default its run artifacts go to the private state folder, not to ``./mlruns`` in whatever
    folder this runs in."""
    title = f"erasure/{name}"
    if mlflow.get_tracking_uri().startswith("sqlite:") and mlflow.get_experiment_by_name(title) is None:
        location = private_dir(state_dir() / "mlflow-artifacts")
        try:
            mlflow.create_experiment(title, artifact_location=location.as_uri())
        except MlflowException:
            pass  # created by a concurrent flow a moment ago
    return mlflow.set_experiment(title).experiment_id


def configure() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (else the state folder's SQLite), with bounded client timeouts."""
    for variable, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{private_dir(state_dir()) / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@contextmanager
def _mlflow(what: str) -> Iterator[None]:
    """Not-found -> ``LookupError``; outages and server errors -> ``RegistryError`` naming the server."""
    try:
        yield
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message  # a missing alias
        ):
            raise LookupError(scrub(f"{what}: {error.message}")) from None
        if error.error_code in _LOGICAL:
            raise
        # MLflow's own message repeats the request's full URL, password and all
        raise RegistryError(scrub(f"MLflow at {tracking_uri()}: {what} failed: {error.message}")) from None
    except OSError as error:  # requests' connection errors and timeouts are OSErrors
        raise RegistryError(scrub(f"MLflow at {tracking_uri()}: {what} failed: {error}")) from None


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "diffusers", "transformers", "peft", "safetensors", "mlflow", "boto3")] + [
        f"erasure=={version('erasure')}"
    ]


def is_ready(version) -> bool:
    """Complete: tagged ready, or registered before the status tag existed."""
    return version.tags.get(STATUS_TAG, READY) == READY


@dataclass
class RegisteredVersion:
    """A registered model version as the flows use it: name, version, its run and tags, and what its registration did."""

    name: str
    version: str
    run_id: str
    tags: dict
    candidate: bool = False  # the candidate alias points at it (moved by this registration)
    reused: bool = False  # an identical, finished registration existed: nothing new was logged
    note: str = ""  # why the candidate alias did not move


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _same_registrations(client: MlflowClient, name: str, tags: dict) -> list:
    found = client.search_model_versions(
        f"name='{_quote(name)}' and tags.request_hash='{_quote(tags['request_hash'])}' "
        f"and tags.model_key='{_quote(tags['model_key'])}'"
    )
    return sorted(
        (v for v in found if all(v.tags.get(k, "") == tags.get(k, "") for k in IDENTITY_TAGS)),
        key=lambda v: int(v.version),
    )


def register_erased_model(
    name: str,
    reference: ModelReference,
    request_json: str,
    tags: dict,
    params: dict,
    metrics: dict,
    report_html: str | None,
    concept_keys: list[str],
    move_candidate: bool = True,
) -> RegisteredVersion:
    """Register the erased model that ``reference`` names in the artifact store (``store_url``,
    ``s3_endpoint``, ``model_key``, ``sha256``) as a version of ``name``, with a run that logs
    params, metrics, request, concept keys and report; move ``candidate`` to it if ``move_candidate``.

    Idempotent: a complete version of the same registration (``IDENTITY_TAGS``) is reused and an
    interrupted one (``pending``) is completed. Call it under the model's lock (``tasks.locks``).
    """
    configure()
    client = MlflowClient()
    tags = {k: str(v) for k, v in tags.items()}
    missing = [k for k in IDENTITY_TAGS if k not in tags]
    if missing:
        raise ValueError(f"registration tags lack {', '.join(missing)}")
    with _mlflow(f"registering a version of {name!r}"):
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        same = _same_registrations(client, name, tags)
        ready = [v for v in same if is_ready(v)]
        version = (ready or same or [None])[0]
        for duplicate in same:  # interrupted attempts of this registration, never completed
            if duplicate is not version and not is_ready(duplicate):
                client.delete_model_version(name, duplicate.version)
        reused = version is not None and is_ready(version)
        if version is None:
            version = _log_and_create(client, name, reference, request_json, tags, params, metrics, report_html, concept_keys)
        if not is_ready(version):
            # complete before anything points at it: an alias never names an unfinished version
            client.set_model_version_tag(name, version.version, STATUS_TAG, READY)
        note = ""
        if move_candidate and reused:
            # An identical, finished registration: move candidate only to finish what a crashed run
            # left (candidate still at this version's parent); never move it back past later versions
            current = _alias_or_none(client, name, CANDIDATE)
            if current not in (None, str(version.version), tags.get("parent_version") or None):
                move_candidate = False
                note = (
                    f"identical to version {version.version}, registered before; {CANDIDATE} stays at version "
                    f"{current} (promote version {version.version} explicitly to go back to it)"
                )
        if move_candidate:
            client.set_registered_model_alias(name, CANDIDATE, version.version)
    return RegisteredVersion(
        name, str(version.version), version.run_id, tags, candidate=move_candidate, reused=reused, note=note
    )


def _alias_or_none(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _log_and_create(client, name, reference, request_json, tags, params, metrics, report_html, concept_keys):
    experiment(name)
    with mlflow.start_run(run_name=tags.get("flow", "erase")) as run:
        mlflow.log_params(params)
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tags({f"erasure.{k}": v for k, v in tags.items()})
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
            python_model=str(PYFUNC_CODE),  # models-from-code: no pickle
            # the request's hash too: an audit checks the request.json it reads against it
            model_config=dataclasses.replace(reference, request_hash=tags["request_hash"]).as_config(),
            pip_requirements=_requirements(),  # stated, not inferred: inference imports and samples the model
        )
    return client.create_model_version(
        name, model_info.model_uri, run_id=run.info.run_id, tags=tags | {STATUS_TAG: PENDING}, model_id=model_info.model_id
    )


ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}")
VERSION = re.compile(r"[1-9][0-9]{0,8}")
REFERENCE_FORMS = "NAME, NAME@ALIAS (e.g. models@production) or NAME/VERSION (e.g. models/3)"


def _split(reference: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, alias, version); anything else (an
    empty alias, a version that is not a number, a space in the name) is a ``RequestError``
    saying the forms, checked before any server is asked."""
    text = reference if isinstance(reference, str) else ""
    name, alias, number = text, None, None
    if "@" in text:
        name, alias = text.split("@", 1)
    elif "/" in text:
        name, number = text.rsplit("/", 1)
    valid = (
        MODEL_NAME.fullmatch(name) is not None
        and (alias is None or ALIAS.fullmatch(alias) is not None)
        and (number is None or VERSION.fullmatch(number) is not None)
    )
    if not valid:
        raise RequestError(f"model reference {reference!r} is not one of {REFERENCE_FORMS}")
    return name, alias, number


def check_reference(reference: str) -> str:
    """``reference`` if it is a registered-model reference in one of ``REFERENCE_FORMS``."""
    _split(reference)
    return reference


def is_explicit(reference: str) -> bool:
    """``NAME/VERSION``: one fixed version (not an alias, not the latest)."""
    return _split(reference)[2] is not None


def alias_version(name: str, alias: str = CANDIDATE) -> str | None:
    """The version ``alias`` points at, or None if the model or the alias does not exist."""
    configure()
    try:
        with _mlflow(f"resolving {name}@{alias}"):
            return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except LookupError:
        return None


def resolve(reference: str) -> RegisteredVersion:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> the version (``NAME`` alone: the latest complete one).
    An explicit version whose registration was interrupted is refused (its re-run completes it)."""
    configure()
    client = MlflowClient()
    name, alias, number = _split(reference)
    with _mlflow(f"resolving {reference!r}"):
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias)
        elif number is not None:
            version = client.get_model_version(name, number)
            if not is_ready(version):
                raise LookupError(
                    f"{name} version {number} is incomplete (its registration was interrupted); "
                    "re-run the flow that created it"
                )
        else:
            versions = [v for v in client.search_model_versions(f"name='{_quote(name)}'") if is_ready(v)]
            if not versions:
                raise LookupError(f"no registered model {name!r} in {tracking_uri()}")
            version = max(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, str(version.version), version.run_id, dict(version.tags))


def version_request(version: RegisteredVersion) -> str:
    """The ``request.json`` a version was registered with, as text."""
    with _mlflow(f"reading the request of {version.name} version {version.version}"), tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="request.json", dst_path=folder)
        return Path(path).read_text()


def version_lineage(version: RegisteredVersion, request: ErasureRequest) -> tuple[list[str], str] | None:
    """The concept keys a version was fused from (its ``concept_keys.json``) and its prior's key,
    both checked against the model key its own logged pyfunc serves (which commits to them); None
    when they cannot be read or do not give that key (registered before versions logged them, by
    an earlier key scheme, or edited). ``request``: its verified request."""
    from tasks.keys import model_key, prior_key

    base = version.tags.get("base_fingerprint", "")
    try:
        with _mlflow(f"reading the concept keys of {version.name} version {version.version}"), tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="concept_keys.json", dst_path=folder)
            keys = json.loads(Path(path).read_text())
        served = served_reference(version)
    except (RegistryError, LookupError, OSError, ValueError):
        return None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        keys = None
    tagged = version.tags.get("prior_key")
    if keys is not None and served.model_key == model_key(base, keys, request):
        return keys, prior_key(base, request)  # fused from the request's own prior
    if keys is not None and tagged and served.model_key == model_key(base, keys, request, tagged):
        return keys, tagged
    # edited after registration, or keyed by an earlier release: nothing of it is trusted, so
    # every concept is made anew from the request (slower, never wrong)
    return None


def registration_changes(version: RegisteredVersion, served: ModelReference, request: ErasureRequest) -> list[str]:
    """How a registered version is no longer what was registered, judged by what its own logged
    pyfunc recorded: its ``request.json`` (the request's hash) or its ``model_key`` tag edited
    afterwards. Empty when it is as registered."""
    from tasks.keys import request_hash

    changes = []
    if served.request_hash and request_hash(request) != served.request_hash:
        changes.append(
            f"the version's request.json is not the request it was registered with (hash {request_hash(request)}, "
            f"registered {served.request_hash}): it was edited after registration"
        )
    if version.tags.get("model_key") != served.model_key:
        # the tag that lineage and takedowns read no longer names what the version serves
        changes.append(
            f"the version's model_key tag ({version.tags.get('model_key')}) is not the model it serves "
            f"({served.model_key}): its tags were edited after registration"
        )
    return changes


def verified_request(version: RegisteredVersion) -> ErasureRequest:
    """The request a version was registered with, refused when the version is no longer what was
    registered (``registration_changes``): a takedown or restore must never rebuild a model from a
    request someone changed (it could drop an erased concept)."""
    from erasure.spec import registered_request

    request = registered_request(version_request(version))
    try:
        served = served_reference(version)
    except LookupError:  # registered before versions logged what they serve: nothing recorded to check against
        return request
    changes = registration_changes(version, served, request)
    if changes:
        raise RequestError(f"{version.name} version {version.version}: " + "; ".join(changes) + ". Build on another version")
    return request


def served_reference(version: RegisteredVersion) -> ModelReference:
    """What the version serves: the model reference inside its own logged pyfunc, which
    ``mlflow.pyfunc.load_model`` uses; not its editable ``model_key`` tag."""
    from mlflow.models import Model

    with _mlflow(f"reading the served model of {version.name} version {version.version}"):
        config = Model.load(f"models:/{version.name}/{version.version}").flavors.get("python_function", {}).get("config")
    return ModelReference.from_config(config, f"{version.name} version {version.version}")


AUDIT_RUN = "audit"
COMPLETE_TAG = "erasure.complete"  # set last: an audit run without it never reached its verdict (it blocks promotion)
AUDIT_PAGE = 1000  # runs per search page (MLflow's own maximum is 50,000)
MAX_TAG_CHARS = 4000


def _metric_key(text: str) -> str:
    """A concept name as MLflow accepts it in a metric key, with a hash of the name itself so that
    names differing only in other characters ("mickey?", "mickey!") stay apart."""
    import hashlib

    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", text)[:80] + "-" + hashlib.sha256(text.encode()).hexdigest()[:6]


STARTED = "started"  # an audit's outcome tag until it completes: promote counts it as not passed


ERROR = "error"  # an audit that reached no verdict (an outage, a crash): only its retry settles it
VERDICTS = ("passed", "failed", "inconclusive")


def start_audit(
    name: str, version: RegisteredVersion | None, policy, seed: int, served_sha256: str | None, seed_chosen: bool = False,
    attacks: bool = False, retry_of: str | None = None,
) -> str:
    """Record an audit before it samples: an MLflow run tagged with what it audits (the version,
    the policy's digest, the served artifact's sha256, the seed, whether it runs attacks, the
    run it retries) and the outcome ``started``. ``log_audit`` completes it; killed or crashed
    first, it stays so, and ``promote`` counts it as not passed until a retry on the same probes
    completes: an audit cannot be made to vanish by stopping it before its verdict."""
    configure()
    tags = (
        {
            "erasure.flow": AUDIT_RUN, "erasure.outcome": STARTED, "erasure.passed": "False",
            "erasure.policy_digest": policy.digest(), "erasure.seed": str(seed), "erasure.seed_chosen": str(seed_chosen),
            "erasure.attacks_requested": str(bool(attacks)),
        }
        | ({"erasure.version": version.version} if version else {})
        | ({"erasure.model_sha256": served_sha256} if served_sha256 else {})
        | ({"erasure.retry_of": retry_of} if retry_of else {})
    )
    with _mlflow(f"recording the start of an audit of {name}"):
        # created, not started: the run stays RUNNING until log_audit ends it
        return MlflowClient().create_run(experiment(name), run_name=AUDIT_RUN, tags=tags).info.run_id


def log_audit(
    run_id: str, name: str, outcome: str, reasons: list[str], policy, attacks_run: bool, metrics: dict, summary: dict,
    report_html: str | None,
) -> None:
    """Complete the audit run ``start_audit`` opened: the verdict and its reasons, the policy (as
    params and as a file), every metric overall and per concept (history over nightly audits),
    attack success, and the HTML report; the completion tag last."""
    configure()
    reasons = [scrub(reason) for reason in reasons]  # an error's message may quote a server's URL
    with _mlflow(f"logging the audit of {name}"):
        experiment(name)
    with _mlflow(f"logging the audit of {name}"), mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags({
            "erasure.outcome": outcome, "erasure.passed": str(outcome == "passed"),
            "erasure.reasons": "; ".join(reasons)[:MAX_TAG_CHARS], "erasure.attacks": "run" if attacks_run else "skipped",
        })
        seed = run.data.tags.get("erasure.seed")
        policy_params = {f"policy.{k}": v for k, v in policy.model_dump(mode="json").items() if not isinstance(v, (dict, list))}
        mlflow.log_params({k: str(v)[:500] for k, v in policy_params.items()} | {"seed": seed, "attacks": attacks_run})
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        for row in metrics.get("concepts", []):
            prefix = f"{row['role']}.{_metric_key(row['concept'])}"
            values |= {f"{prefix}.{k}": float(row[k]) for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_g_phrasing", "acc_s") if k in row}
        for row in summary.get("attacks", []):
            values[f"attack.{row['attack']}.{_metric_key(row['concept'])}.asr"] = float(row["asr"])
            values[f"attack.{row['attack']}.{_metric_key(row['concept'])}.base_asr"] = float(row["base_asr"])
        mlflow.log_metrics(values)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            record = {
                "outcome": outcome, "reasons": reasons, "policy": policy.model_dump(mode="json"), "metrics": metrics,
                "summary": summary,
            }
            (folder / "audit.json").write_text(json.dumps(record, indent=1, default=str))
            mlflow.log_artifact(str(folder / "audit.json"))
            if report_html is not None:
                (folder / "audit_report.html").write_text(report_html)
                mlflow.log_artifact(str(folder / "audit_report.html"))
        mlflow.set_tag(COMPLETE_TAG, "true")


def version_audits(name: str, version: str, policy_digest: str | None, served_sha256: str) -> list:
    """Every audit run of ``name`` version ``version`` of the artifact ``served_sha256`` (under the
    policy ``policy_digest``; None: under any), newest first: completed ones, those that never
    completed (still running, killed or crashed) and deleted ones. Paged through, however many."""
    configure()
    client = MlflowClient()
    with _mlflow(f"looking up audits of {name} version {version}"):
        found = client.get_experiment_by_name(f"erasure/{name}")
        if found is None:
            return []
        if found.lifecycle_stage == "deleted":
            raise RegistryError(
                f"the MLflow experiment erasure/{name} is deleted, and with it the view of {name}'s audits: "
                f"restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`) first"
            )
        runs, token = [], None
        while True:
            page = client.search_runs(
                [found.experiment_id],
                f"tags.`erasure.flow` = '{AUDIT_RUN}' and tags.`erasure.version` = '{_quote(version)}' "
                + (f"and tags.`erasure.policy_digest` = '{_quote(policy_digest)}' " if policy_digest else "")
                + f"and tags.`erasure.model_sha256` = '{_quote(served_sha256)}'",
                run_view_type=ViewType.ALL,  # a deleted run still counts: deleting a failure must not hide it
                order_by=["attributes.start_time DESC"], max_results=AUDIT_PAGE, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs


def audit_to_retry(run_id: str, version: RegisteredVersion, policy, served_sha256: str) -> tuple[int, bool, bool]:
    """The seed, attacks flag and seed-chosen flag of audit run ``run_id``, which reached no verdict,
    for its retry: the same probes and the same attacks, so that stopping an audit and retrying it
    can never draw new probes. Refused for a run that reached its verdict or audited anything else."""
    if not re.fullmatch(r"[0-9a-f]{32}", run_id or ""):
        raise RequestError(f"--retry {run_id!r}: give the 32-character MLflow run id an audit printed or recorded")
    with _mlflow(f"reading audit run {run_id} to retry it"):  # missing: LookupError; an outage: RegistryError
        run = MlflowClient().get_run(run_id)
        found = MlflowClient().get_experiment_by_name(f"erasure/{version.name}")
    tags = run.data.tags
    expected = {
        "erasure.flow": AUDIT_RUN, "erasure.version": version.version, "erasure.policy_digest": policy.digest(),
        "erasure.model_sha256": served_sha256,
    }
    differs = [key.removeprefix("erasure.") for key, value in expected.items() if tags.get(key) != value]
    if differs or found is None or run.info.experiment_id != found.experiment_id:
        raise RequestError(
            f"run {run_id} is not an audit of {version.name} version {version.version}'s served artifact under this policy "
            f"({', '.join(differs) or 'experiment'} differ): a retry repeats that audit exactly"
        )
    if completed(run) and tags.get("erasure.outcome") in VERDICTS:
        raise RequestError(
            f"audit run {run_id} reached its verdict ({tags['erasure.outcome']}); only an audit without one "
            "(an error, or one that never completed) is retried"
        )
    try:
        seed = int(tags["erasure.seed"])
    except (KeyError, ValueError):
        raise RequestError(f"audit run {run_id} records no seed, so it cannot be repeated") from None
    # recorded before attacks were: assume they were asked for, the stricter reading
    attacks = tags.get("erasure.attacks_requested", "True") == "True"
    return seed, attacks, tags.get("erasure.seed_chosen") == "True"


def completed(run) -> bool:
    """Whether an audit run reached its verdict: finished, with the completion tag written last."""
    return run.info.status == "FINISHED" and run.data.tags.get(COMPLETE_TAG) == "true"


def audit_record(run_id: str) -> dict:
    """The ``audit.json`` an audit run logged: outcome, reasons, policy, metrics, summary."""
    with _mlflow(f"reading audit run {run_id}"), tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="audit.json", dst_path=folder)
        return json.loads(Path(path).read_text())


POLICY_TAG, POLICY_DIGEST_TAG = "erasure.audit_policy", "erasure.audit_policy_digest"  # on the registered model
POLICY_RUN = "policy"


def deployment_policy(name: str):
    """The policy registered model ``name`` is audited and promoted under: the one set with
    ``set_deployment_policy`` (a tag on the registered model), else the built-in default. Never
    the environment of whoever audits or promotes: a laxer policy there proves nothing."""
    from erasure.audit.policy import AuditPolicy, parse_policy

    configure()
    with _mlflow(f"reading the deployment policy of {name}"):
        tags = MlflowClient().get_registered_model(name).tags
    text = tags.get(POLICY_TAG)
    if text is None:
        return AuditPolicy()
    where = f"the deployment policy of {name} (registered model tag {POLICY_TAG})"
    try:
        policy = parse_policy(json.loads(text), where)
    except (json.JSONDecodeError, RequestError) as error:
        raise UnreadablePolicy(f"{where} does not load ({error}): set it again with `erasure policy set {name} FILE`") from None
    if policy.digest() != tags.get(POLICY_DIGEST_TAG):
        raise UnreadablePolicy(
            f"{where} is not the policy that was set (digest {policy.digest()}, recorded {tags.get(POLICY_DIGEST_TAG)}): "
            f"its tags or its probe file changed since; set it again with `erasure policy set {name} FILE`"
        )
    return policy


class UnreadablePolicy(RegistryError):
    """The deployment policy on record does not load, or is not the one that was set."""


class PolicyRefused(ErasureError, RuntimeError):
    """A deployment policy that judges more leniently than the current one, with no reason given."""

    retry_helps = False


def set_deployment_policy(name: str, policy, reason: str | None = None) -> list[str]:
    """Make ``policy`` registered model ``name``'s deployment policy. One that judges more
    leniently than the current one (``erasure.audit.policy.loosening``) needs ``reason``. Every
    change is logged as an MLflow run (who, the previous and new digests, what it loosens, why)
    before the registered model's tags change. Returns what it loosens."""
    import getpass

    from erasure.audit.policy import loosening

    try:
        current = deployment_policy(name)
        looser = loosening(current, policy)
    except UnreadablePolicy as error:  # edited, or its probe file changed: replacing it is a judgement to sign
        current, looser = None, [f"the current policy cannot be read ({error})"]
    if looser and not (reason and reason.strip()):
        raise PolicyRefused(
            f"the new policy for {name} judges more leniently than the current one ({'; '.join(looser)}): "
            "give --reason REASON (logged) if that is the deployment's decision"
        )
    experiment(name)
    with _mlflow(f"logging the policy change of {name}"), mlflow.start_run(run_name=POLICY_RUN):
        mlflow.set_tags({
            "erasure.flow": POLICY_RUN, "erasure.previous_policy_digest": current.digest() if current else "unreadable",
            "erasure.policy_digest": policy.digest(), "erasure.changed_by": getpass.getuser(),
            "erasure.loosens": "; ".join(looser)[:MAX_TAG_CHARS], "erasure.reason": (reason or "")[:MAX_TAG_CHARS],
        })
        mlflow.log_text(policy.model_dump_json(indent=1), "policy.json")
    client = MlflowClient()
    with _mlflow(f"setting the deployment policy of {name}"):
        client.set_registered_model_tag(name, POLICY_TAG, policy.model_dump_json())
        client.set_registered_model_tag(name, POLICY_DIGEST_TAG, policy.digest())
    return looser


class PromotionRefused(ErasureError, RuntimeError):
    """A version without a passing audit under the current policy cannot be promoted."""

    retry_helps = False


def promote(name: str, version: str, alias: str = PRODUCTION, override_reason: str | None = None) -> str:
    """Point ``alias`` at ``version``. Every alias but ``candidate`` needs a passing audit of that
    version under the deployment's policy (``deployment_policy``; see ``_check_audit``);
    ``override_reason`` skips the check. Every promotion is logged as an MLflow run (who, what,
    under which policy, why). Returns how it was allowed."""
    import getpass

    configure()
    client = MlflowClient()
    with _mlflow(f"point {name}@{alias} at version {version}"):
        found = client.get_model_version(name, version)  # a missing version is a LookupError, not an alias to nowhere
        if not is_ready(found):
            raise LookupError(f"{name} version {version} is incomplete (its registration was interrupted)")
    policy = deployment_policy(name)
    if alias == CANDIDATE:
        how = "no audit needed for the candidate alias"
    elif override_reason:
        how = f"audit overridden: {override_reason}"
    else:
        how = _check_audit(name, str(version), policy)
    experiment(name)
    with _mlflow(f"logging the promotion of {name} version {version}"), mlflow.start_run(run_name="promote"):
        mlflow.set_tags({
            "erasure.flow": "promote", "erasure.version": str(version), "erasure.alias": alias,
            "erasure.policy_digest": policy.digest(), "erasure.promoted_by": getpass.getuser(),
            "erasure.how": how[:MAX_TAG_CHARS], "erasure.override": str(bool(override_reason) and alias != CANDIDATE),
        })
    with _mlflow(f"point {name}@{alias} at version {version}"):
        client.set_registered_model_alias(name, alias, version)
    return how


def _check_audit(name: str, version: str, policy) -> str:
    """A version may be promoted when the artifact it serves (and its ``model_key`` tag still names
    it) has a passing audit under ``policy`` and no audit that did not pass: none failed,
    inconclusive, in error, or never completed (killed, crashed, still running), deleted or not.
    An audit rerun until it passes does not count. The passing run is re-judged from its logged
    record under the policy; an audit whose seed was chosen by hand (a rerun) or a deleted run
    does not count as the pass; with attacks in the policy, the pass must have run them."""
    from erasure.audit.policy import judge_verdict

    digest = policy.digest()
    current = resolve(f"{name}/{version}")
    served = served_reference(current)
    fix = (
        f"run `erasure audit {name}/{version}{' --attacks' if policy.attacks else ''}` under the deployment's policy, "
        "or pass --override-audit REASON (logged)"
    )
    if current.tags.get("model_key") != served.model_key:
        raise PromotionRefused(f"{name} version {version}: its model_key tag no longer names the model it serves: {fix}")
    # every audit of this artifact, under any policy: changing the policy must not wipe a failure
    # or a killed audit (a tightening needs no reason, and any change gives a new digest)
    runs = version_audits(name, version, None, served.sha256)
    override = "only --override-audit REASON (logged) promotes this artifact now"
    # a retry repeats an audit's probes and attacks exactly: its own outcome replaces the missing verdict
    retried = {r.data.tags.get("erasure.retry_of") for r in runs if completed(r)}
    unsettled = [
        r for r in runs
        if (not completed(r) or r.data.tags.get("erasure.outcome") == ERROR) and r.info.run_id not in retried
    ]
    if unsettled:
        run = unsettled[0]
        state = "ended in an error" if completed(run) else "has not completed"
        raise PromotionRefused(
            f"{name} version {version}: an audit of it (run {run.info.run_id}, seed "
            f"{run.data.tags.get('erasure.seed', '?')}) {state}. It counts as not passed, and a fresh pass does not undo it: "
            f"if it is still running, wait for its verdict; else repeat it on the same probes with "
            f"`erasure audit {name}/{version} --retry {run.info.run_id}` (under the policy it ran under), "
            f"or {override.removeprefix('only ')}"
        )
    bad = [r for r in runs if completed(r) and r.data.tags.get("erasure.outcome") not in ("passed", ERROR)]
    if bad:
        raise PromotionRefused(
            f"{name} version {version}: an audit of it did not pass "
            f"({bad[0].data.tags.get('erasure.outcome', 'failed')}, run {bad[0].info.run_id}: "
            f"{bad[0].data.tags.get('erasure.reasons', '')[:500]}); a later pass, under this policy or another, "
            f"does not undo it: {override}"
        )
    passes = [
        r for r in runs
        if r.data.tags.get("erasure.policy_digest") == digest and completed(r)
        and r.data.tags.get("erasure.outcome") == "passed"
        and r.info.lifecycle_stage != "deleted" and r.data.tags.get("erasure.seed_chosen") != "True"
        and (not policy.attacks or r.data.tags.get("erasure.attacks") == "run")
    ]
    if not passes:
        raise PromotionRefused(
            f"{name} version {version} has no audit under the current policy ({digest})"
            + (" with its attacks" if policy.attacks else "") + f" on a seed of its own: {fix}"
        )
    record = audit_record(passes[0].info.run_id)
    summary = record.get("summary") or {}
    verdict = judge_verdict(record["metrics"], policy, summary.get("calibration"), summary.get("attacks"))
    if verdict.outcome != "passed":
        raise PromotionRefused(
            f"{name} version {version}: the record of audit run {passes[0].info.run_id} does not pass the current policy "
            f"({'; '.join(verdict.failures + verdict.inconclusive)[:500]}): {fix}"
        )
    return f"audit passed (run {passes[0].info.run_id})"
