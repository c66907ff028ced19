"""The artifact store: one interface, a local folder or S3 (any S3-compatible endpoint).

An artifact is a folder of files under a key. Publishing is atomic and verified:
files go up first, then ``_manifest.json`` with every file's SHA-256; an artifact
exists only once its manifest does, and every read checks the checksums. A
crashed or killed writer leaves no published half-artifact (at most unreferenced
files that the next publish of that key overwrites).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Protocol

MANIFEST = "_manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or the store cannot be reached."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> dict:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}}


class ArtifactStore(Protocol):
    url: str

    def exists(self, key: str) -> bool: ...
    def publish(self, key: str, folder: Path) -> dict: ...
    def fetch(self, key: str, folder: Path) -> Path: ...
    def read_manifest(self, key: str) -> dict: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid artifact key {key!r}")
    return key.strip("/")


class LocalStore:
    """Artifacts as folders under ``root``; publish is a rename of a complete folder."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def exists(self, key: str) -> bool:
        return (self._path(key) / MANIFEST).is_file()

    def publish(self, key: str, folder: Path) -> dict:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            manifest = folder_manifest(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if target.exists():  # same key = same inputs: replace a stale or partial copy
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def delete(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)

    def read_manifest(self, key: str) -> dict:
        path = self._path(key) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"artifact {key!r} is not published in {self.url}")
        return json.loads(path.read_text())

    def fetch(self, key: str, folder: Path) -> Path:
        manifest = self.read_manifest(key)
        source, folder = self._path(key), Path(folder)
        for rel, checksum in manifest["files"].items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, target)
            if sha256_file(target) != checksum:
                raise ArtifactError(f"artifact {key!r}: checksum mismatch for {rel}")
        return folder


class S3Store:
    """Artifacts under ``s3://bucket/prefix/key/``; the manifest object is written last."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        # credentials come from the environment or profile (never from our config, never logged)
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=3, read_timeout=30),
        )

    def _object(self, key: str, rel: str) -> str:
        return "/".join(p for p in (self.prefix, _check_key(key), rel) if p)

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(what) from None
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

    def publish(self, key: str, folder: Path) -> dict:
        folder = Path(folder)
        manifest = folder_manifest(folder)
        manifest["publish_id"] = uuid.uuid4().hex
        for rel in manifest["files"]:
            self._call(f"upload {key}/{rel}", self.client.upload_file, str(folder / rel), self.bucket, self._object(key, rel))
        body = json.dumps(manifest, indent=1).encode()
        self._call(f"publish {key}", self.client.put_object, Bucket=self.bucket, Key=self._object(key, MANIFEST), Body=body)
        return manifest

    def delete(self, key: str) -> None:
        """Unpublish first (the manifest), then remove the files."""
        manifest = self.read_manifest(key) if self.exists(key) else {"files": {}}
        self._call("unpublish", self.client.delete_object, Bucket=self.bucket, Key=self._object(key, MANIFEST))
        for rel in manifest["files"]:
            self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._object(key, rel))

    def read_manifest(self, key: str) -> dict:
        try:
            response = self._call("read manifest", self.client.get_object, Bucket=self.bucket, Key=self._object(key, MANIFEST))
        except FileNotFoundError:
            raise ArtifactError(f"artifact {key!r} is not published in {self.url}") from None
        return json.loads(response["Body"].read())

    def fetch(self, key: str, folder: Path) -> Path:
        manifest = self.read_manifest(key)
        folder = Path(folder)
        for rel, checksum in manifest["files"].items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(f"download {key}/{rel}", self.client.download_file, self.bucket, self._object(key, rel), str(target))
            if sha256_file(target) != checksum:
                raise ArtifactError(f"artifact {key!r}: checksum mismatch for {rel}")
        return folder


def store_from_url(url: str, s3_endpoint: str | None = None) -> ArtifactStore:
    """A folder path, or ``s3://bucket/prefix`` (with ``s3_endpoint`` for an S3-compatible server)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        store = S3Store(bucket, prefix, endpoint_url=s3_endpoint)
        store.ensure_bucket()
        return store
    return LocalStore(url)


def store_settings() -> tuple[str, str | None]:
    """(store URL, S3 endpoint) from ``ERASURE_STORE`` (default ``./erasure-store``) and ``ERASURE_S3_ENDPOINT``."""
    url = os.environ.get("ERASURE_STORE", "erasure-store")
    if not url.startswith("s3://"):
        url = str(Path(url).expanduser().resolve())  # workers may run in another folder
    return url, os.environ.get("ERASURE_S3_ENDPOINT") or None
