"""The pipeline's commands: flows (run, takedown, restore, audit), the registry (promote), local services.

The pipeline's packages (prefect, ray, boto3, mlflow) are imported only by the
commands that use them, so ``erase``/``generate``/``evaluate`` work without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.app import app, closure_line, console, fail, policy_app, report_errors, services_app, warn, workers_option
from erasure.probes import SEEDS
from erasure.spec import CONCEPT_KINDS

out = Console()


def _concepts(names: list[str], kind: str, anchor: str | None, synonyms: list[str]) -> list[dict]:
    return [{"name": n, "kind": kind, **({"anchor": anchor} if anchor else {}), "synonyms": synonyms} for n in names]


def _print_version(result: dict) -> None:
    alias = "alias candidate" if result.get("candidate", True) else "candidate not moved"
    state = "reused" if result.get("reused_version") else "registered"
    out.print(
        f"{state} [bold]{escape(result['name'])}[/] version {result['version']} ({alias}); "
        f"per-concept stages: {len(result['ran'])} ran, {len(result['reused'])} reused"
    )
    if result.get("seconds"):
        out.print("seconds: " + ", ".join(f"{stage} {value:.1f}" for stage, value in result["seconds"].items()),
                  highlight=False, soft_wrap=True)
    if result.get("note"):  # rebased on a newer candidate, or candidate left where another flow moved it
        out.print(f"note: {escape(result['note'])}", highlight=False)
    for name, found in result.get("aliases", {}).items():
        out.print(
            f"aliases of {escape(name)} found in the base model, erased with it: {escape(', '.join(found)) or 'none'} "
            "(a concept's exclude_aliases keeps one drawing)", highlight=False, soft_wrap=True,
        )
    if result.get("closure"):  # fusion.closure ran in this flow's fuse
        out.print(closure_line(result["closure"], "closure.json in the model's artifact"), highlight=False, soft_wrap=True)
    if result.get("metrics"):
        out.print(json.dumps(result["metrics"]))


def _reference(model: str) -> str:
    """A registered-model reference checked before any server or worker starts."""
    from erasure.spec import RequestError
    from tasks.registry import check_reference

    try:
        return check_reference(model)
    except RequestError as error:
        fail(str(error))


def _private_state() -> None:
    """Before a flow starts Prefect: the state folder claimed (or refused) and Prefect's home in
    it created private, so its database of every run's parameters is no one else's to read."""
    from tasks.state import private_prefect_database

    report_errors(private_prefect_database)


def _start_prefect() -> None:
    """Prefect's temporary server, started here (while the workers warm) and stopped by a reaper
    if this command is killed (``tasks.prefect_server``); nothing where PREFECT_API_URL is set."""
    from tasks.prefect_server import start_temporary_server

    report_errors(start_temporary_server)


def _warm_pool_for(model: str, workers: int) -> None:
    """Start the workers for a registered version's base model while Prefect starts."""
    import sqlalchemy.orm  # noqa: F401 (see below)

    from flows.takedown import parent_reference
    from tasks.compute import warm_pool
    from tasks.registry import resolve, verified_request

    # The thread reads MLflow (SQLAlchemy) while Prefect starts (SQLAlchemy too): two threads
    # importing sqlalchemy.orm for the first time at once crashed half the concurrent takedowns
    # ("partially initialized module"). Imported here first, it is whole before either starts.
    # verified: an edited request.json must not even start workers for the model it names
    warm_pool(lambda: verified_request(resolve(parent_reference(model))).model, workers)


