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

from cli.app import app, console, fail, services_app, warn
from erasure.spec import CONCEPT_KINDS

out = Console()
NO_JUDGE_EXIT = 3  # distinct from a leak (1) and from bad input (2)


def _concepts(names: list[str], kind: str, anchor: str | None, synonyms: list[str]) -> list[dict]:
    return [{"name": n, "kind": kind, **({"anchor": anchor} if anchor else {}), "synonyms": synonyms} for n in names]


def _run_flow(call):
    from pydantic import ValidationError

    from erasure.evaluate import NoJudgeError
    from erasure.spec import RequestError
    from flows.audit import ConceptLeak
    from flows.erase import BaseModelChanged
    from flows.takedown import ConceptStateError
    from tasks.locks import LockError
    from tasks.registry import RegistryError
    from tasks.store import ArtifactError

    try:
        return call()
    except NoJudgeError as error:  # nothing was judged: neither a pass nor a leak
        console.print(f"[bold yellow]no judge:[/] {escape(str(error))}", soft_wrap=True, highlight=False)
        raise typer.Exit(code=NO_JUDGE_EXIT) from None
    except (RequestError, ConceptStateError, BaseModelChanged, LookupError, ValidationError) as error:
        fail(str(error))
    except (RegistryError, ArtifactError, LockError) as error:  # a service down, a corrupt artifact: say which
        fail(str(error))
    except ConceptLeak as error:
        console.print(f"[bold red]audit failed:[/] {escape(str(error))}", soft_wrap=True, highlight=False)
        raise typer.Exit(code=1) from None


def _print_version(result: dict) -> None:
    alias = "alias candidate" if result.get("candidate", True) else "candidate not moved"
    state = "reused" if result.get("reused_version") else "registered"
    out.print(
        f"{state} [bold]{escape(result['name'])}[/] version {result['version']} ({alias}); "
        f"per-concept stages: {len(result['ran'])} ran, {len(result['reused'])} reused"
    )
    if result.get("note"):  # rebased on a newer candidate, or candidate left where another flow moved it
        out.print(f"note: {escape(result['note'])}", highlight=False)
    if result.get("metrics"):
        out.print(json.dumps(result["metrics"]))


@app.command()
def run(
    request: Path = typer.Argument(..., help="Request file (YAML or JSON)."),
    name: str = typer.Option(None, help="Registered model name (default: the request file's name)."),
    workers: int = typer.Option(1, min=1, max=1024, help="Ray workers (one per GPU, or per CPU without GPUs)."),
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
    from flows.erase import erase_flow

    result = _run_flow(lambda: erase_flow(json.loads(spec.model_dump_json()), name or request.stem, workers))
    _print_version(result)


@app.command()
def takedown(
    model: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    concepts: list[str] = typer.Argument(..., help="Concept names to erase in addition."),
    kind: str = typer.Option("object", help=f"Kind of the new concepts: {', '.join(CONCEPT_KINDS)}."),
    anchor: str = typer.Option(None, help="Anchor of the new concepts (needed for objects)."),
    synonym: list[str] = typer.Option([], help="Synonyms of the new concept (repeatable)."),
    workers: int = typer.Option(1, min=1, max=1024, help="Ray workers."),
) -> None:
    """Add concepts to a registered model: a new version; only the new concepts' work runs."""
    from erasure.spec import RequestError, parse_concepts

    specs = _concepts(concepts, kind, anchor, synonym)
    try:  # bad input is said before any server or worker starts
        parse_concepts(specs)
    except RequestError as error:
        fail(str(error))
    from flows.takedown import takedown_flow

    result = _run_flow(lambda: takedown_flow(model, specs, workers))
    _print_version(result)


@app.command()
def restore(
    model: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    concepts: list[str] = typer.Argument(..., help="Erased concept names to give back."),
    workers: int = typer.Option(1, min=1, max=1024, help="Ray workers."),
) -> None:
    """Remove concepts from a registered model's erasure: a new version, fused without them."""
    from flows.restore import restore_flow

    result = _run_flow(lambda: restore_flow(model, list(concepts), workers))
    _print_version(result)


@app.command()
def audit(
    model: str = typer.Argument(..., help="NAME, NAME@ALIAS (e.g. models@production) or NAME/VERSION; or a model with --request."),
    request: Path = typer.Option(None, help="Audit any model (folder, builtin:...) against this request."),
    workers: int = typer.Option(1, min=1, max=1024, help="Ray workers."),
) -> None:
    """Compliance check: fails (exit 1), naming the concepts, when an erased concept is still drawn;
    exit 3 when the model has no judge (nothing was judged)."""
    from erasure.spec import RequestError, load_request
    from flows.audit import audit_flow

    spec = None
    if request is not None:
        try:
            spec = json.loads(load_request(request).model_dump_json()) | {"model": model}
        except RequestError as error:
            fail(str(error))
    result = _run_flow(lambda: audit_flow(model, spec, workers))
    out.print(f"audit passed: {json.dumps(result['metrics'])}")


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version to promote."),
    alias: str = typer.Option("production", help="Alias to move."),
) -> None:
    """Point an alias (default: production) at a version."""
    from tasks.registry import promote as set_alias

    _run_flow(lambda: set_alias(model, version, alias))
    out.print(f"{escape(model)}@{escape(alias)} -> version {escape(version)}", highlight=False)


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
