"""Ray: a pool of ``ConceptWorker`` actors, one per GPU (or per CPU without GPUs).

The same code runs on a local Ray (every listener on 127.0.0.1, no dashboard) and on
a cluster (``RAY_ADDRESS``). Pools are kept per process, model and device, so
consecutive flows in one process reuse loaded models instead of paying for actor
start-up again.

A stage goes to whichever actor is idle (callers block until one is). A stage whose
actor died (killed, crashed, lost its node) gets a fresh actor and runs once more on
it (every stage skips work already published, so a rerun is safe); an actor that
outlives its stage's timeout is killed and replaced. Settings, from the environment:

- ``ERASURE_DEVICE``: ``auto`` (default: GPUs when the cluster has any, else CPUs),
  ``gpu`` (an error without GPUs, never a silent CPU fallback) or ``cpu``;
- ``ERASURE_RAY_TIMEOUT``: seconds a stage may run on its actor (default 3600);
- ``ERASURE_RAY_STARTUP_TIMEOUT``: seconds an actor may take to start, model
  loaded (default 600);
- ``ERASURE_RAY_CPUS``: CPUs of a local Ray (default: all of them).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from erasure.errors import ErasureError
from tasks.jobs import Job
from tasks.state import ConfigError, env_count, env_seconds, private_dir, state_dir
from tasks.store import store_settings
from tasks.worker import ConceptWorker

logger = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
STAGE_TIMEOUT_S = 3600.0
STARTUP_TIMEOUT_S = 600.0

_pools: dict[tuple, WorkerPool] = {}
_lock = threading.Lock()
_ray_lock = threading.Lock()


class StageTimeout(ErasureError, TimeoutError):
    """A stage (or an actor's start-up) ran past its timeout on Ray."""


class WorkerLost(ErasureError, RuntimeError):
    """A stage lost its actor twice in a row, or the pool was shut down under it."""


class FingerprintMismatch(ErasureError, RuntimeError):
    """The pool's actors did not load the same base model."""


class DeviceUnavailable(ErasureError, RuntimeError):
    """GPU workers were asked for on a Ray cluster without GPUs."""

    retry_helps = False


def stage_timeout() -> float:
    return env_seconds("ERASURE_RAY_TIMEOUT", STAGE_TIMEOUT_S)


def startup_timeout() -> float:
    return env_seconds("ERASURE_RAY_STARTUP_TIMEOUT", STARTUP_TIMEOUT_S)


def _no_api_server(self, *, include_dashboard, raise_on_failure) -> None:
    """Stands in for ``Node.start_api_server``: Ray 2.60 starts its dashboard process
    even with ``include_dashboard=False``; Ray treats a missing one like one that failed
    to start, which it tolerates."""


def ensure_ray() -> None:
    with _ray_lock:
        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
            return
        # Local Ray, loopback only. Ray 2.60 binds its gRPC servers (GCS, raylet, object
        # manager, every worker) to all interfaces unless the node IP is loopback, and
        # turns a node IP of 127.0.0.1 into the machine's external address
        # (services.resolve_ip_for_localhost) unless "clusters" are disabled
        # (ray_constants.ENABLE_RAY_CLUSTER, read from the variable below when ray is
        # imported: the processes Ray starts read it from our environment, this process
        # needs it patched). With a loopback node IP the agents, the autoscaler monitor
        # and the metrics exporters bind to 127.0.0.1 as well. The dashboard process is
        # not started at all.
        from ray._private import ray_constants
        from ray._private.node import Node

        if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER") or not hasattr(Node, "start_api_server"):
            raise RuntimeError(
                f"ray {ray.__version__} changed the internals that keep local Ray on loopback; install the "
                "version pyproject.toml pins (tests/integration/test_ray.py checks the listeners)"
            )

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        temp_dir = _private_ray_files()
        with (
            mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False),
            mock.patch.object(Node, "start_api_server", _no_api_server),
        ):
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                dashboard_host="127.0.0.1",
                log_to_driver=False,
                num_cpus=env_count("ERASURE_RAY_CPUS", os.cpu_count() or 1),
                _temp_dir=str(temp_dir),
            )


