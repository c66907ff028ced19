"""Prefect's temporary server, tied to the process that needs it.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (a uvicorn subprocess, about
195 MB) at the first flow call and stops it when the process exits normally. A process killed
with ``kill -9`` never stops it, and nothing else would: each killed command leaked one. So
the commands start it here, before their flow, and start beside it a reaper, a small process of
its own session that stops the server as soon as the command is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Runs as ``python -c REAPER PARENT_PID SERVER_PID``: polls until the server has exited (then
# there is nothing to do) or its parent is gone (then it stops the server). The server is
# signalled only while its command line is still uvicorn's, so a reused PID is never signalled.
REAPER = r"""
import os, signal, sys, time

parent, server = int(sys.argv[1]), int(sys.argv[2])


def alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"uvicorn" in handle.read()
    except OSError:
        return False


while alive(server):
    if os.getppid() != parent:  # the command died: this reaper was handed to init
        os.kill(server, signal.SIGTERM)
        for _ in range(100):
            if not alive(server):
                sys.exit(0)
            time.sleep(0.1)
        if alive(server):
            os.kill(server, signal.SIGKILL)
        sys.exit(0)
    time.sleep(0.5)
"""


def start_temporary_server() -> int | None:
    """Start Prefect's temporary server now, as Prefect would at the first flow call (the same
    instance: Prefect reuses it), and its reaper. None when ``PREFECT_API_URL`` names a server
    or ephemeral servers are off; else the server's PID."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    from tasks.state import private_prefect_database

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    private_prefect_database()  # its database's folder
    server = SubprocessASGIServer()
    already = server.running
    server.start()
    pid = server.server_process.pid
    if not already:
        subprocess.Popen(
            [sys.executable, "-c", REAPER, str(os.getpid()), str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a kill of the command's process group leaves the reaper to do its job
            close_fds=True,
        )
    return pid
