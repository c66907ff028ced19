"""Local services' state, secrets and PIDs: nothing committed, secrets 0600, no stranger ever signalled."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import services as svc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def _git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_git_tracks_no_service_state_and_no_secret():
    tracked = _git("ls-files", "-z").stdout.split("\0")
    secret_words = ("credentials", "passphrase", "session_key")
    offending = [
        path for path in tracked if path and (
            path.startswith(".erasure/")
            or path.endswith((".db", ".pid", ".log"))  # training provenance is committed as training-log.txt
            or any(word in Path(path).name for word in secret_words)
            or Path(path).name.startswith(".mini_")
        )
    ]
    assert offending == []


def test_gitignore_ignores_the_state_folder():
    for path in (".erasure/services/s3-credentials", ".erasure/services/seaweedfs/1.dat", "sub/.erasure/services/env"):
        assert _git("check-ignore", "--no-index", "-q", path).returncode == 0, path


def test_state_lives_in_one_folder(state, monkeypatch):
    assert svc.services_dir() == state.resolve() / "services"
    monkeypatch.delenv("ERASURE_STATE_DIR")
    monkeypatch.chdir(state.parent)
    assert svc.services_dir() == state.parent.resolve() / ".erasure" / "services"


def test_credentials_are_created_0600_and_a_loose_file_is_refused(state):
    key, secret = svc.credentials()
    path = svc.services_dir() / "s3-credentials"
    assert (path.stat().st_mode & 0o777) == 0o600 and len(secret) >= 32
    assert (state.stat().st_mode & 0o777) == (path.parent.stat().st_mode & 0o777) == 0o700
    assert svc.credentials() == (key, secret)  # reused, not regenerated
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []

    path.chmod(0o644)
    with pytest.raises(svc.ServiceError, match=f"chmod 600 {path}"):
        svc.credentials()
    path.unlink()  # deleting it regenerates
    assert svc.credentials()[1] != secret


def test_env_file_is_0600_and_a_loose_one_is_refused(state):
    path = svc.write_env_file({"AWS_SECRET_ACCESS_KEY": "s3cret value"})
    assert (path.stat().st_mode & 0o777) == 0o600
    assert path.read_text() == "export AWS_SECRET_ACCESS_KEY='s3cret value'\n"
    path.chmod(0o640)
    with pytest.raises(svc.ServiceError, match="chmod 600"):
        svc.write_env_file({"A": "b"})


@pytest.fixture
def sleeper():
    """A process that is none of our services, in its own process group."""
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def _write_pid_file(name: str, pid: int, **changes) -> Path:
    start_time, cmdline, _ = svc._identity(pid)
    path = svc.services_dir() / f"{name}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "start_time": start_time, "cmdline": cmdline} | changes))
    return path


@pytest.mark.parametrize("field", ["start_time", "cmdline"])
def test_a_reused_pid_is_never_signalled(state, sleeper, field):
    start_time, cmdline, _ = svc._identity(sleeper.pid)
    wrong = {"start_time": start_time + 1, "cmdline": [*cmdline, "-s3.port=8333"]}[field]
    path = _write_pid_file("s3", sleeper.pid, **{field: wrong})
    message = svc.stop("s3")
    assert "another process" in message and "without signalling" in message
    assert sleeper.poll() is None  # still running
    assert not path.exists()
    assert svc.status()["s3"] is None


@pytest.mark.parametrize("content", ["", "not json", "12345", '{"pid": "x"}', '{"pid": 1, "start_time": 0, "cmdline": []}', b"\xff\xfe"])
def test_an_empty_or_corrupt_pid_file_gives_a_clean_message(state, content):
    path = svc.services_dir() / "mlflow.pid"
    path.parent.mkdir(parents=True)
    write = path.write_bytes if isinstance(content, bytes) else path.write_text
    write(content)
    assert "empty or corrupt" in svc.stop("mlflow")
    assert not path.exists()
    write(content)
    assert svc.status()["mlflow"] is None


def test_the_recorded_process_is_stopped_with_its_group(state, sleeper):
    _write_pid_file("prefect", sleeper.pid)
    assert svc.status()["prefect"] == sleeper.pid
    assert svc.stop("prefect").startswith("stopped prefect")
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_a_process_that_leads_no_group_is_not_signalled_with_killpg(state, monkeypatch):
    process = subprocess.Popen(["sleep", "30"])  # in our process group
    try:
        assert os.getpgid(process.pid) != process.pid
        _write_pid_file("s3", process.pid)
        groups = []
        monkeypatch.setattr(os, "killpg", lambda pgid, signum: groups.append(pgid))
        assert svc.stop("s3").startswith("stopped s3")
        assert groups == [] and process.wait(timeout=5) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()


def test_services_down_reports_a_corrupt_pid_file_without_a_traceback(state):
    from typer.testing import CliRunner

    from cli.main import app

    path = svc.services_dir() / "s3.pid"
    path.parent.mkdir(parents=True)
    path.write_text("")
    result = CliRunner().invoke(app, ["services", "down"])
    assert result.exit_code == 0 and result.exception is None
    assert "empty or corrupt" in result.output


def test_services_up_refuses_a_loose_secret_before_starting_anything(state, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(svc, "_start", lambda *a, **k: pytest.fail("started a service"))
    path = svc.write_env_file({"A": "b"})
    path.chmod(0o604)
    result = CliRunner().invoke(app, ["services", "up"])
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_an_open_state_folder_left_by_an_earlier_version_is_tightened(tmp_path, monkeypatch):
    from tasks.state import private_dir

    state = tmp_path / "state"
    (state / "services").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    monkeypatch.setenv("ERASURE_STATE_DIR", str(state))
    private_dir(state / "services")
    assert (state.stat().st_mode & 0o777, (state / "services").stat().st_mode & 0o777) == (0o700, 0o700)


def test_a_state_folder_that_is_not_ours_is_refused_and_left_untouched(tmp_path, monkeypatch):
    """Issue 22, finding 3: ERASURE_STATE_DIR=/ made / mode 0700 and wrote mlflow.db into it."""
    from tasks.state import StateDirError, private_dir, state_dir

    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    home.chmod(0o755)
    monkeypatch.setenv("ERASURE_STATE_DIR", str(home))
    for path in (state_dir(), state_dir() / "store", state_dir() / "services"):
        with pytest.raises(StateDirError, match="not an erasure state folder .*documents.*new or empty folder"):
            private_dir(path)
    assert home.stat().st_mode & 0o777 == 0o755 and sorted(os.listdir(home)) == ["documents"]

    # the registry's default MLflow database is refused before anything is written
    from tasks import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(StateDirError):
        registry.configure()
    assert sorted(os.listdir(home)) == ["documents"]

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    monkeypatch.setenv("ERASURE_STATE_DIR", str(empty))
    private_dir(empty / "store")  # an empty folder is adopted and marked
    assert (empty / ".erasure-state").is_file() and empty.stat().st_mode & 0o777 == 0o700
    (empty / "notes.txt").write_text("mine")
    private_dir(empty / "services")  # marked: ours, whatever it holds now


def test_two_services_up_at_once_start_one_server(tmp_path, monkeypatch):
    """Both used to pass the "already running?" check and launch; the loser then deleted the
    winner's pid file, leaving a server nobody could stop."""
    import threading

    from cli import services as svc

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    launched = []
    real_popen = svc.subprocess.Popen

    def popen(command, **kwargs):
        launched.append(command)
        return real_popen([sys.executable, "-c", "import time; time.sleep(30)"], **kwargs)

    monkeypatch.setattr(svc.subprocess, "Popen", popen)
    ready_after = time.time() + 1.0  # the first start takes a while to be ready
    starts = [
        threading.Thread(target=svc._start, args=("fake", ["fake-server"], {}, lambda: time.time() > ready_after, 10, 1))
        for _ in range(2)
    ]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join()
    try:
        assert len(launched) == 1  # the second saw the first's record and did not launch
        assert svc._recorded("fake")[0] is not None  # and the running one is still stoppable
    finally:
        assert svc.stop("fake")


