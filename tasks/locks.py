"""Locks: the registry's read-modify-write steps (a model's ``candidate`` alias) and the store's per-key swaps.

- ``file_lock(path)``: ``fcntl.flock`` on a file (a local store; every process on this
  machine). The kernel releases it when its holder dies, so a crash never blocks.
- ``S3Lock``: an object created with a conditional put (``If-None-Match: *``): exactly
  one writer creates it. The holder renews a lease (``expires``) with conditional puts
  (``If-Match: <its ETag>``) from a heartbeat thread; a holder that crashed stops
  renewing, and once its lease has expired a waiter takes the lock over with the same
  conditional put, which only one waiter can win. Release is a conditional delete.
  An endpoint that ignores conditional writes is detected once per process (a probe)
  and refused: a lock that cannot exclude is an error, never a silent no-op.
- ``tasks.store.model_lock(name)``: the lock of a registered model, in the configured artifact
  store (``ERASURE_STORE``): a file under ``<root>/.locks/registry/`` or an object
  under ``<prefix>/.locks/registry/``.

Settings, from the environment: ``ERASURE_LOCK_WAIT_S`` (how long to wait for a lock,
default 3600), ``ERASURE_LOCK_LEASE_S`` (an S3 lock's lease, default 60; renewed every
quarter of it). Lease expiry compares wall clocks of different machines: keep them in
sync to well within the lease.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from erasure.errors import ErasureError
from tasks.state import env_seconds

logger = logging.getLogger(__name__)

WAIT_S = 3600.0
LEASE_S = 60.0
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_probed: set[tuple] = set()
_probe_lock = threading.Lock()


class LockError(ErasureError, RuntimeError):
    """A lock could not be taken or was lost."""


class LockTimeout(LockError):
    """Waited too long for a lock another flow holds."""


class LockLost(LockError):
    """An S3 lock's lease expired and another holder took it over."""


