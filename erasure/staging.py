"""Hidden staging folders that a killed writer leaves behind, and their removal.

A result is written whole into a hidden folder beside its destination, then renamed into
place: a crash never publishes half of it. A ``kill -9`` between the two leaves the hidden
folder, and nothing removed those. Each staging folder's name now says which process made
it (host and PID), so the next writer into the same folder removes those whose process is
gone, and any older than a day whatever made them; a live writer's are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 24 * 3600  # older than any write phase: a writer on another host is gone too


def make_staging(parent: Path, prefix: str) -> Path:
    """A new hidden folder ``<parent>/.<prefix>.staging-<host>-<pid>-<random>`` (0700)."""
    return Path(tempfile.mkdtemp(prefix=f".{prefix}.staging-{_host()}-{os.getpid()}-", dir=parent))


def remove_stale_staging(parent: Path, prefix: str) -> list[Path]:
    """Remove the staging folders of ``prefix`` in ``parent`` whose writer is gone: made on this
    host by a process that no longer runs, or older than ``STALE_AFTER_S``. Returns them."""
    pattern = re.compile(rf"^\.{re.escape(prefix)}\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = found["host"] == _host() and not _running(int(found["pid"]))
        if dead or age > STALE_AFTER_S:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True
