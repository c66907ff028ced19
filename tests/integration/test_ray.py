"""A local Ray started by ``tasks.compute.ensure_ray`` listens on loopback only and runs no dashboard."""

import ipaddress
import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, from a dual-stack socket
    return address.is_loopback


def listening(process: psutil.Process) -> set[tuple[str, int]]:
    try:
        return {
            (c.laddr.ip, c.laddr.port) for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN
        }
    except psutil.NoSuchProcess:
        return set()


def ray_processes() -> list[psutil.Process]:
    """Every process of this Ray node: what the driver started (GCS, raylet, monitors, dashboard),
    and their descendants (agents, workers)."""
    node = ray._private.worker._global_node
    started = [info.process.pid for infos in node.all_processes.values() for info in infos]
    found = {}
    for pid in started:
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        for p in [process, *process.children(recursive=True)]:
            found[p.pid] = p
    return list(found.values())


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()} {' '.join(process.cmdline())[:120]}"
    except psutil.NoSuchProcess:
        return f"{process.pid} (gone)"


@pytest.fixture
def fresh_local_ray(monkeypatch):
    from tasks.compute import drop_pools

    drop_pools()
    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("ERASURE_RAY_CPUS", "2")
    yield
    ray.shutdown()


def test_local_ray_listens_on_loopback_only_and_runs_no_dashboard(fresh_local_ray):
    from tasks.compute import ensure_ray

    driver = psutil.Process()
    before = listening(driver)
    ensure_ray()

    @ray.remote(num_cpus=1)
    class Probe:
        def pid(self):
            return os.getpid()

    probe = Probe.remote()  # a worker process, with its own gRPC server
    ray.get(probe.pid.remote(), timeout=120)

    # agents open their servers asynchronously: collect what every Ray process listens on for a while
    listeners: dict[str, set] = {}
    deadline = time.time() + 5
    while time.time() < deadline:
        for process in ray_processes():
            listeners.setdefault(describe(process), set()).update(listening(process))
        listeners.setdefault(f"{driver.pid} driver (this process)", set()).update(listening(driver) - before)
        time.sleep(0.5)

    names = " ".join(listeners)
    for component in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "Probe"):
        assert component in names, f"no {component} process among {sorted(listeners)}"
    assert sum(len(found) for found in listeners.values()) >= 5
    exposed = {who: sorted(a for a in found if not is_loopback(a[0])) for who, found in listeners.items()}
    exposed = {who: found for who, found in exposed.items() if found}
    assert not exposed, f"Ray listens beyond loopback: {exposed}"

    node = ray._private.worker._global_node
    assert "dashboard" not in node.all_processes
    dashboards = [describe(p) for p in ray_processes() if any("dashboard/dashboard.py" in part for part in p.cmdline())]
    assert not dashboards, f"a dashboard process runs: {dashboards}"
    ray.kill(probe)


RAY_AND_PREFECT_FILES = """
import json, os, sys
import ray
import flows  # noqa: F401 (makes the temporary server's database folder)
from tasks.compute import ensure_ray
from prefect.settings import get_current_settings

ensure_ray()

@ray.remote
def one():
    return 1

assert ray.get(one.remote()) == 1
print(json.dumps({"temp": ray._private.worker._global_node.get_temp_dir_path(), "prefect": get_current_settings().server.database.connection_url.get_secret_value()}))
ray.shutdown()
"""


@pytest.mark.parametrize("depth", ["short", "deep"])
def test_ray_and_prefect_keep_their_files_and_token_in_the_private_state_folder(tmp_path, depth):
    """Issue 22, finding 11: ~/.prefect/prefect.db held every run's request, shared across state
    folders; Ray used /tmp/ray (0777) and wrote its token to ~/.ray/auth_token (0644)."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    home = tmp_path / "home"
    home.mkdir()
    short = Path(tempfile.mkdtemp(prefix="es", dir="/tmp"))  # deep enough paths exceed Ray's socket limit
    state = short / "s" if depth == "short" else tmp_path / ("deep-" * 8) / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env |= {"HOME": str(home), "ERASURE_STATE_DIR": str(state), "ERASURE_RAY_CPUS": "1"}
    try:
        result = subprocess.run([sys.executable, "-c", RAY_AND_PREFECT_FILES], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        where = json.loads(result.stdout.strip().splitlines()[-1])
        assert where["prefect"] == f"sqlite+aiosqlite:///{state.resolve() / 'prefect' / 'prefect.db'}"
        assert (state / "prefect").stat().st_mode & 0o777 == 0o700
        assert not (home / ".ray").exists()
        token = state / "ray" / "auth-token"
        assert token.stat().st_mode & 0o777 == 0o600 and (state / "ray").stat().st_mode & 0o777 == 0o700
        temp = Path(where["temp"])
        if depth == "short":
            assert temp == (state / "ray" / "tmp").resolve()
        else:  # a private folder of this user's, named after the state folder
            assert temp.parent.name == f"erasure-{os.getuid()}" and temp.parent.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_a_child_command_with_its_own_state_folder_uses_its_own_prefect_database(tmp_path):
    """A command started from a process that had imported ``tasks`` inherited that process's
    database path (the parent's state folder, which may not exist): Prefect failed to start."""
    import subprocess
    import sys

    script = "import tasks, os; print(os.environ['PREFECT_SERVER_DATABASE_CONNECTION_URL'])"
    parent = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ERASURE_"))}
    first = subprocess.run([sys.executable, "-c", f"import tasks, os, subprocess, sys; "
                            f"os.environ['ERASURE_STATE_DIR'] = {str(tmp_path / 'child')!r}; "
                            f"print(subprocess.run([sys.executable, '-c', {script!r}], capture_output=True, text=True).stdout)"],
                           env=parent | {"ERASURE_STATE_DIR": str(tmp_path / "parent")}, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() == f"sqlite+aiosqlite:///{(tmp_path / 'child').resolve() / 'prefect' / 'prefect.db'}"
