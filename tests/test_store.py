"""The artifact store (local and S3) and the locks: path checks, corrupt artifacts, concurrent writers."""

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tasks.locks import LockError, LockTimeout, S3Lock, file_lock
from tasks.store import MANIFEST, ArtifactError, LocalStore, S3Store, manifest_digest, model_lock, sha256_file


class FakeS3:
    """An in-memory S3 client: the calls the store and the locks make, conditional writes included
    (``conditional=False``: an endpoint that ignores them)."""

    def __init__(self, conditional: bool = True):
        self.objects: dict[str, bytes] = {}
        self.conditional = conditional
        self.on_download = None  # hook: called before each download
        self._lock = threading.Lock()

    @staticmethod
    def _error(code: str, status: int, operation: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)

    @staticmethod
    def _etag(data: bytes) -> str:
        return f'"{hashlib.md5(data).hexdigest()}"'

    def head_bucket(self, Bucket):
        return {}

    def head_object(self, Bucket, Key):
        if Key not in self.objects:
            raise self._error("404", 404, "HeadObject")
        return {"ETag": self._etag(self.objects[Key])}

    def get_object(self, Bucket, Key):
        with self._lock:
            if Key not in self.objects:
                raise self._error("NoSuchKey", 404, "GetObject")
            data = self.objects[Key]
        return {"Body": io.BytesIO(data), "ETag": self._etag(data)}

    def put_object(self, Bucket, Key, Body, IfNoneMatch=None, IfMatch=None):
        with self._lock:
            if self.conditional:
                if IfNoneMatch == "*" and Key in self.objects:
                    raise self._error("PreconditionFailed", 412, "PutObject")
                if IfMatch is not None and (Key not in self.objects or self._etag(self.objects[Key]) != IfMatch):
                    raise self._error("PreconditionFailed", 412, "PutObject")
            self.objects[Key] = bytes(Body)
            return {"ETag": self._etag(self.objects[Key])}

    def delete_object(self, Bucket, Key, IfMatch=None):
        with self._lock:
            if self.conditional and IfMatch is not None:
                if Key not in self.objects:
                    raise self._error("NoSuchKey", 404, "DeleteObject")
                if self._etag(self.objects[Key]) != IfMatch:
                    raise self._error("PreconditionFailed", 412, "DeleteObject")
            self.objects.pop(Key, None)
            return {}

    def upload_file(self, Filename, Bucket, Key):
        with self._lock:
            self.objects[Key] = Path(Filename).read_bytes()

    def download_file(self, Bucket, Key, Filename):
        if self.on_download is not None:
            hook, self.on_download = self.on_download, None
            hook()
        with self._lock:
            if Key not in self.objects:
                raise self._error("404", 404, "HeadObject")
            data = self.objects[Key]
        Path(Filename).write_bytes(data)

    def list_objects_v2(self, Bucket, Prefix, ContinuationToken=None):
        with self._lock:
            return {"Contents": [{"Key": k} for k in sorted(self.objects) if k.startswith(Prefix)], "IsTruncated": False}


def blind(store):
    """A writer that does not see a manifest already published when it starts (it checked just
    before another writer published): its publish runs to the end."""
    original_raw, original_publish, state = getattr(store, "_raw", None), store.publish, {"blind": False}

    def raw(key):
        if state["blind"]:
            state["blind"] = False
            return None
        return original_raw(key)

    def publish(key, folder):
        state["blind"] = True
        return original_publish(key, folder)

    store._raw, store.publish = raw, publish
    return store


def s3_store(client=None):
    return S3Store("bucket", "artifacts", client=client or FakeS3())


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    return LocalStore(tmp_path / "store") if request.param == "local" else s3_store()


def artifact(folder: Path, content: bytes = b"weights") -> Path:
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "model.bin").write_bytes(content)
    (folder / "config.json").write_text('{"a": 1}')
    return folder


def write_manifest(store, key: str, manifest: dict) -> None:
    """Publish a crafted manifest (an attacker's, or a corrupted one) over ``key``."""
    body = json.dumps(manifest).encode()
    if isinstance(store, LocalStore):
        (store.root / key).mkdir(parents=True, exist_ok=True)
        (store.root / key / MANIFEST).write_bytes(body)
    else:
        store.client.objects[store._object(key, MANIFEST)] = body


def put_file(store, key: str, rel: str, data: bytes) -> None:
    if isinstance(store, LocalStore):
        path = store.root / key / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store.client.objects[store._object(key, rel)] = data


