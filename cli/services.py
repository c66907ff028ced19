"""Local services for the distributed mode and its tests: SeaweedFS (S3), MLflow server, Prefect server.

State. Everything lives in one ignored state folder: ``.erasure/`` under the
current directory, or ``$ERASURE_STATE_DIR``; the services use
``<state>/services``. Secrets there (the generated S3 credentials, the ``env``
file written by ``up``) are created atomically with mode 0600, and a secret
file that group or others can read or write is refused. Servers run with umask
077, so their data, logs and sockets are private to the user too.

PIDs. Each server runs in its own session; its pid file (JSON) records the PID,
the process start time (``/proc/<pid>/stat`` field 22) and the command line.
A process is signalled only while all three still match, so a PID reused by an
unrelated process is never signalled.

Network. Every listener binds 127.0.0.1. Only S3 checks credentials: the
MLflow and Prefect servers and SeaweedFS's master, volume and filer HTTP APIs
do not, so anyone with a shell on this machine can use them (docs/security.md). ``weed mini`` (SeaweedFS 4.x) opens, by default, these TCP
ports (each gRPC port defaults to its HTTP port + 10000), all of which we set:

- S3 gateway (and its IAM API) 8333: ``Ports.s3``; S3 gRPC 18333: a free port;
- master HTTP/gRPC 9333/19333, volume 9340/19340, filer 8888/18888: free ports;
- admin HTTP/gRPC 23646/33646: free ports (``-admin.ui=false`` turns off the UI,
  which then answers 404; the admin server itself cannot be turned off);
- WebDAV 7333: off (``-webdav=false``); Iceberg REST catalog 8181: off
  (``-s3.port.iceberg=0``); Lance namespace 9101: off (``-s3.port.lance=0``);
- metrics and pprof ports: off by default, left unset.

``-ip=127.0.0.1 -ip.bind=127.0.0.1`` binds them all to loopback; the internal
ports are fresh free ones on each start, so instances never clash. Master
telemetry (a report to telemetry.seaweedfs.com) is turned off. The gRPC servers
also listen on Unix sockets ``/tmp/seaweedfs-*-<port>.sock`` (mode 0700 under
our umask).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from erasure.errors import ErasureError
from tasks.state import ConfigError, env_count, private_dir, state_dir

NAMES = ("s3", "mlflow", "prefect")
_children: dict[str, subprocess.Popen] = {}  # servers this process started: reaped when stopped


class ServiceError(ErasureError, RuntimeError):
    """A problem with the local services, worded for the user (no traceback needed)."""


def services_dir() -> Path:
    return state_dir() / "services"




def _port_variable(variable: str, default: int) -> int:
    """``$variable`` as a TCP port, else ``default``; anything else is an error naming it."""
    try:
        return env_count(variable, default, most=65535)
    except ConfigError as error:
        raise ServiceError(f"{error} (a port)") from None


@dataclass
class Ports:
    """The ports the servers listen on; read from the environment when made, not when imported."""

    s3: int = field(default_factory=lambda: _port_variable("ERASURE_S3_PORT", 8333))
    mlflow: int = field(default_factory=lambda: _port_variable("ERASURE_MLFLOW_PORT", 5000))
    prefect: int = field(default_factory=lambda: _port_variable("ERASURE_PREFECT_PORT", 4200))


PORT_VARIABLES = {"s3": "ERASURE_S3_PORT", "mlflow": "ERASURE_MLFLOW_PORT", "prefect": "ERASURE_PREFECT_PORT"}


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name} is not installed; install the pipeline extra: pip install -e '.[pipeline]'")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


# --- secret files --------------------------------------------------------------------------


def check_private(path: Path) -> None:
    """Refuse a secret file that is not a regular file of ours with mode 0600 (or stricter)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ServiceError(f"{path} is not a regular file; delete it to regenerate")
    if info.st_mode & 0o077:
        raise ServiceError(
            f"{path} holds secrets but is readable or writable by group/others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}` or delete it to regenerate"
        )
    if info.st_uid != os.getuid():
        raise ServiceError(f"{path} holds secrets but belongs to another user; delete it to regenerate")


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, the file never readable by anyone else (0600)."""
    private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def credentials() -> tuple[str, str]:
    """The local S3 access key and secret, generated on first use."""
    path = services_dir() / "s3-credentials"
    if not os.path.lexists(path):
        write_private(path, f"erasure\n{secrets.token_hex(24)}\n")
    check_private(path)
    try:
        key, secret = path.read_text().split()
    except ValueError:
        raise ServiceError(f"{path} is not an access key and a secret; delete it to regenerate") from None
    return key, secret


# --- processes -----------------------------------------------------------------------------


def _identity(pid: int) -> tuple[int, list[str], str] | None:
    """(start time in clock ticks since boot, command line, state) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19]
    return int(fields[19]), [part.decode(errors="replace") for part in cmdline if part], fields[0]


