"""Where local state lives and how the adapters read their settings from the environment.

The one local state folder holds the embedded default's artifact store and MLflow
database, and the local services' data, credentials, logs and PIDs.

``$ERASURE_STATE_DIR``, else ``.erasure`` in the current folder (git-ignored). Created
with mode 0700: nothing in it is meant for other users of the machine. A marker file
says the folder is ours: an existing folder without it is adopted only when it is empty
or holds nothing but state entries (an older version's), and is otherwise refused, so
that naming ``$HOME`` or ``/`` by mistake changes nothing there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from erasure.errors import ErasureError

STATE_MARKER = ".erasure-state"
# What a state folder holds: an older version's folder (no marker yet) holding only these is ours
STATE_ENTRIES = frozenset({
    STATE_MARKER, "mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlflow-artifacts",
    "store", "services", "prefect", "ray",
})


class StateDirError(ErasureError, PermissionError):
    """The state folder named cannot be used (another user's, or a folder that is not a state folder)."""

    retry_helps = False


def state_dir() -> Path:
    return Path(os.environ.get("ERASURE_STATE_DIR") or ".erasure").resolve()


def _claim_state_dir(state: Path) -> None:
    """Create ``state`` or check it is ours, before anything is written or chmodded in it."""
    try:
        state.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not state.is_dir():
            raise StateDirError(f"ERASURE_STATE_DIR={state} is not a folder: name a new or empty folder") from None
        info = state.stat()
        if info.st_uid != os.getuid():
            raise StateDirError(
                f"{state} belongs to another user (uid {info.st_uid}); set ERASURE_STATE_DIR to a folder of your own"
            ) from None
        if (state / STATE_MARKER).is_file():
            return
        try:
            foreign = sorted(set(os.listdir(state)) - STATE_ENTRIES)
        except OSError as error:
            raise StateDirError(f"state folder {state} cannot be read ({error.strerror})") from None
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StateDirError(
                f"{state} is not an erasure state folder (it holds {shown}): set ERASURE_STATE_DIR to a new or "
                "empty folder; nothing in it was changed"
            ) from None
    marker = state / STATE_MARKER
    if not marker.exists():
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("erasure state folder: MLflow database, artifact store, local services\n")


def private_dir(path: Path) -> Path:
    """``path`` (and the state folder above it) as folders only this user can enter: created with
    mode 0700, tightened to 0700 if an earlier version left them open; refused when another
    user owns them (their pid files and credentials would be trusted)."""
    state = state_dir()
    inside = state == path or state in path.parents
    if inside:
        _claim_state_dir(state)  # first: nothing below is created or chmodded in a folder that is not ours
    folders = ([state] if inside else []) + ([path] if path != state else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
        if info.st_uid != os.getuid():
            raise StateDirError(
                f"{folder} belongs to another user (uid {info.st_uid}); set ERASURE_STATE_DIR to a folder of your own"
            )
        if info.st_mode & 0o077:
            folder.chmod(0o700)
    return path


PREFECT_DATABASE_VARIABLE = "PREFECT_SERVER_DATABASE_CONNECTION_URL"  # its default is set in tasks/__init__.py


def private_prefect_database() -> None:
    """Create the folder of Prefect's temporary-server database private (0700, claiming the state
    folder first) when it lies in the state folder: Prefect creates no folder for it."""
    url = os.environ.get(PREFECT_DATABASE_VARIABLE, "")
    if os.environ.get("PREFECT_API_URL") or not url.startswith("sqlite+aiosqlite:///"):
        return  # a Prefect server of the operator's: no temporary one, no local database
    folder = Path(url.removeprefix("sqlite+aiosqlite://")).parent.resolve()
    if folder == state_dir() or state_dir() in folder.parents:
        private_dir(folder)
    else:  # an operator's own path: made if missing (Prefect would fail to start), never chmodded
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)


class ConfigError(ErasureError, ValueError):
    """An environment variable the operator set holds a value that cannot be used."""

    retry_helps = False


def env_seconds(variable: str, default: float) -> float:
    """A positive number of seconds from ``$variable``, else ``default``; a bad value is an error naming it."""
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{variable}={text!r} is not a number of seconds: give one, e.g. {variable}=60, or unset it") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{variable}={text!r} must be a positive, finite number of seconds")
    return value


def env_count(variable: str, default: int, most: int = 1 << 16) -> int:
    """A whole number from 1 to ``most`` from ``$variable``, else ``default``; a bad value is an error naming it."""
    text = os.environ.get(variable)
    if not text:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()) or not 1 <= int(text) <= most:  # "²".isdigit() is True
        raise ConfigError(f"{variable}={text!r} is not a whole number from 1 to {most}: give one, or unset it")
    return int(text)


def without_password(url: str) -> str:
    """``url`` as a message may show it: a password in it (``scheme://user:password@host``) becomes ``***``."""
    return re.sub(r"(//[^/:@\s]*:)[^/\s]*@", r"\1***@", url)  # up to the last "@" before the path


# Variables whose values are secrets wherever they appear (a server may echo one back in an error)
SECRET_VARIABLES = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD",
    "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "RAY_AUTH_TOKEN",
)
URL_VARIABLES = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ERASURE_S3_ENDPOINT", "RAY_ADDRESS")


def scrub(text: str) -> str:
    """``text`` as a message or a record may show it: every URL's password masked, and every
    secret this process holds (``SECRET_VARIABLES``, passwords inside ``URL_VARIABLES``, raw or
    percent-encoded) replaced by ``***``, for servers that repeat them in their own messages."""
    from urllib.parse import quote, unquote, urlsplit

    secrets = {os.environ.get(v, "") for v in SECRET_VARIABLES}
    for variable in URL_VARIABLES:
        try:
            password = urlsplit(os.environ.get(variable, "")).password
        except ValueError:
            password = None
        if password:
            secrets |= {password, unquote(password), quote(unquote(password), safe="")}
    text = without_password(str(text))
    # a password or token as a query parameter (postgresql://u@h/db?password=...)
    text = re.sub(r"(?i)([?&;](?:password|passwd|pwd|token|secret|access_token)=)[^&;\s'\"]+", r"\1***", text)
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):  # a longer one may hold a shorter
        # case-insensitive: percent-encoding may be written %2f or %2F
        text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
    return text