def stored_files(store, key: str) -> dict:
    """Where each file of a published artifact lies (path or object name)."""
    manifest = store.read_manifest(key)
    if isinstance(store, LocalStore):
        return {rel: store.root / key / rel for rel in manifest["files"]}
    return {rel: store._object(key, manifest.get("prefix", ""), rel) for rel in manifest["files"]}


def test_publish_fetch_roundtrip_and_content_digest(store, tmp_path):
    manifest = store.publish("models/m1", artifact(tmp_path / "a"))
    assert store.exists("models/m1") and not store.exists("models/m2")
    out = store.fetch("models/m1", tmp_path / "out", expect_sha256=manifest_digest(manifest))
    assert (out / "unet" / "model.bin").read_bytes() == b"weights"
    with pytest.raises(ArtifactError, match="models/m1.*not the expected"):
        store.fetch("models/m1", tmp_path / "out2", expect_sha256="0" * 64)
    with pytest.raises(ArtifactError, match="'models/m2' is not published"):
        store.fetch("models/m2", tmp_path / "out3")


def test_fetch_of_only_some_files_reads_just_those_checked(store, tmp_path):
    """A reused model's closure record is read without its weights: ``only`` fetches the named files."""
    store.publish("models/m1", artifact(tmp_path / "a"))
    out = store.fetch("models/m1", tmp_path / "out", only=["config.json"])
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["config.json"]
    with pytest.raises(ArtifactError, match="holds no closure.json"):
        store.fetch("models/m1", tmp_path / "out2", only=["closure.json"])
    put_file(store, "models/m1" if isinstance(store, LocalStore) else f"models/m1/{store.read_manifest('models/m1')['prefix']}",
             "config.json", b"tampered")
    with pytest.raises(ArtifactError):
        store.fetch("models/m1", tmp_path / "out3", only=["config.json"])


@pytest.mark.parametrize("rel", ["../victim.txt", "sub/../../victim.txt", "ABSOLUTE", "./x", "a//b", "a\\..\\b"])
def test_manifest_paths_outside_the_fetch_folder_are_refused(store, tmp_path, rel):
    victim = tmp_path / "fetch" / "victim.txt"
    if rel == "ABSOLUTE":
        rel = str(victim)
    data = b"attacker"
    put_file(store, "models/evil", "../victim.txt" if isinstance(store, LocalStore) else rel, data)
    put_file(store, "models/evil", "ok.txt", data)
    write_manifest(store, "models/evil", {"files": {"ok.txt": hashlib.sha256(data).hexdigest(), rel: hashlib.sha256(data).hexdigest()}})
    with pytest.raises(ArtifactError, match=r"'models/evil'.*corrupt.*(outside|invalid path)"):
        store.fetch("models/evil", tmp_path / "fetch" / "inner")
    assert not victim.exists()
    assert not store.exists("models/evil")  # unpublished: the next run recomputes it


def test_a_symlink_in_the_fetch_folder_does_not_lead_outside(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store.publish("models/m", artifact(tmp_path / "a"))
    folder = tmp_path / "fetch"
    folder.mkdir()
    (folder / "unet").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="'models/m'.*leads outside"):
        store.fetch("models/m", folder)
    assert list(outside.iterdir()) == []


def test_local_store_refuses_files_symlinked_out_of_the_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.publish("models/m", artifact(tmp_path / "a"))
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"weights")  # same checksum as the file it replaces
    target = store.root / "models/m/unet/model.bin"
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(ArtifactError, match="'models/m'.*leads outside"):
        store.fetch("models/m", tmp_path / "out")


@pytest.mark.parametrize("damage", ["flipped byte", "missing file", "garbled manifest"])
def test_corrupt_artifact_is_unpublished_and_recomputed_by_the_next_publish(store, tmp_path, damage):
    store.publish("concepts/cat-1", artifact(tmp_path / "a"))
    location = stored_files(store, "concepts/cat-1")["unet/model.bin"]
    if damage == "garbled manifest":
        write_manifest(store, "concepts/cat-1", {"files": "nonsense"})
    elif isinstance(store, LocalStore):
        if damage == "missing file":
            location.unlink()
        else:
            location.write_bytes(b"weighta")
    elif damage == "missing file":
        del store.client.objects[location]
    else:
        store.client.objects[location] = b"weighta"
    with pytest.raises(ArtifactError, match=r"'concepts/cat-1'.*corrupt.*unpublished"):
        store.fetch("concepts/cat-1", tmp_path / "out")
    assert not store.exists("concepts/cat-1")  # so the worker's next run recomputes it
    # ... but nothing is deleted: the manifest is kept aside, in case the fault was the reader's
    if isinstance(store, LocalStore):
        assert list((store.root / "concepts").glob(".quarantine-cat-1-*.json"))
    else:
        assert any("/_quarantine/" in k for k in store.client.objects)
    with pytest.raises(ArtifactError, match="not published"):
        store.fetch("concepts/cat-1", tmp_path / "out")
    store.publish("concepts/cat-1", artifact(tmp_path / "b"))
    assert (store.fetch("concepts/cat-1", tmp_path / "again") / "unet" / "model.bin").read_bytes() == b"weights"