def _pid_file(name: str) -> Path:
    return services_dir() / f"{name}.pid"


def _record(name: str, pid: int, **extra) -> None:
    # right after Popen the new program may not be in place yet (/proc shows no command line while
    # a large binary loads): a record made then never matches the server, and `stop` would refuse it
    deadline = time.time() + 5
    while (identity := _identity(pid)) is not None and not identity[1] and time.time() < deadline:
        time.sleep(0.02)
    if identity is None:
        return
    start_time, cmdline, _ = identity
    write_private(_pid_file(name), json.dumps({"pid": pid, "start_time": start_time, "cmdline": cmdline, **extra}))


def _recorded(name: str) -> tuple[dict | None, str | None]:
    """The pid record of a service if it still names the process we started; else why not.

    A record that is empty, corrupt, or names a process that is gone or is not
    ours any more (PID reused) is removed, with a message saying so.
    """
    path = _pid_file(name)
    if not os.path.lexists(path):
        return None, None
    try:
        record = json.loads(path.read_text())
        pid, start_time, cmdline = int(record["pid"]), int(record["start_time"]), [str(a) for a in record["cmdline"]]
        if pid <= 1:
            raise ValueError(pid)
        record.update(pid=pid, start_time=start_time, cmdline=cmdline)
    except (OSError, ValueError, TypeError, KeyError):
        path.unlink(missing_ok=True)
        return None, f"{name}: the pid file {path} was empty or corrupt; removed it (nothing signalled)"
    identity = _identity(pid)
    if identity is None or identity[2] == "Z":
        path.unlink(missing_ok=True)
        return None, f"{name}: not running (removed the stale pid file)"
    if identity[:2] != (start_time, cmdline):
        path.unlink(missing_ok=True)
        return None, (
            f"{name}: PID {pid} now belongs to another process (start time or command line differ); "
            f"removed the stale pid file without signalling it"
        )
    return record, None


def _alive(record: dict) -> bool:
    identity = _identity(record["pid"])
    return identity is not None and identity[2] != "Z" and identity[:2] == (record["start_time"], record["cmdline"])


def _signal(record: dict, signum: int) -> None:
    """Signal the recorded process (its whole group when it leads one), after checking it is still it."""
    pid = record["pid"]
    if not _alive(record):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)  # the server and the workers it spawned
        else:
            os.kill(pid, signum)  # never signal a group we do not lead
    except ProcessLookupError:
        pass


def _open_log(name: str):
    fd = os.open(services_dir() / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab")


@contextmanager
def _service_lock(name: str) -> Iterator[None]:
    """One ``up``/``down`` of a service at a time per state folder: two concurrent ``services up``
    would otherwise both launch a server and the loser would remove the winner's pid file."""
    folder = private_dir(services_dir())
    fd = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _start(name: str, command: list[str], env: dict, ready, timeout: float, port: int, **extra) -> float:
    with _service_lock(name):
        return _start_locked(name, command, env, ready, timeout, port, **extra)


def _start_locked(name: str, command: list[str], env: dict, ready, timeout: float, port: int, **extra) -> float:
    record, _ = _recorded(name)
    if record:
        running = (record.get("ports") or {}).get(name)
        if running is not None and running != port:  # the env file would point where nothing listens
            raise ServiceError(
                f"{name} already runs (pid {record['pid']}) on port {running}, not {port}: run `erasure services down` "
                f"to move it, or set {PORT_VARIABLES[name]}={running}"
            )
        return 0.0
    for _ in range(50):  # a server we just stopped may still be closing its socket
        if not _port_open(port):
            break
        time.sleep(0.1)
    else:
        raise ServiceError(f"cannot start {name}: port {port} on 127.0.0.1 is in use by another process")
    folder = private_dir(services_dir())
    log_path = folder / f"{name}.log"
    started = time.time()
    with _open_log(name) as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | env, cwd=folder,
            start_new_session=True, umask=0o077,
        )
    _children[name] = process
    _record(name, process.pid, **extra)
    while time.time() - started < timeout:
        if process.poll() is not None:
            _children.pop(name, None)
            _pid_file(name).unlink(missing_ok=True)
            raise ServiceError(f"{name} exited at start (code {process.returncode}); see {log_path}")
        if ready():
            return time.time() - started
        time.sleep(0.2)
    _stop_locked(name)
    raise ServiceError(f"{name} was not ready after {timeout:.0f} s; see {log_path}")