# Ray's Unix sockets live at <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, about
# 62 characters below its temp folder, and a socket path may have at most 107
RAY_TEMP_MAX_CHARS = 40
_token_set: list[str | None] = [None]  # the token path this process set, not an operator's


def _private_ray_files() -> Path:
    """Where a local Ray keeps its files, and its authentication token: ``<state>/ray`` (0700; Ray
    makes its own temp folder inside 0777, which the private parent closes), the token a 0600 file
    in it. Ray 2.60 turns token authentication on for local clusters and would otherwise write the
    token to ``~/.ray/auth_token`` (0644) and its sessions to ``/tmp/ray`` (0777), shared by every
    state folder. A state folder too deep for Ray's socket paths gets a private folder of this
    user's under the system's temp folder instead, named after it."""
    import hashlib
    import secrets
    import tempfile

    folder = private_dir(state_dir() / "ray")
    token = folder / "auth-token"
    if not token.exists():  # written whole, then linked into place: two first runs agree on one token
        draft = folder / f".auth-token.{secrets.token_hex(6)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(draft, token)
        except FileExistsError:
            pass  # another first run's: the same folder, so as good
        finally:
            draft.unlink()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # an operator's own choice wins
    if os.environ.get("RAY_AUTH_TOKEN_PATH") in (None, "", _token_set[0]):  # ours from an earlier state folder
        os.environ["RAY_AUTH_TOKEN_PATH"] = _token_set[0] = str(token)
    # Ray read both when it was imported (its config and token loader cache them): read again
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError as error:
        raise RuntimeError(
            f"ray {ray.__version__} moved the token loader that local Ray's private token needs; install the "
            "version pyproject.toml pins (tests/integration/test_ray.py checks the token's place)"
        ) from error
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    if len(str(folder / "tmp")) <= RAY_TEMP_MAX_CHARS:
        return folder / "tmp"
    short = Path(tempfile.gettempdir()) / f"erasure-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    info = short.lstat()  # a symlink planted there by another user is not followed
    if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
        # planted by someone else (in a sticky /tmp its owner alone can remove it): a fresh private one
        return Path(tempfile.mkdtemp(prefix=f"erasure-{os.getuid()}-"))
    if info.st_mode & 0o077:
        short.chmod(0o700)
    return short / hashlib.sha256(str(folder).encode()).hexdigest()[:12]


def resolve_device(device: str | None = None) -> str:
    """``device`` (else ``ERASURE_DEVICE``, else ``auto``) as ``gpu`` or ``cpu`` on this cluster."""
    wanted = (device or os.environ.get("ERASURE_DEVICE") or "auto").strip().lower()
    if wanted not in DEVICES:
        raise ConfigError(f"device {wanted!r} is not one of {', '.join(DEVICES)} (parameter or ERASURE_DEVICE)")
    ensure_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    if wanted == "gpu" and gpus < 1:
        raise DeviceUnavailable(
            "GPU workers were asked for (device=gpu / ERASURE_DEVICE=gpu) but the Ray cluster has no GPU; "
            "use device=cpu (or auto) to run on CPUs"
        )
    if wanted == "auto":
        return "gpu" if gpus >= 1 else "cpu"
    return wanted


@dataclass
class _Slot:
    """One place in the pool: its current actor, and whether that actor was checked."""

    actor: ray.actor.ActorHandle
    verified: bool


