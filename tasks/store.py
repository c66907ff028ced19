"""The artifact store: one interface, a local folder or S3 (any S3-compatible endpoint).

An artifact is a folder of files under a key. Publishing is atomic and verified:
files go up first, then ``_manifest.json`` with every file's SHA-256; an artifact
exists only once its manifest does, and every read checks the checksums.

- Same key = same inputs: a key already published is never overwritten, so two
  writers of one key cannot leave a reader without the artifact or with a mix of
  two copies. A local store renames a complete folder into place (the loser of a
  race discards its copy); S3 puts each publish's files under a prefix of its own
  (``<key>/<publish_id>/...``) named by the manifest, so a reader always reads the
  files of the manifest it read (manifests without a prefix, from before, still read).
- A corrupt artifact (a file missing, a checksum that does not match, a manifest
  that cannot be parsed or names paths outside the artifact) raises ``ArtifactError``
  naming the key and is unpublished (its manifest removed), so the next run
  recomputes it instead of failing on it for ever.
- Manifest paths are checked: relative, no ``..``, and every file lands inside the
  folder it is fetched to.
- A crashed or killed writer leaves no published half-artifact (at most unreferenced
  files: a local staging folder, or an S3 prefix no manifest names).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Protocol

from erasure.errors import ErasureError
from erasure.staging import make_staging, remove_stale_staging
from tasks.locks import WAIT_S, S3Lock, file_lock, safe_name
from tasks.state import env_seconds, private_dir, state_dir, without_password

MANIFEST = "_manifest.json"
_PUBLISH_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ATTEMPTS = 3  # reads of an artifact that was republished while being read


class ArtifactError(ErasureError, RuntimeError):
    """An artifact is missing, corrupt, or the store cannot be reached."""


class ArtifactMismatch(ArtifactError):
    """The artifact was read whole, and its content is not the one referenced: a fact about the
    artifact, where every other ``ArtifactError`` may be the store's (an outage, a bad read)."""

    retry_helps = False


class _Corrupt(Exception):
    """Internal: what is wrong with a published artifact."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> dict:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}}


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of an artifact's content (its files' paths and checksums): the same for every
    publish of the same bytes, whatever the store or the publish."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ArtifactStore(Protocol):
    """What every store offers (a local folder, S3): atomic publish, verified fetch, a per-name lock."""

    url: str

    def exists(self, key: str) -> bool: ...
    def publish(self, key: str, folder: Path) -> dict: ...
    def fetch(self, key: str, folder: Path, expect_sha256: str | None = None, only: Collection[str] | None = None) -> Path: ...
    def read_manifest(self, key: str) -> dict: ...
    def delete(self, key: str) -> None: ...
    def lock(self, name: str, wait_s: float, what: str): ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid artifact key {key!r}")
    return key.strip("/")


def _chosen(files: dict[str, str], only: Collection[str] | None) -> list[tuple[str, str]]:
    """The manifest's (path, checksum) pairs, or those named in ``only`` (each must be there)."""
    if only is None:
        return list(files.items())
    if isinstance(only, str):
        raise TypeError("only: give a list of paths, not one string")
    missing = sorted(set(only) - set(files))
    if missing:
        raise ArtifactError(f"the artifact holds no {', '.join(missing)}")
    return [(rel, files[rel]) for rel in only]