def start_s3(ports: Ports | None = None) -> float:
    ports = ports or Ports()
    key, secret = credentials()
    data = private_dir(services_dir() / "seaweedfs")
    names = ("s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "admin", "admin.grpc")
    internal = dict(zip(names, _free_ports(len(names))))
    flags = {
        "s3.port": ports.s3, "s3.port.grpc": internal["s3.grpc"],
        "master.port": internal["master"], "master.port.grpc": internal["master.grpc"],
        "volume.port": internal["volume"], "volume.port.grpc": internal["volume.grpc"],
        "filer.port": internal["filer"], "filer.port.grpc": internal["filer.grpc"],
        "admin.port": internal["admin"], "admin.port.grpc": internal["admin.grpc"],
    }
    command = [
        _bin("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        *(f"-{flag}={value}" for flag, value in flags.items()),
    ]
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}  # not on the command line: /proc is world-readable
    ready = lambda: _port_open(ports.s3) and _http_responds(f"http://127.0.0.1:{ports.s3}/")  # noqa: E731
    return _start("s3", command, env, ready, 60, ports.s3, ports={"s3": ports.s3, **internal})


def start_mlflow(ports: Ports | None = None, backend_uri: str | None = None) -> float:
    ports = ports or Ports()
    folder = private_dir(services_dir())
    backend_uri = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    command = [
        _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports.mlflow),
        "--artifacts-destination", str(folder / "mlflow-artifacts"), "--workers", "1",
    ]
    # the backend URI may hold a database password: the environment, never the command line
    # (any local user can read /proc/PID/cmdline)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": backend_uri}
    ready = lambda: _http_ok(f"http://127.0.0.1:{ports.mlflow}/health")  # noqa: E731
    return _start("mlflow", command, env, ready, 120, ports.mlflow, ports={"mlflow": ports.mlflow})


def start_prefect(ports: Ports | None = None, database_url: str | None = None) -> float:
    ports = ports or Ports()
    folder = private_dir(services_dir())
    home = private_dir(folder / "prefect")
    env = {"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(ports.prefect), "PREFECT_HOME": str(home),
           # its own database: never the embedded default's, which ``tasks`` names in this environment
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect), "--no-services"]
    ready = lambda: _http_ok(f"http://127.0.0.1:{ports.prefect}/api/health")  # noqa: E731
    return _start("prefect", command, env, ready, 120, ports.prefect, ports={"prefect": ports.prefect})


def stop(name: str) -> str | None:
    """Stop a service this state folder started; what happened, or None when none was recorded."""
    with _service_lock(name):
        return _stop_locked(name)


def _stop_locked(name: str) -> str | None:
    record, problem = _recorded(name)
    child = _children.pop(name, None)
    if record is None:
        if child is not None and child.poll() is not None:
            child.wait()
        return problem
    _signal(record, signal.SIGTERM)
    deadline = time.time() + 10
    while time.time() < deadline:
        if child is not None and child.poll() is not None:
            break  # exited and reaped (a child of ours would otherwise linger as a zombie)
        if not _alive(record):
            break
        time.sleep(0.1)
    else:
        _signal(record, signal.SIGKILL)
        if child is not None:
            child.wait()
    _pid_file(name).unlink(missing_ok=True)
    _remove_sockets(record)
    return f"stopped {name} (pid {record['pid']})"


def _remove_sockets(record: dict) -> None:
    """SeaweedFS leaves some of its ``/tmp/seaweedfs-*-<port>.sock`` behind; remove ours."""
    for port in (record.get("ports") or {}).values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                path.unlink(missing_ok=True)


def status() -> dict[str, int | None]:
    """The PID of each service that runs (stale or corrupt pid files are removed)."""
    running = {}
    for name in NAMES:
        record, _ = _recorded(name)
        running[name] = record["pid"] if record else None
    return running


def environment(ports: Ports | None = None, prefect: bool = False) -> dict[str, str]:
    """The variables that point the pipeline at these services."""
    ports = ports or Ports()
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


def check_secrets() -> None:
    """Refuse early (before starting anything) secret files that others could read or write."""
    credentials()
    path = services_dir() / "env"
    if os.path.lexists(path):
        check_private(path)


def write_env_file(env: dict[str, str]) -> Path:
    """``<state>/services/env`` (0600, atomic); an existing one others could read is refused, not reused."""
    path = services_dir() / "env"
    if os.path.lexists(path):
        check_private(path)
    return write_private(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
