"""Local services for the distributed mode and its tests: SeaweedFS (S3), MLflow server, Prefect server.

All bind to 127.0.0.1, run in the background with their PID and log in a state
folder (``.erasure/services``), and stop by PID. ``up`` writes an ``env`` file
(mode 0600: it holds the S3 credentials) that points the pipeline at them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STATE = Path(os.environ.get("ERASURE_SERVICES_DIR", ".erasure/services")).resolve()
_children: dict[str, subprocess.Popen] = {}  # servers this process started: reaped when stopped


@dataclass
class Ports:
    s3: int = int(os.environ.get("ERASURE_S3_PORT", 8333))
    mlflow: int = int(os.environ.get("ERASURE_MLFLOW_PORT", 5000))
    prefect: int = int(os.environ.get("ERASURE_PREFECT_PORT", 4200))


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed; install the pipeline extra: pip install -e '.[pipeline]'")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status < 500
    except Exception:
        return False


def _http_responds(url: str) -> bool:
    """Any HTTP answer at all (an S3 endpoint answers 403 to anonymous requests)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False


def _pid(name: str) -> int | None:
    path = STATE / f"{name}.pid"
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
        return pid
    except ProcessLookupError:
        path.unlink()
        return None


def credentials() -> tuple[str, str]:
    path = STATE / "s3-credentials"
    if not path.exists():
        STATE.mkdir(parents=True, exist_ok=True)
        path.write_text(f"erasure\n{secrets.token_hex(16)}\n")
        path.chmod(0o600)
    key, secret = path.read_text().split()
    return key, secret


def _start(name: str, command: list[str], env: dict, ready, timeout: float, port: int) -> float:
    if _pid(name):
        return 0.0
    for _ in range(50):  # a server we just stopped may still be closing its socket
        if not _port_open(port):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"cannot start {name}: port {port} on 127.0.0.1 is in use by another process")
    STATE.mkdir(parents=True, exist_ok=True)
    log = open(STATE / f"{name}.log", "ab")
    started = time.time()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | env, cwd=STATE, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(process.pid))
    _children[name] = process
    while time.time() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start (code {process.returncode}); see {STATE / (name + '.log')}")
        if ready():
            return time.time() - started
        time.sleep(0.2)
    stop(name)
    raise RuntimeError(f"{name} was not ready after {timeout:.0f} s; see {STATE / (name + '.log')}")


def start_s3(ports: Ports = Ports()) -> float:
    key, secret = credentials()
    data = STATE / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    command = [_bin("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", f"-s3.port={ports.s3}"]
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    return _start("s3", command, env, lambda: _port_open(ports.s3) and _http_responds(f"http://127.0.0.1:{ports.s3}/"), 60, ports.s3)


def start_mlflow(ports: Ports = Ports(), backend_uri: str | None = None) -> float:
    backend_uri = backend_uri or f"sqlite:///{STATE / 'mlflow.db'}"
    command = [
        _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports.mlflow),
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(STATE / "mlflow-artifacts"), "--workers", "1",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return _start("mlflow", command, env, lambda: _http_ok(f"http://127.0.0.1:{ports.mlflow}/health"), 120, ports.mlflow)


def start_prefect(ports: Ports = Ports(), database_url: str | None = None) -> float:
    env = {"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(ports.prefect), "PREFECT_HOME": str(STATE / "prefect")}
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect), "--no-services"]
    return _start("prefect", command, env, lambda: _http_ok(f"http://127.0.0.1:{ports.prefect}/api/health"), 120, ports.prefect)


def stop(name: str) -> bool:
    pid = _pid(name)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    child = _children.pop(name, None)
    deadline = time.time() + 10
    while time.time() < deadline:
        if child is not None and child.poll() is not None:
            break  # exited and reaped (a child of ours would otherwise linger as a zombie)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if child is not None:
            child.wait()
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    return True


def status() -> dict[str, int | None]:
    return {name: _pid(name) for name in ("s3", "mlflow", "prefect")}


def environment(ports: Ports = Ports(), prefect: bool = False) -> dict[str, str]:
    """The variables that point the pipeline at these services."""
    key, secret = credentials()
    env = {
        "ERASURE_STORE": "s3://erasure/artifacts",
        "ERASURE_S3_ENDPOINT": f"http://127.0.0.1:{ports.s3}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
    }
    if prefect:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{ports.prefect}/api"
    return env


def write_env_file(env: dict[str, str]) -> Path:
    path = STATE / "env"
    path.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    path.chmod(0o600)
    return path