def _parse_manifest(raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise _Corrupt("manifest is not JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise _Corrupt("manifest has no file list")
    for rel, checksum in manifest["files"].items():
        _check_relpath(rel)
        if not isinstance(checksum, str) or not _SHA256.match(checksum):
            raise _Corrupt(f"manifest has an invalid checksum for {rel!r}")
    files = set(manifest["files"])
    for rel in files:  # "a" and "a/b" cannot both be files
        parents = rel.split("/")[:-1]
        if any("/".join(parents[: i + 1]) in files for i in range(len(parents))):
            raise _Corrupt(f"manifest names {rel!r} inside another listed file")
    prefix = manifest.get("prefix")
    if prefix is not None and not (isinstance(prefix, str) and _PUBLISH_ID.match(prefix)):
        raise _Corrupt(f"manifest names an invalid prefix {prefix!r}")
    return manifest


def _check_relpath(rel) -> str:
    """A manifest path: relative, POSIX, no ``..``, ``.`` or empty parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise _Corrupt(f"manifest names an invalid path {rel!r}")
    if PurePosixPath(rel).is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise _Corrupt(f"manifest names a path outside the artifact: {rel!r}")
    return rel


def _inside(folder: Path, rel: str) -> Path:
    """``folder / rel`` resolved (symlinks included), refused unless it stays inside ``folder``."""
    root = Path(folder).resolve()
    target = (root / _check_relpath(rel)).resolve()
    if target == root or not target.is_relative_to(root):
        raise _Corrupt(f"manifest path {rel!r} leads outside {root}")
    return target


def _verify(key: str, manifest: dict, expect_sha256: str | None, url: str) -> None:
    if expect_sha256 is not None and manifest_digest(manifest) != expect_sha256:
        raise ArtifactMismatch(
            f"artifact {key!r} in {url} has content {manifest_digest(manifest)[:16]}..., not the expected "
            f"{expect_sha256[:16]}... (it was recomputed with different bytes since it was referenced)"
        )


def _corrupt_error(key: str, url: str, problem: Exception, unpublished: bool) -> ArtifactError:
    what = "unpublished it: the next run recomputes it" if unpublished else "it was already unpublished"
    return ArtifactError(f"artifact {key!r} in {url} is corrupt ({problem}); {what}")


class LocalStore:
    """Artifacts as folders under ``root``; publish is a rename of a complete folder.

    Swapping a folder (publish over an unpublished leftover, unpublish) happens under a
    per-key ``flock`` (``<root>/.locks/keys/``); readers take no lock.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def lock(self, name: str, wait_s: float, what: str):
        """The store-wide lock ``name`` (a registered model's: ``model_lock``), a ``flock``ed file."""
        return file_lock(self.root / ".locks" / "registry" / f"{safe_name(name)}.lock", wait_s, what)

    def _lock(self, key: str):
        return file_lock(self.root / ".locks" / "keys" / f"{hashlib.sha256(_check_key(key).encode()).hexdigest()[:32]}.lock")

    def _raw(self, key: str) -> bytes | None:
        try:
            return (self._path(key) / MANIFEST).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return (self._path(key) / MANIFEST).is_file()

    def _discard(self, folder: Path) -> None:
        """Move ``folder`` aside (atomic), then remove it."""
        trash = folder.parent / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def publish(self, key: str, folder: Path) -> dict:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target.parent, target.name)  # a killed writer's
        for trash in target.parent.glob(".trash-*"):  # discarded already: a kill cut its removal short
            shutil.rmtree(trash, ignore_errors=True)
        staging: Path | None = make_staging(target.parent, target.name)
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            os.utime(staging)  # copytree gave it the source's mtime: an old source would look stale
            manifest = folder_manifest(staging) | {"publish_id": uuid.uuid4().hex}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            with self._lock(key):
                raw = self._raw(key)
                if raw is not None:
                    try:  # published by another writer: same key = same inputs, theirs stands
                        return _parse_manifest(raw)
                    except _Corrupt:
                        pass  # an unreadable manifest: replaced below
                if target.exists():  # an unpublished leftover (a crashed writer, an unpublished corrupt copy)
                    self._discard(target)
                os.rename(staging, target)
                staging = None
            return manifest
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def delete(self, key: str) -> None:
        with self._lock(key):
            self._discard(self._path(key))

    def _unpublish(self, key: str, raw: bytes) -> bool:
        """Remove the manifest if it is still ``raw`` (not republished meanwhile); True if removed."""
        with self._lock(key):
            if self._raw(key) != raw:
                return False
            # kept beside, not deleted: a fault on the reader's side must not destroy a good artifact
            quarantine = self._path(key).parent / f".quarantine-{self._path(key).name}-{uuid.uuid4().hex[:8]}.json"
            quarantine.write_bytes(raw)
            (self._path(key) / MANIFEST).unlink(missing_ok=True)
            return True

    def _load(self, key: str) -> tuple[bytes, dict]:
        raw = self._raw(key)
        if raw is None:
            raise ArtifactError(f"artifact {key!r} is not published in {self.url}")
        try:
            return raw, _parse_manifest(raw)
        except _Corrupt as problem:
            raise _corrupt_error(key, self.url, problem, self._unpublish(key, raw)) from None

    def read_manifest(self, key: str) -> dict:
        return self._load(key)[1]

    def fetch(self, key: str, folder: Path, expect_sha256: str | None = None, only: Collection[str] | None = None) -> Path:
        """The artifact's files into ``folder``, each checked against the manifest; ``only``: just these
        (paths relative to the artifact)."""
        folder = Path(folder)
        for _ in range(_ATTEMPTS):
            raw, manifest = self._load(key)
            source = self._path(key)
            try:
                for rel, checksum in _chosen(manifest["files"], only):
                    origin = _inside(source, rel)  # no symlink out of the store either
                    target = _inside(folder, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        shutil.copyfile(origin, target)
                    except FileNotFoundError:
                        raise _Corrupt(f"file {rel} is missing") from None
                    if sha256_file(target) != checksum:
                        raise _Corrupt(f"checksum mismatch for {rel}")
            except _Corrupt as problem:
                if self._unpublish(key, raw):
                    raise _corrupt_error(key, self.url, problem, True) from None
                continue  # republished or deleted while we read: read again
            _verify(key, manifest, expect_sha256, self.url)
            return folder
        raise ArtifactError(f"artifact {key!r} in {self.url} changed while being read, {_ATTEMPTS} times")


class _Conditional(Exception):
    """Internal: a conditional S3 request's condition failed (412/409)."""


class S3Store:
    """Artifacts under ``s3://bucket/prefix/key/``: each publish's files under ``<key>/<publish_id>/``,
    then ``<key>/_manifest.json`` (which names that prefix), written last and only if absent."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        # the URL names the store in messages and in registered versions: never a password in an endpoint
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {without_password(endpoint_url)}" if endpoint_url else "")
        # credentials come from the environment or profile (never from our config, never logged)
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=3, read_timeout=30),
        )

    def lock(self, name: str, wait_s: float, what: str):
        """The store-wide lock ``name`` (a registered model's: ``model_lock``), an object with a lease."""
        key = "/".join(p for p in (self.prefix, ".locks", "registry", safe_name(name)) if p)
        return S3Lock(self.client, self.bucket, key, where=self.url, what=what, wait_s=wait_s)

    def _object(self, key: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, _check_key(key), *parts) if p)

    def _call(self, what: str, fn, *args, conditional: bool = False, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(what) from None
            if conditional and code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise _Conditional(code) from None
            if conditional and code in ("NotImplemented", "501"):
                raise NotImplementedError(code) from None
            raise ArtifactError(f"{what} failed on {self.url}: {code or error}") from None
        except BotoCoreError as error:
            raise ArtifactError(f"{what} failed on {self.url}: {error}") from None

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(f"head bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
            return
        except FileNotFoundError:
            pass
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as error:  # another worker created it a moment ago
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise ArtifactError(f"create bucket {self.bucket} failed on {self.url}: {error}") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._object(key, MANIFEST))
            return True
        except FileNotFoundError:
            return False

    def _raw(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._call(f"read manifest {key}", self.client.get_object, Bucket=self.bucket, Key=self._object(key, MANIFEST))
        except FileNotFoundError:
            return None
        return response["Body"].read(), response.get("ETag", "")

    def _list(self, folder: str) -> list[str]:
        keys, token = [], None
        while True:
            page = self._call(
                f"list {folder}", self.client.list_objects_v2, Bucket=self.bucket, Prefix=folder,
                **({"ContinuationToken": token} if token else {}),
            )
            keys += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return keys

    def _remove(self, objects: list[str]) -> None:
        for name in objects:
            try:
                self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=name)
            except FileNotFoundError:
                pass

    def publish(self, key: str, folder: Path) -> dict:
        folder = Path(folder)
        current = self._raw(key)
        if current is not None:
            try:  # published already: same key = same inputs
                return _parse_manifest(current[0])
            except _Corrupt:
                self._unpublish(key, *current)
        publish_id = uuid.uuid4().hex
        manifest = folder_manifest(folder) | {"publish_id": publish_id, "prefix": publish_id}
        for rel in manifest["files"]:
            self._call(f"upload {key}/{rel}", self.client.upload_file, str(folder / rel), self.bucket, self._object(key, publish_id, rel))
        body = json.dumps(manifest, indent=1).encode()
        target = self._object(key, MANIFEST)
        try:
            self._call(f"publish {key}", self.client.put_object, Bucket=self.bucket, Key=target, Body=body, IfNoneMatch="*", conditional=True)
        except NotImplementedError:  # an endpoint without conditional puts: the last writer's manifest stands
            self._call(f"publish {key}", self.client.put_object, Bucket=self.bucket, Key=target, Body=body)
        except _Conditional:  # another writer published first: theirs stands, our copy goes
            self._remove([self._object(key, publish_id, rel) for rel in manifest["files"]])
            return self.read_manifest(key)
        return manifest

    def delete(self, key: str) -> None:
        """Unpublish first (the manifest), then remove every file under the key."""
        self._call("unpublish", self.client.delete_object, Bucket=self.bucket, Key=self._object(key, MANIFEST))
        self._remove(self._list(self._object(key) + "/"))

    def _unpublish(self, key: str, raw: bytes, etag: str) -> bool:
        """Remove the manifest if it is still the one read (ETag); True if removed. Its files and a
        copy of it stay (``_quarantine/``): a fault on the reader's side (a bad disk, a broken
        download) must not destroy the only copy of a registered model; an operator can put the
        manifest back."""
        target = self._object(key, MANIFEST)
        self._call(
            "quarantine", self.client.put_object, Bucket=self.bucket,
            Key=self._object(key, f"_quarantine/{uuid.uuid4().hex}.json"), Body=raw,
        )
        try:
            self._call("unpublish", self.client.delete_object, Bucket=self.bucket, Key=target, IfMatch=etag, conditional=True)
        except _Conditional:
            return False  # republished meanwhile
        except FileNotFoundError:
            return False
        except NotImplementedError:  # no conditional delete: compare, then delete
            current = self._raw(key)
            if current is None or current[0] != raw:
                return False
            self._call("unpublish", self.client.delete_object, Bucket=self.bucket, Key=target)
        return True

    def _load(self, key: str) -> tuple[bytes, str, dict]:
        current = self._raw(key)
        if current is None:
            raise ArtifactError(f"artifact {key!r} is not published in {self.url}")
        raw, etag = current
        try:
            return raw, etag, _parse_manifest(raw)
        except _Corrupt as problem:
            raise _corrupt_error(key, self.url, problem, self._unpublish(key, raw, etag)) from None

    def read_manifest(self, key: str) -> dict:
        return self._load(key)[2]

    def fetch(self, key: str, folder: Path, expect_sha256: str | None = None, only: Collection[str] | None = None) -> Path:
        """The artifact's files into ``folder``, each checked against the manifest; ``only``: just these
        (paths relative to the artifact)."""
        folder = Path(folder)
        for _ in range(_ATTEMPTS):
            raw, etag, manifest = self._load(key)
            prefix = manifest.get("prefix") or ""  # no prefix: an artifact published before prefixes
            try:
                for rel, checksum in _chosen(manifest["files"], only):
                    target = _inside(folder, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        self._call(f"download {key}/{rel}", self.client.download_file, self.bucket, self._object(key, prefix, rel), str(target))
                    except FileNotFoundError:
                        raise _Corrupt(f"file {rel} is missing") from None
                    if sha256_file(target) != checksum:
                        raise _Corrupt(f"checksum mismatch for {rel}")
            except _Corrupt as problem:
                if self._unpublish(key, raw, etag):
                    raise _corrupt_error(key, self.url, problem, True) from None
                continue  # republished or deleted while we read: read again
            _verify(key, manifest, expect_sha256, self.url)
            return folder
        raise ArtifactError(f"artifact {key!r} in {self.url} changed while being read, {_ATTEMPTS} times")


def store_from_url(url: str, s3_endpoint: str | None = None) -> ArtifactStore:
    """A folder path, or ``s3://bucket/prefix`` (with ``s3_endpoint`` for an S3-compatible server)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        store = S3Store(bucket, prefix, endpoint_url=s3_endpoint)
        store.ensure_bucket()
        return store
    return LocalStore(url)


def store_settings() -> tuple[str, str | None]:
    """(store URL, S3 endpoint) from ``ERASURE_STORE`` (default: ``store`` in the local state folder,
    ``tasks.state``) and ``ERASURE_S3_ENDPOINT``."""
    url = os.environ.get("ERASURE_STORE") or str(private_dir(state_dir() / "store"))
    if not url.startswith("s3://"):
        url = str(Path(url).expanduser().resolve())  # workers may run in another folder
    endpoint = os.environ.get("ERASURE_S3_ENDPOINT") or None
    if endpoint and without_password(endpoint) != endpoint:
        # the endpoint is recorded in every registered version: credentials come from the environment
        raise ArtifactError(
            f"ERASURE_S3_ENDPOINT={without_password(endpoint)!r} carries credentials: give the host alone, and the "
            "credentials as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)"
        )
    return url, endpoint


def model_lock(name: str, wait_s: float | None = None):
    """The lock of registered model ``name`` in the configured artifact store (``ERASURE_LOCK_WAIT_S``
    seconds of waiting by default); a context manager whose handle's ``ensure()`` raises ``LockLost``
    if the lock was lost (check it before an irreversible step)."""
    wait_s = wait_s if wait_s is not None else env_seconds("ERASURE_LOCK_WAIT_S", WAIT_S)
    return store_from_url(*store_settings()).lock(name, wait_s, f"registered model {name!r}")