@app.command()
def run(
    request: Path = typer.Argument(..., help="Request file (YAML or JSON)."),
    name: str = typer.Option(None, help="Registered model name (default: the request file's name)."),
    workers: int = workers_option(),
    evaluate: bool = typer.Option(True, help="Evaluate the new version; the audit judges it before any promotion either way."),
) -> None:
    """Run the erase flow: per-concept work on Ray, fusion, evaluation, MLflow registration."""
    from erasure.spec import RequestError, load_request
    from tasks.registry import check_model_name

    try:
        spec = load_request(request)
        check_model_name(name or request.stem)
    except RequestError as error:
        fail(str(error))
    warn(spec.specificity_warnings())
    _private_state()
    from flows.erase import erase_flow
    from tasks.compute import warm_pool

    warm_pool(spec.model, workers)  # while Prefect starts its API server

    _start_prefect()
    result = report_errors(lambda: erase_flow(json.loads(spec.model_dump_json()), name or request.stem, workers, evaluate))
    _print_version(result)


@app.command()
def takedown(
    model: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    concepts: list[str] = typer.Argument(..., help="Concept names to erase in addition."),
    kind: str = typer.Option("object", help=f"Kind of the new concepts: {', '.join(CONCEPT_KINDS)}."),
    anchor: str = typer.Option(None, help="Anchor of the new concepts (needed for objects)."),
    synonym: list[str] = typer.Option([], help="Synonyms of the new concept (repeatable)."),
    workers: int = workers_option(),
    evaluate: bool = typer.Option(True, help="Evaluate the new version (about 40 s on the toy world); the audit judges it before any promotion either way."),
) -> None:
    """Add concepts to a registered model: a new version; only the new concepts' work runs."""
    from erasure.spec import RequestError, parse_concepts

    _reference(model)
    specs = _concepts(concepts, kind, anchor, synonym)
    try:  # bad input is said before any server or worker starts
        parse_concepts(specs)
    except RequestError as error:
        fail(str(error))
    _private_state()
    from flows.takedown import rerun_notice, takedown_flow

    notice = report_errors(lambda: rerun_notice(model, specs))
    if notice:
        warn([notice])
    _warm_pool_for(model, workers)
    _start_prefect()
    result = report_errors(lambda: takedown_flow(model, specs, workers, evaluate))
    _print_version(result)


@app.command()
def restore(
    model: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    concepts: list[str] = typer.Argument(..., help="Erased concept names to give back."),
    workers: int = workers_option(),
    evaluate: bool = typer.Option(True, help="Evaluate the new version; the audit judges it before any promotion either way."),
) -> None:
    """Remove concepts from a registered model's erasure: a new version, fused without them."""
    _reference(model)
    _private_state()
    from flows.restore import restore_flow

    _warm_pool_for(model, workers)
    _start_prefect()
    result = report_errors(lambda: restore_flow(model, list(concepts), workers, evaluate))
    _print_version(result)


RETIRED_POLICY_VARIABLE = "ERASURE_AUDIT_POLICY"  # read by earlier versions: the promoter's environment chose


def _policy(path: Path | None):
    """The policy a --policy option names; None: the deployment's (a registered model's, set with
    `erasure policy set`), or the built-in one for a folder."""
    import os

    from erasure.audit.policy import load_policy
    from erasure.spec import RequestError

    if os.environ.get(RETIRED_POLICY_VARIABLE):
        fail(
            f"{RETIRED_POLICY_VARIABLE} is no longer read: a deployment's policy is kept in the registry, not in the "
            "environment of whoever audits or promotes. Set it once with `erasure policy set MODEL FILE`, then unset "
            f"{RETIRED_POLICY_VARIABLE}"
        )
    if path is None:
        return None
    try:
        return load_policy(path)
    except RequestError as error:
        fail(str(error))