def safe_name(name: str) -> str:
    """A file and object name for any model name: readable, and unique by a hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60].strip("._") or "model"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


class _Held:
    """What ``file_lock`` yields: a flock cannot be lost while its file is open."""

    def ensure(self) -> None:
        return None


@contextmanager
def file_lock(path: Path | str, wait_s: float | None = None, what: str | None = None) -> Iterator[_Held]:
    """Exclusive ``flock`` on ``path`` (created if missing); ``wait_s`` None waits for ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what or path} is locked by another flow; waited {wait_s:.0f} s ({path})")
                time.sleep(0.1 + random.random() * 0.1)
        try:
            yield _Held()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _conflict(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and _code(error) in _CONFLICT


def _missing(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and _code(error) in ("404", "NoSuchKey", "NotFound")


class S3Lock:
    """A lease-based lock object ``key`` in ``bucket`` (see the module's docstring)."""

    def __init__(self, client, bucket: str, key: str, where: str = "", what: str = "",
                 lease_s: float | None = None, wait_s: float | None = None):
        self.client, self.bucket, self.key = client, bucket, key
        self.where, self.what = where or f"s3://{bucket}", what or key
        self.lease_s = lease_s if lease_s is not None else env_seconds("ERASURE_LOCK_LEASE_S", LEASE_S)
        self.wait_s = wait_s if wait_s is not None else env_seconds("ERASURE_LOCK_WAIT_S", WAIT_S)
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self._renewed = float("-inf")  # monotonic time the last successful lease write was sent
        self.lost = False
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "expires": time.time() + self.lease_s, "lock": self.what,
        }).encode()

    def _read(self) -> tuple[dict, str] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as error:
            if _missing(error):
                return None
            raise LockError(f"reading lock {self.key} on {self.where} failed: {error}") from None
        try:
            holder = json.loads(response["Body"].read())
            float(holder["expires"])
        except (ValueError, KeyError, TypeError):
            holder = {"expires": 0, "owner": "?", "host": "?", "pid": "?"}  # unreadable: treat as expired
        return holder, response["ETag"]

    def _put(self, **condition) -> str:
        sent = time.monotonic()  # the lease written runs from about now
        etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]
        self._renewed = sent
        return etag

    def acquire(self) -> S3Lock:
        _probe_conditional_writes(self.client, self.bucket, self.key.rsplit("/", 1)[0], self.where)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as error:
                if not _conflict(error):
                    raise LockError(f"taking lock {self.key} on {self.where} failed: {error}") from None
            current = self._read()
            if current is None:
                continue  # released in between: try again at once
            holder, etag = current
            if float(holder["expires"]) < time.time():
                try:
                    self.etag = self._put(IfMatch=etag)  # take over an expired lease: one waiter wins
                    logger.warning("took over %s: the lease of %s pid %s had expired", self.what, holder.get("host"), holder.get("pid"))
                    break
                except Exception as error:
                    if not _conflict(error):
                        raise LockError(f"taking over lock {self.key} on {self.where} failed: {error}") from None
                    continue
            if time.monotonic() > deadline:
                raise LockTimeout(
                    f"{self.what} is locked by {holder.get('host')} pid {holder.get('pid')} (lease until "
                    f"{time.strftime('%H:%M:%S', time.localtime(float(holder['expires'])))}); waited {self.wait_s:.0f} s "
                    f"({self.key} on {self.where})"
                )
            time.sleep(0.3 + random.random() * 0.4)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._state:
                if self._stop.is_set():
                    return
                try:
                    self.etag = self._put(IfMatch=self.etag)
                except Exception as error:
                    if _conflict(error) or self._lapsed():
                        self.lost = True
                        logger.error("lost %s: %s", self.what, error)
                        return
                    logger.warning("renewing %s failed (will retry): %s", self.what, error)

    def _lapsed(self) -> bool:
        """True once the lease may have run out: another flow may take the lock over now. Judged by
        this process's clock from the last renewal that succeeded, with a margin, never by
        whether a renewal call in flight has returned yet."""
        return time.monotonic() > self._renewed + self.lease_s * 0.8

    def ensure(self) -> None:
        """Raise ``LockLost`` if the lease lapsed (or may have) and someone else may hold the lock."""
        if self.lost or self._lapsed():
            self.lost = True
            raise LockLost(f"lost {self.what} ({self.key} on {self.where}): its lease expired and another flow may hold it")

    def release(self) -> None:
        self._stop.set()
        with self._state:
            pass  # a renewal in flight finishes first
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.lost or self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as error:
            if _conflict(error) or _missing(error):
                logger.warning("%s was taken over before its release", self.what)
            elif _code(error) in ("NotImplemented", "InvalidArgument"):  # no conditional delete: check, then delete
                current = self._read()
                if current is not None and current[0].get("owner") == self.owner:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
            else:  # e.g. the endpoint is down: the lease runs out on its own
                logger.warning("releasing %s failed (its lease expires in %.0f s): %s", self.what, self.lease_s, error)

    def __enter__(self) -> S3Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _probe_conditional_writes(client, bucket: str, folder: str, where: str) -> None:
    """Once per endpoint and bucket: refuse an S3 endpoint that ignores ``If-None-Match``."""
    marker = (getattr(getattr(client, "meta", None), "endpoint_url", None) or id(client), bucket)
    with _probe_lock:
        if marker in _probed:
            return
        key = f"{folder}/.probe-{uuid.uuid4().hex}"
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
            try:
                client.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
                honoured = False
            except Exception as error:
                if not _conflict(error):
                    raise
                honoured = True
        except Exception as error:
            raise LockError(f"cannot test conditional writes on {where}: {error}") from None
        finally:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except Exception:
                pass
        if not honoured:
            raise LockError(
                f"the S3 endpoint {where} ignores conditional writes (If-None-Match), so it cannot hold a lock; "
                "use an endpoint that supports them (AWS S3, SeaweedFS >= 4, MinIO) or a local store"
            )
        _probed.add(marker)