def test_a_server_is_recorded_by_its_command_line_even_when_read_before_it_has_one(tmp_path, monkeypatch):
    """Right after Popen, /proc/<pid>/cmdline can still be empty (a large binary such as weed is
    still being loaded): recorded so, the server's real command line never matched its record,
    `stop` refused to signal it and left it running."""
    from cli import services as svc

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    real_identity = svc._identity
    calls = []

    def identity_read_too_early(pid):
        found = real_identity(pid)
        calls.append(pid)
        if found is not None and len(calls) == 1:
            return found[0], [], found[2]  # what /proc shows before the new program is in place
        return found

    monkeypatch.setattr(svc, "_identity", identity_read_too_early)
    svc._start("fake", [sys.executable, "-c", "import time; time.sleep(30)"], {}, lambda: True, 10, 1)
    record, problem = svc._recorded("fake")
    assert problem is None and record["cmdline"][-1] == "import time; time.sleep(30)"
    pid = record["pid"]
    assert svc.stop("fake")
    deadline = time.time() + 5
    while real_identity(pid) not in (None,) and real_identity(pid)[2] != "Z" and time.time() < deadline:
        time.sleep(0.1)
    assert real_identity(pid) is None or real_identity(pid)[2] == "Z"  # signalled, not orphaned


def test_services_up_with_other_ports_than_the_running_servers_is_refused_not_pointed_at_nothing(state, sleeper, monkeypatch):
    """Issue 22, finding 12: `services up` with changed port variables said "already running" and
    wrote an env file pointing at ports where nothing listened."""
    from typer.testing import CliRunner

    from cli.main import app

    _write_pid_file("mlflow", sleeper.pid, ports={"mlflow": 5123})
    _write_pid_file("s3", sleeper.pid, ports={"s3": 8444})
    with pytest.raises(svc.ServiceError, match="mlflow already runs .* on port 5123, not 5999.*services down"):
        svc.start_mlflow(svc.Ports(mlflow=5999))
    assert svc.start_mlflow(svc.Ports(mlflow=5123)) == 0.0  # the same port: already running
    monkeypatch.setenv("ERASURE_S3_PORT", "8444")
    monkeypatch.setenv("ERASURE_MLFLOW_PORT", "5999")
    result = CliRunner().invoke(app, ["services", "up"])
    assert result.exit_code == 2 and "port 5123, not 5999" in result.output, result.output
    assert not (svc.services_dir() / "env").exists()
    assert sleeper.poll() is None


