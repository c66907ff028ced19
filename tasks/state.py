"""Where local state lives and how the adapters read their settings from the environment.

The one local state folder holds the embedded default's artifact store and MLflow
database, and the local services' data, credentials, logs and PIDs.

``$ERASURE_STATE_DIR``, else ``.erasure`` in the current folder (git-ignored). Created
with mode 0700: nothing in it is meant for other users of the machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("ERASURE_STATE_DIR") or ".erasure").resolve()


def private_dir(path: Path) -> Path:
    """Create ``path`` (and the state folder above it) with mode 0700 where they are missing."""
    state = state_dir()
    if state in path.parents:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
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
