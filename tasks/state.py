"""Where local state lives and how the adapters read their settings from the environment.

The one local state folder holds the embedded default's artifact store and MLflow
database, and the local services' data, credentials, logs and PIDs.

``$ERASURE_STATE_DIR``, else ``.erasure`` in the current folder (git-ignored). Created
with mode 0700: nothing in it is meant for other users of the machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("ERASURE_STATE_DIR") or ".erasure").resolve()


def private_dir(path: Path) -> Path:
    """``path`` (and the state folder above it) as folders only this user can enter: created with
    mode 0700, tightened to 0700 if an earlier version left them open; refused when another
    user owns them (their pid files and credentials would be trusted)."""
    state = state_dir()
    folders = ([state] if state == path or state in path.parents else []) + ([path] if path != state else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
        if info.st_uid != os.getuid():
            raise PermissionError(
                f"{folder} belongs to another user (uid {info.st_uid}); set ERASURE_STATE_DIR to a folder of your own"
            )
        if info.st_mode & 0o077:
            folder.chmod(0o700)
    return path


def env_seconds(variable: str, default: float) -> float:
    """A positive number of seconds from ``$variable``, else ``default``; a bad value is an error naming it."""
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{variable}={text!r} must be positive")
    return value


def without_password(url: str) -> str:
    """``url`` as a message may show it: a password in it (``scheme://user:password@host``) becomes ``***``."""
    return re.sub(r"(//[^/:@]*:)[^/]*@", r"\1***@", url)  # up to the last "@" before the path