class WorkerPool:
    """``size`` actors holding ``model``; each stage goes to an idle actor."""

    def __init__(self, model: str, size: int, device: str | None = None):
        ensure_ray()
        self.model, self.size = model, size
        self.device = resolve_device(device)
        resource = "GPU" if self.device == "gpu" else "CPU"
        deadline = time.time() + 30  # actors just killed release their resources asynchronously
        while (available := ray.available_resources().get(resource, 0)) < size and time.time() < deadline:
            time.sleep(0.2)
        if available < size:
            raise RuntimeError(
                f"{size} worker(s) need {size} {resource}(s) but Ray has {available:g} free "
                f"({ray.cluster_resources().get(resource, 0):g} in all); ask for fewer --workers"
            )
        self.store_url, self.endpoint = store_settings()
        # the pool replaces dead actors itself, so Ray neither restarts them nor retries their tasks
        self._worker = ray.remote(max_restarts=0, max_task_retries=0)(ConceptWorker)
        self._closed = False
        self._ready = threading.Condition()
        self._slots: list[_Slot] = []
        try:
            self._slots.extend(_Slot(self._spawn(), verified=True) for _ in range(size))
            # every actor must be up (model loaded, store reachable) and hold the same base model
            infos = self._startup([slot.actor for slot in self._slots])
            fingerprints = {info["fingerprint"] for info in infos}
            if len(fingerprints) > 1:
                raise FingerprintMismatch(
                    f"the {size} workers for {model!r} loaded different base models: "
                    + "; ".join(f"worker {i} on {info['host']}: {info['fingerprint']}" for i, info in enumerate(infos))
                    + ". Every node must hold the same model files"
                )
        except BaseException:
            self.shutdown()
            raise
        self.fingerprint = fingerprints.pop()
        self.pipeline_class = infos[0].get("pipeline_class")  # a family's (SDXL, SD 3, ...) or None: one model, one class
        self._idle = list(self._slots)

    @property
    def actors(self) -> list:
        return [slot.actor for slot in self._slots]

    # ------------------------------------------------------------------ stages

    def run(self, job: Job):
        """Run one stage's job (``tasks.jobs``) on whichever actor is idle; its result."""
        if job.model != self.model:
            raise ValueError(f"a job for {job.model!r} sent to the pool of {self.model!r}")
        return self._run(job.label, lambda actor: actor.run.remote(job))

    # ------------------------------------------------------------------ dispatch

    def _run(self, stage: str, submit: Callable[[ray.actor.ActorHandle], ray.ObjectRef]):
        """``submit`` the stage to an idle actor and wait for it (at most ``ERASURE_RAY_TIMEOUT``).

        An actor that died is replaced and the stage runs again. Several actors may have died
        while idle (a node lost, actors killed), so a stage may meet each of them once; it fails
        when it has lost a worker started for it twice (the stage itself kills its workers), or
        three workers of any kind. An actor past the timeout is killed and
        replaced, and the stage fails."""
        timeout = stage_timeout()
        lost, lost_new = 0, 0
        while True:
            slot = self._acquire(stage)
            new = not slot.verified  # started since the pool last saw it work: not a stale corpse
            try:
                if not slot.verified:
                    self._verify(slot)
                result = self._get(submit(slot.actor), timeout, f"stage {stage}", "ERASURE_RAY_TIMEOUT")
            except RayActorError as error:
                self._replace(slot)
                lost, lost_new = lost + 1, lost_new + new
                if lost_new == 2 or lost > min(len(self._slots), 2):  # a stage that kills workers takes 3 at most
                    raise WorkerLost(f"stage {stage} lost its Ray worker {lost} times ({lost_new} started for it): {error}") from error
                logger.warning("stage %s lost its Ray worker (%s); running it on a new worker", stage, error)
                continue
            except (StageTimeout, FingerprintMismatch):
                self._replace(slot)
                raise
            except RayTaskError as error:
                self._release(slot)  # the stage failed, its actor is fine
                if isinstance(error.cause, ErasureError):
                    # a product error says what to fix in its message, which Ray's wrapper would bury under
                    # the worker's traceback: that stays with the error as a note, and in the log
                    logger.info("stage %s failed on its worker:\n%s", stage, error)
                    error.cause.add_note(f"on the Ray worker:\n{error}")
                    raise error.cause from None
                raise
            except BaseException:
                self._release(slot)  # the stage failed, its actor is fine
                raise
            self._release(slot)
            return result

    def _get(self, refs, timeout: float, what: str, variable: str):
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as error:
            raise StageTimeout(
                f"{what} for {self.model!r} did not finish within {timeout:g} s on Ray "
                f"(raise {variable} if it needs longer)"
            ) from error

    def _startup(self, actors: list):
        """The actors' ``info()`` once they are up: model loaded, store reachable."""
        refs = [actor.info.remote() for actor in actors]
        return self._get(refs, startup_timeout(), "worker start-up", "ERASURE_RAY_STARTUP_TIMEOUT")

    def _spawn(self):
        if self.device == "gpu":
            # one GPU per actor; torch picks its own threads
            return self._worker.options(num_gpus=1).remote(self.model, self.store_url, self.endpoint, "cuda", None)
        # one CPU and one torch thread per actor: actors share the cores
        return self._worker.options(num_cpus=1).remote(self.model, self.store_url, self.endpoint, "cpu", 1)

    def _verify(self, slot: _Slot) -> None:
        """A replacement actor must be up and hold the pool's base model before it gets work."""
        (info,) = self._startup([slot.actor])
        if info["fingerprint"] != self.fingerprint:
            raise FingerprintMismatch(
                f"a new worker for {self.model!r} on {info['host']} loaded base model {info['fingerprint']}, "
                f"the pool holds {self.fingerprint}. Every node must hold the same model files"
            )
        slot.verified = True

    def _acquire(self, stage: str) -> _Slot:
        with self._ready:
            while not self._idle:
                if self._closed:
                    raise WorkerLost(f"stage {stage}: the worker pool for {self.model!r} was shut down")
                self._ready.wait()
            if self._closed:
                raise WorkerLost(f"stage {stage}: the worker pool for {self.model!r} was shut down")
            return self._idle.pop()

    def _release(self, slot: _Slot) -> None:
        with self._ready:
            if self._closed:
                ray.kill(slot.actor)
                return
            self._idle.append(slot)
            self._ready.notify()

    def _replace(self, slot: _Slot) -> None:
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        if not self._closed:
            slot.actor, slot.verified = self._spawn(), False  # starts in the background, checked on first use
        self._release(slot)

    def shutdown(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass


def worker_pool(model: str, size: int, device: str | None = None, replace: bool = True) -> WorkerPool | None:
    """The process's pool for ``model`` on ``device`` (see ``resolve_device``): reused when it has
    at least ``size`` workers, else replaced (pools hold their CPUs/GPUs, so two pools side by
    side could starve each other); with ``replace`` False, None instead of replacing one.

    The first call starts a local Ray: make it from a thread that lives as long as the pool (the
    main thread), since Ray's local processes die with the thread that started them."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"workers must be a whole number >= 1, not {size!r}")
    store_url, endpoint = store_settings()
    resolved = resolve_device(device)
    with _lock:
        key = (model, store_url, endpoint, resolved)
        for (pool_key, pool_size), pool in _pools.items():
            if pool_key == key and pool_size >= size:
                return pool
        if _pools and not replace:
            return None
        for pool in _pools.values():
            pool.shutdown()
        _pools.clear()
        pool = _pools[(key, size)] = WorkerPool(model, size, resolved)
        return pool


def warm_pool(model: str | Callable[[], str], size: int) -> threading.Thread | None:
    """Start Ray here, then the process's pool in a background thread, so that the actors' cold
    start (each importing torch and loading the model: about 6 s on a CPU) overlaps other start-up
    work (the command line: Prefect starting its temporary API server, 12 s). ``model`` may be a
    callable (a registered version's base model, read from MLflow in the thread). A
    ``worker_pool`` call meanwhile waits for this one and reuses its pool. A failure is only
    logged here: the flow's own ``worker_pool`` call meets it again and reports it."""

    # Ray starts here, in the calling thread: the processes of a local Ray die with the *thread*
    # that started them (Linux's parent-death signal), and this thread outlives the flow
    try:
        ensure_ray()
    except Exception as error:  # noqa: BLE001 (reported by the flow's own call)
        logger.debug("starting Ray failed (the flow will say why): %s", error)
        return None

    def start() -> None:
        try:
            worker_pool(model() if callable(model) else model, size, replace=False)  # never a pool a flow uses
        except Exception as error:  # noqa: BLE001 (reported by the flow's own call)
            logger.debug("warming the worker pool failed (the flow will say why): %s", error)

    thread = threading.Thread(target=start, name="erasure-warm-pool", daemon=True)
    thread.start()
    return thread


def drop_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.shutdown()
        _pools.clear()
