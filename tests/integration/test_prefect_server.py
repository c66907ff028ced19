"""Prefect's temporary server ends with the command that started it, even one killed with -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KEEPS_A_SERVER = """
import time
from tasks.prefect_server import start_temporary_server

print(start_temporary_server(), flush=True)
time.sleep(600)
"""


def _is_uvicorn(pid: int) -> bool:
    try:
        return b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_command_killed_with_sigkill_leaves_no_temporary_prefect_server(tmp_path):
    """Issue 22, finding 8: each `kill -9` of a command left its temporary Prefect server running
    (about 195 MB) for good."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"ERASURE_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    command = subprocess.Popen([sys.executable, "-c", KEEPS_A_SERVER], env=env, stdout=subprocess.PIPE, text=True)
    server = None
    try:
        server = int(command.stdout.readline())
        assert _is_uvicorn(server)
        command.send_signal(signal.SIGKILL)
        command.wait()
        deadline = time.monotonic() + 120  # a bound on waiting for the reaper, not a measurement
        while _is_uvicorn(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _is_uvicorn(server), "the temporary Prefect server outlived its killed command"
    finally:
        command.kill()
        if server is not None and _is_uvicorn(server):
            os.kill(server, signal.SIGKILL)