@pytest.mark.parametrize("value", ["abc", "0", "70000", "-1"])
def test_a_bad_port_variable_is_a_message_naming_it(state, value, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("ERASURE_MLFLOW_PORT", value)
    result = CliRunner().invoke(app, ["services", "up"])
    assert result.exit_code == 2 and "ERASURE_MLFLOW_PORT" in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("variable, value, read", [
    ("ERASURE_LOCK_WAIT_S", "soon", lambda: __import__("tasks.state", fromlist=["x"]).env_seconds("ERASURE_LOCK_WAIT_S", 1)),
    ("ERASURE_RAY_TIMEOUT", "inf", lambda: __import__("tasks.compute", fromlist=["x"]).stage_timeout()),
    ("ERASURE_RAY_CPUS", "two", lambda: __import__("tasks.state", fromlist=["x"]).env_count("ERASURE_RAY_CPUS", 1)),
    ("ERASURE_DEVICE", "tpu", lambda: __import__("tasks.compute", fromlist=["x"]).resolve_device()),
])
def test_a_bad_environment_variable_is_a_message_naming_it_not_a_traceback(monkeypatch, capsys, variable, value, read):
    """Issue 22, finding 15: bad environment variables ended commands with tracebacks (exit 4)."""
    import typer

    from cli.app import report_errors

    monkeypatch.setenv(variable, value)
    with pytest.raises(typer.Exit) as exited:
        report_errors(read)
    printed = capsys.readouterr().err
    assert exited.value.exit_code == 2 and variable in printed and "Traceback" not in printed, printed


def test_a_superscript_digit_is_no_number(monkeypatch):
    from tasks.state import ConfigError, env_count

    monkeypatch.setenv("ERASURE_RAY_CPUS", "²")  # str.isdigit() says yes, int() says no
    with pytest.raises(ConfigError, match="ERASURE_RAY_CPUS"):
        env_count("ERASURE_RAY_CPUS", 1)