def _print_audit(result: dict) -> None:
    from erasure.evaluation.metrics import percent

    summary = result.get("summary") or {}
    table = Table(title=f"audit (seed {result['seed']}; %, base -> audited model, [95 % interval], n prompts)")
    for column in ("concept", "role", "acc_e", "acc_g (held-out)", "unseen", "phrasing", "acc_s"):
        table.add_column(column)

    def cell(entry):
        if not entry:
            return "-"
        low, high = entry["ci95"]
        return f"{percent(entry['base'])} -> {percent(entry['value'])} [{percent(low)}, {percent(high)}] n={entry['n']}"

    for row in summary.get("concepts", []):
        table.add_row(
            escape(row["concept"]), row["role"],
            *(cell(row.get(k)) for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_g_phrasing", "acc_s")),
        )
    if summary.get("concepts"):
        out.print(table)
    for row in summary.get("attacks", []):
        out.print(
            f"attack {row['attack']} on {escape(row['concept'])}: success {percent(row['asr'])} % "
            f"(base model, the control: {percent(row['base_asr'])} %)", highlight=False,
        )
    for kind, report in (summary.get("calibration") or {}).items():
        out.print(f"{kind} judge calibration: {json.dumps(report)}", highlight=False)
    out.print(f"MLflow run {result['run_id']}; rerun these probes with --seed {result['seed']}")


@app.command()
def audit(
    model: str = typer.Argument(..., help="NAME, NAME@ALIAS (e.g. models@production) or NAME/VERSION; or a model folder with --request."),
    request: Path = typer.Option(None, help="Audit a model folder (or builtin:...) against this request instead."),
    policy: Path = typer.Option(
        None, help="An audit policy (YAML) to try; default: the registered model's deployment policy (`erasure policy "
        "set`), else the built-in one. Only audits under the deployment's policy count for `promote`.",
    ),
    attacks: bool = typer.Option(False, "--attacks", help="Also run the policy's attacks (prefix search, concept inversion, Ring-A-Bell)."),
    seed: int = typer.Option(
        None, min=0, max=SEEDS - 1, help="Rerun an earlier audit's probes (default: new ones, recorded); a rerun never counts for `promote`.",
    ),
    retry: str = typer.Option(
        None, help="Repeat audit run RUN_ID, which reached no verdict (an outage, a crash, a kill), on its own probes "
        "and attacks: its outcome settles that run for `promote`.",
    ),
    workers: int = workers_option(),
) -> None:
    """Compliance check under the deployment's policy: exit 0 passed, 1 failed (every reason named),
    2 bad input or a failed service, 3 inconclusive or no judge (nothing was proved)."""
    from erasure.spec import RequestError, load_request
    from tasks.state import scrub

    if request is None:
        _reference(model)
    _private_state()
    from flows.audit import AuditInconclusive, ConceptLeak, audit_flow

    chosen = _policy(policy)
    spec = None
    if request is not None:
        try:
            spec = json.loads(load_request(request).model_dump_json())
        except RequestError as error:
            fail(str(error))
        if model != spec["model"] and not Path(model).is_dir():
            fail(f"{model!r} is not a model folder (with --request, audit a folder or the request's own model)")
    if retry is not None and (seed is not None or request is not None):
        fail("--retry repeats a registered version's audit on its own seed: give neither --seed nor --request")
    arguments = None if chosen is None else json.loads(chosen.model_dump_json())

    _start_prefect()

    def audited() -> dict:
        try:
            return audit_flow(model, arguments, workers, attacks, seed, spec, retry_of=retry)
        except (ConceptLeak, AuditInconclusive) as error:  # a verdict: its numbers, then its exit code
            if getattr(error, "result", None):
                _print_audit(error.result)
            label = "[bold yellow]audit inconclusive:[/]" if isinstance(error, AuditInconclusive) else "[bold red]audit failed:[/]"
            console.print(f"{label} {escape(scrub(str(error)))}", soft_wrap=True, highlight=False)
            raise typer.Exit(code=error.exit_code) from None

    result = report_errors(audited)
    _print_audit(result)
    out.print("[bold green]audit passed[/]")


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version to promote."),
    alias: str = typer.Option("production", help="Alias to move."),
    override_audit: str = typer.Option(None, help="Promote without a passing audit; the reason is logged in MLflow."),
) -> None:
    """Point an alias (default: production) at a version that passed its audit under the deployment's
    policy (the registered model's, set with `erasure policy set`, else the built-in one; never
    chosen by whoever promotes)."""
    from tasks.registry import promote as set_alias

    _policy(None)  # refuses the retired variable, which would otherwise look as if it were obeyed
    if not version.isdigit():
        fail(f"version {version!r} is not a version number (e.g. 3): `erasure promote NAME VERSION`")
    _reference(f"{model}/{version}")
    if override_audit is not None and not override_audit.strip():
        fail("--override-audit needs a reason")
    how = report_errors(lambda: set_alias(model, version, alias, override_audit))  # PromotionRefused: exit 2
    out.print(f"{escape(model)}@{escape(alias)} -> version {escape(version)} ({escape(how)})", highlight=False)