def test_local_second_writer_never_hides_the_published_artifact(tmp_path, monkeypatch):
    """Old behaviour: the second writer removed the published folder before renaming its own."""
    import tasks.store as module

    store = LocalStore(tmp_path / "store")
    store.publish("models/m", artifact(tmp_path / "a"))
    seen = []

    def checked(original):
        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            seen.append(store.exists("models/m"))
            return result
        return call

    monkeypatch.setattr(module.shutil, "rmtree", checked(module.shutil.rmtree))
    monkeypatch.setattr(module.os, "replace", checked(module.os.replace))
    monkeypatch.setattr(module.os, "rename", checked(module.os.rename))
    store.publish("models/m", artifact(tmp_path / "b", b"weights, computed again"))
    monkeypatch.undo()
    assert seen and all(seen)
    # the first copy stands (same key = same inputs); the second was discarded, not mixed in
    assert (store.fetch("models/m", tmp_path / "out") / "unet" / "model.bin").read_bytes() == b"weights"


@pytest.mark.parametrize("kind", ["local", "s3", "s3 without conditional writes"])
def test_concurrent_writers_and_readers_of_one_key(tmp_path, kind):
    client = FakeS3(conditional=kind == "s3")

    def new_store():
        return LocalStore(tmp_path / "store") if kind == "local" else s3_store(client)

    sources = [artifact(tmp_path / f"src{i}", f"weights {i}".encode()) for i in range(3)]
    new_store().publish("models/m", sources[0])
    stop, failures = threading.Event(), []

    def write(i):
        writer = new_store()
        if not isinstance(writer, LocalStore):
            blind(writer)  # as if every writer had checked before the others published
        while not stop.is_set():
            writer.publish("models/m", sources[i])

    def read(i):
        reader = new_store()
        while not stop.is_set():
            try:
                reader.fetch("models/m", tmp_path / f"read{i}")
            except Exception as error:  # not published, checksum mismatch, a file gone under the reader
                failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=write, args=(i,)) for i in (1, 2)] + [threading.Thread(target=read, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    time.sleep(1.5)
    stop.set()
    [t.join() for t in threads]
    assert failures == []


@pytest.mark.parametrize("conditional", [True, False])
def test_s3_reader_reads_the_files_of_the_manifest_it_read(tmp_path, conditional):
    """Old behaviour: a second writer overwrote the files under the reader (checksum mismatch)."""
    client = FakeS3(conditional)
    reader, writer = s3_store(client), blind(s3_store(client))  # the writer checked before the first published
    reader.publish("models/m", artifact(tmp_path / "a", b"first bytes"))
    client.on_download = lambda: writer.publish("models/m", artifact(tmp_path / "b", b"other bytes"))
    out = reader.fetch("models/m", tmp_path / "out")
    assert (out / "unet" / "model.bin").read_bytes() == b"first bytes"
    assert sha256_file(out / "config.json") == reader.read_manifest("models/m")["files"]["config.json"]
    if conditional:  # the loser of the conditional put removed its files
        assert len([k for k in client.objects if k.endswith("model.bin")]) == 1


def test_s3_reads_artifacts_published_without_a_prefix(tmp_path):
    store = s3_store()
    data = b"old layout"
    put_file(store, "models/old", "unet/model.bin", data)
    write_manifest(store, "models/old", {"files": {"unet/model.bin": hashlib.sha256(data).hexdigest()}})
    assert (store.fetch("models/old", tmp_path / "out") / "unet" / "model.bin").read_bytes() == data
    store.delete("models/old")
    assert store.client.objects == {}


def test_file_lock_excludes_threads(tmp_path):
    inside, overlaps = [], []

    def hold():
        with file_lock(tmp_path / "locks" / "m.lock"):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert overlaps == []
    with file_lock(tmp_path / "locks" / "m.lock"):
        with pytest.raises(LockTimeout, match="locked by another flow"):
            with file_lock(tmp_path / "locks" / "m.lock", wait_s=0.3):
                pass


def test_model_lock_in_a_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_STORE", str(tmp_path / "store"))
    with model_lock("brand safe") as held:
        held.ensure()
        with pytest.raises(LockTimeout, match="registered model 'brand safe'"):
            with model_lock("brand safe", wait_s=0.3):
                pass
        with model_lock("another"):
            pass
    assert list((tmp_path / "store" / ".locks" / "registry").iterdir())


def test_s3_lock_excludes_and_an_expired_lease_is_taken_over():
    client = FakeS3()
    inside, overlaps = [], []

    def hold():
        with S3Lock(client, "bucket", "locks/m", lease_s=5, wait_s=30):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert overlaps == [] and "locks/m" not in client.objects  # every holder released it

    # leases long enough that a loaded machine's pauses cannot expire one before the test means it to
    crashed = S3Lock(client, "bucket", "locks/m", lease_s=4)
    crashed.acquire()
    crashed._stop.set()  # the holder dies: no more renewals
    with pytest.raises(LockTimeout, match="locked by"):
        S3Lock(client, "bucket", "locks/m", wait_s=0.2).acquire()
    # taken once the dead holder's lease ran out (a lock that never expired would raise LockTimeout)
    with S3Lock(client, "bucket", "locks/m", wait_s=30) as taker:
        assert json.loads(client.objects["locks/m"])["owner"] == taker.owner
        crashed.release()  # the old holder's late release must not free the new holder's lock
        assert json.loads(client.objects["locks/m"])["owner"] == taker.owner


def test_s3_lock_renews_its_lease():
    client = FakeS3()
    # renewed every quarter lease: 1.5 s leaves a loaded machine's scheduler pauses far inside it
    with S3Lock(client, "bucket", "locks/m", lease_s=1.5) as held:
        time.sleep(4.5)  # three leases long
        with pytest.raises(LockTimeout):
            S3Lock(client, "bucket", "locks/m", wait_s=0.3).acquire()
        held.ensure()


def test_a_holder_whose_renewals_hang_knows_its_lease_lapsed():
    """A renewal stuck in a slow call must not let the holder act after its lease may have run out."""
    from tasks.locks import LockLost

    class Stalling(FakeS3):
        stall = threading.Event()

        def put_object(self, **kwargs):
            if self.stall.is_set():
                time.sleep(4)  # the endpoint hangs; boto would retry for minutes
            return super().put_object(**kwargs)

    client = Stalling()
    held = S3Lock(client, "bucket", "locks/m", lease_s=2).acquire()  # 2 s: no pause of a loaded machine lapses it here
    held.ensure()
    client.stall.set()
    time.sleep(2.5)  # longer than the lease: a waiter may take the lock over now
    with pytest.raises(LockLost, match="lease expired"):
        held.ensure()
    held.release()


def test_s3_lock_refuses_an_endpoint_that_ignores_conditional_writes():
    with pytest.raises(LockError, match="ignores conditional writes"):
        S3Lock(FakeS3(conditional=False), "bucket", "locks/m", wait_s=1).acquire()


def test_an_s3_endpoint_with_a_password_in_it_never_shows_the_password():
    store = S3Store("bucket", "prefix", endpoint_url="http://alice:s3cr3t@127.0.0.1:9000", client=object())
    assert "s3cr3t" not in store.url and "alice:***@127.0.0.1:9000" in store.url


def test_an_s3_endpoint_carrying_credentials_is_refused_and_no_password_part_is_ever_shown(monkeypatch):
    from tasks.state import without_password
    from tasks.store import store_settings

    assert without_password("http://alice:p@ss@host:9000/x") == "http://alice:***@host:9000/x"
    monkeypatch.setenv("ERASURE_S3_ENDPOINT", "http://alice:s3cr3t@127.0.0.1:9000")
    with pytest.raises(ArtifactError, match="carries credentials.*AWS_ACCESS_KEY_ID") as refused:
        store_settings()
    assert "s3cr3t" not in str(refused.value)
    monkeypatch.setenv("ERASURE_S3_ENDPOINT", "http://127.0.0.1:9000")
    assert store_settings()[1] == "http://127.0.0.1:9000"
