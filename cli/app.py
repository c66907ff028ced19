"""The ``erasure`` command line's Typer app and what its commands share.

The commands live beside it: ``cli.library`` (erase, generate, evaluate, toyworld),
``cli.pipeline`` (run, takedown, restore, audit, promote, services); ``cli.main``
assembles them. Pipeline packages (prefect, ray, boto3, mlflow) are imported only
by the commands that use them, so the library's commands work without them.
"""

from __future__ import annotations

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="Erase concepts (objects, people, styles, explicit content) from text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
)
toyworld_app = typer.Typer(help="The toy world: a small model we train ourselves, for end-to-end checks on a CPU.")
app.add_typer(toyworld_app, name="toyworld")
console = Console(stderr=True)


def device_or_default(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def setting(settings: BaseModel, field: str):
    """A Typer option whose default and help are a settings object's field: written once, there."""
    return typer.Option(getattr(settings, field), help=type(settings).model_fields[field].description)


MAX_WORKERS = 1024


def workers_option(help: str = "Ray workers (one per GPU, or per CPU without GPUs).") -> typer.models.OptionInfo:
    """The --workers option every pipeline command takes: written once, here."""
    return typer.Option(1, min=1, max=MAX_WORKERS, help=help)


def warn(messages: list[str]) -> None:
    """Print a request's warnings (the work still runs: they are judgement calls, not errors)."""
    for message in messages:
        console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2) -> None:
    from tasks.state import scrub

    console.print(f"[bold red]error:[/] {escape(scrub(message))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)


UNEXPECTED_EXIT = 4  # a bug or an environment problem: never 1, which says a concept leaked


def report_errors(call):
    """Run ``call``. A product error (``erasure.errors``) is printed as its message, never a
    traceback, and the command exits with the error's own code; anything else is printed with
    its traceback and exits 4."""
    import traceback

    from pydantic import ValidationError

    from erasure.errors import ErasureError, NoVerdict
    from tasks.state import scrub

    try:
        return call()
    except typer.Exit:
        raise
    except NoVerdict as error:  # nothing was judged: neither a pass nor a leak
        console.print(f"[bold yellow]no verdict:[/] {escape(scrub(str(error)))}", soft_wrap=True, highlight=False)
        raise typer.Exit(code=error.exit_code) from None
    except ErasureError as error:
        fail(str(error), error.exit_code)
    except (LookupError, ValidationError) as error:  # a registered name or version that is not there
        fail(str(error))
    except Exception as error:  # noqa: BLE001 (reported whole, with its own exit code)
        # the traceback as text, scrubbed: a library's message may quote a URL with its password
        console.print(escape(scrub("".join(traceback.format_exception(error)))), soft_wrap=True, highlight=False)
        console.print(f"[bold red]unexpected error[/] (exit {UNEXPECTED_EXIT}): the traceback above says where", highlight=False)
        raise typer.Exit(code=UNEXPECTED_EXIT) from None


class Bars:
    """Adapts the library's ``progress(label, done, total)`` callback to rich progress bars."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)


def closure_line(closure: dict, where: str) -> str:
    """One line on fusion.closure's outcome (``erasure.audit.closure.closure_summary``); ``where``: its closure.json."""
    state = "closed" if closure["closed"] else "NOT closed"
    return (
        f"adversarial closure: {state} after {closure['rounds']} round(s), worst attack success on its training split "
        f"{100 * closure['worst_success']:.1f} %, {closure['erased_prompts']} found prompts erased ({where})"
    )


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )


policy_app = typer.Typer(help="A registered model's deployment policy: what its audits and promotions are judged by.")
app.add_typer(policy_app, name="policy")
services_app = typer.Typer(help="Local services for the distributed mode: S3 (SeaweedFS), MLflow, Prefect.")
app.add_typer(services_app, name="services")