@policy_app.command("show")
def policy_show(model: str = typer.Argument(..., help="Registered model name.")) -> None:
    """Print the deployment policy a registered model is audited and promoted under, with its digest."""
    from tasks.registry import check_model_name, deployment_policy

    chosen = report_errors(lambda: deployment_policy(check_model_name(model)))
    out.print(f"# {escape(model)}: policy {chosen.digest()}", highlight=False)
    out.print(escape(chosen.model_dump_json(indent=1)), highlight=False)


@policy_app.command("set")
def policy_set(
    model: str = typer.Argument(..., help="Registered model name."),
    path: Path = typer.Argument(..., help="The policy (YAML), e.g. audit-policy.yaml."),
    reason: str = typer.Option(None, help="Why, when the new policy judges more leniently than the current one (logged)."),
) -> None:
    """Make a policy the registered model's deployment policy: what `audit` and `promote` use.
    Loosening any setting needs --reason; every change is logged in MLflow."""
    from tasks.registry import check_model_name, set_deployment_policy

    chosen = _policy(path)
    looser = report_errors(lambda: set_deployment_policy(check_model_name(model), chosen, reason))
    note = f"; loosens {escape('; '.join(looser))} ({escape(reason)})" if looser else ""
    out.print(f"{escape(model)}: deployment policy {chosen.digest()}{note}", highlight=False)


@services_app.command("up")
def services_up(
    postgres: str = typer.Option(None, help="Postgres URL for the MLflow backend (default: SQLite in the state folder)."),
    prefect: bool = typer.Option(False, help="Also start a Prefect server."),
    prefect_postgres: str = typer.Option(None, help="Postgres (asyncpg) URL for the Prefect server's database."),
) -> None:
    """Start SeaweedFS (S3) and an MLflow server on 127.0.0.1; write the env file (0600) that points at them.

    State lives in ``.erasure/services`` (or ``$ERASURE_STATE_DIR/services``). No server but S3
    checks credentials: anyone with a shell on this machine can use them (docs/security.md).
    """
    from cli import services

    starts = [("s3", services.start_s3), ("mlflow", lambda: services.start_mlflow(backend_uri=postgres))]
    if prefect:
        starts.append(("prefect", lambda: services.start_prefect(database_url=prefect_postgres)))
    try:
        services.check_secrets()
        for name, start in starts:
            seconds = start()
            out.print(f"{name} ready in {seconds:.1f} s" if seconds else f"{name} already running")
        path = services.write_env_file(services.environment(prefect=prefect))
    except services.ServiceError as error:
        fail(str(error))
    out.print(f"to use them: source {path}")


@services_app.command("down")
def services_down() -> None:
    """Stop the local services (by PID, only processes whose start time and command line still match)."""
    from cli import services

    for name in ("prefect", "mlflow", "s3"):
        message = services.stop(name)
        if message:
            out.print(message)


@services_app.command("status")
def services_status() -> None:
    """Which local services run, with their PIDs."""
    from cli import services

    for name, pid in services.status().items():
        out.print(f"{name}: {'running, pid ' + str(pid) if pid else 'stopped'}")
