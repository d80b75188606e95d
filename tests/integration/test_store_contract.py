"""One contract, two backends: a local folder and a real S3 server (SeaweedFS).

Whatever a stage does with the store must behave the same on a laptop folder and on a
bucket, so every test here runs against both (`store` is parametrised in conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from pipeline.refs import MANIFEST_NAME, Ref
from pipeline.store import (
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
    LocalStore,
    S3Store,
    StoreError,
    StoreSettings,
    commit_lock_name,
    manifest_sha256,
    open_store,
)

pytestmark = pytest.mark.integration

URI = "train/0123456789abcdef0123456789abcdef"


class _TrainConfig(BaseModel):
    lr: float = 1e-4
    steps: int = 3
    token: SecretStr = SecretStr("hf_do_not_store")


def _staging(tmp_path: Path) -> Path:
    """A small artifact: a JSONL file, a nested binary file and an empty file."""
    staging = tmp_path / "staging"
    (staging / "model" / "shards").mkdir(parents=True, exist_ok=True)
    (staging / "data.jsonl").write_text('{"q": "a"}\n{"q": "b"}\n')
    (staging / "model" / "shards" / "weights.bin").write_bytes(os.urandom(64 * 1024))
    (staging / "empty.txt").write_bytes(b"")
    return staging


def _commit(store: ArtifactStore, tmp_path: Path, uri: str = URI) -> Ref:
    return store.commit(
        uri,
        _staging(tmp_path),
        kind="train",
        inputs={"dataset": "ab" * 32},
        config=_TrainConfig(),
        meta={"loss": 1.25, "rows": 2},
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- file level


def test_put_get_exists_list_delete(store: ArtifactStore) -> None:
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/c/d.bin", b"")
    store.put_bytes("ab/x", b"1")

    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.get_bytes("a/c/d.bin") == b""
    assert store.exists("a/b.txt") and store.exists("a/c/d.bin")
    assert not store.exists("a/nope") and not store.exists("a")  # a folder is not a file

    store.put_bytes("a/b.txt", b"replaced")
    assert store.get_bytes("a/b.txt") == b"replaced"

    assert store.list() == ["a/b.txt", "a/c/d.bin", "ab/x"]
    assert store.list("a") == ["a/b.txt", "a/c/d.bin"]  # 'a' does not match 'ab/...'
    assert store.list("a/") == ["a/b.txt", "a/c/d.bin"]
    assert store.list("a/b.txt") == ["a/b.txt"]
    assert store.list("missing") == []

    with pytest.raises(ArtifactNotFound) as missing:
        store.get_bytes("a/missing.txt")
    assert store.location("a/missing.txt") in str(missing.value)
    assert store.uri in store.location("a/missing.txt")

    store.delete("a/c")
    assert store.list() == ["a/b.txt", "ab/x"]
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # missing is fine
    store.delete("never/was")
    assert store.list() == ["ab/x"]


def test_large_file_round_trips(store: ArtifactStore, tmp_path: Path) -> None:
    payload = os.urandom(9 * 1024 * 1024)  # above the 8 MB multipart threshold
    local = tmp_path / "big.bin"
    local.write_bytes(payload)

    store.put_file("big/blob.bin", local)
    out = tmp_path / "out" / "blob.bin"
    store.get_file("big/blob.bin", out)

    assert _sha(out.read_bytes()) == _sha(payload)
    assert store.list("big") == ["big/blob.bin"]
    assert os.listdir(out.parent) == ["blob.bin"]  # the temp file was renamed, nothing left over
    if isinstance(store, S3Store):
        head = store._client.head_object(Bucket=store.bucket, Key=store._key("big/blob.bin"))
        assert "-" in head["ETag"], f"expected a multipart ETag, got {head['ETag']}"
        assert head["ContentLength"] == len(payload)

    with pytest.raises(ArtifactNotFound):
        store.get_file("big/missing.bin", tmp_path / "out" / "missing.bin")
    assert not (tmp_path / "out" / "missing.bin").exists()


# --------------------------------------------------------------------------- artifacts


def test_commit_writes_manifest_last_and_fetch_verifies(store: ArtifactStore, tmp_path: Path) -> None:
    writes: list[str] = []
    put_bytes, put_file = store.put_bytes, store.put_file
    store.put_bytes = lambda path, data: (writes.append(path), put_bytes(path, data))[1]  # type: ignore[method-assign]
    store.put_file = lambda path, local: (writes.append(path), put_file(path, local))[1]  # type: ignore[method-assign]

    ref = _commit(store, tmp_path)

    assert writes[-1] == f"{URI}/{MANIFEST_NAME}"
    assert sorted(writes[:-1]) == [f"{URI}/data.jsonl", f"{URI}/empty.txt", f"{URI}/model/shards/weights.bin"]
    assert ref.kind == "train" and ref.uri == URI and ref.meta == {"loss": 1.25, "rows": 2}

    raw = store.get_bytes(f"{URI}/{MANIFEST_NAME}")
    manifest = store.read_manifest(URI)
    assert manifest_sha256(manifest) == ref.sha256  # the manifest's content without created_at
    assert raw == json.dumps(manifest, indent=2, sort_keys=True).encode()
    staging = tmp_path / "staging"
    assert manifest["files"]["model/shards/weights.bin"] == {
        "sha256": _sha((staging / "model/shards/weights.bin").read_bytes()),
        "size": 64 * 1024,
    }
    assert manifest["files"]["empty.txt"] == {"sha256": _sha(b""), "size": 0}
    assert manifest["inputs"] == {"dataset": "ab" * 32}
    assert manifest["config"] == {"lr": 1e-4, "steps": 3, "token": None}  # secrets never stored
    assert manifest["kind"] == "train" and manifest["uri"] == URI
    assert manifest["created_at"].endswith("Z")

    assert store.has_artifact(URI)
    assert store.open_ref(URI) == ref

    folder = store.fetch(ref)
    for rel in manifest["files"]:
        assert (folder / rel).read_bytes() == (staging / rel).read_bytes()
    if isinstance(store, S3Store):
        assert str(folder).startswith(str(store.cache_root))

        # A verified copy is reused: no download on the second fetch.
        def no_download(path: str, local: Path) -> None:
            raise AssertionError(f"downloaded {path} again")

        store.get_file = no_download  # type: ignore[method-assign]
        assert store.fetch(ref) == folder
    else:
        assert folder == Path(store.location(URI))


def test_missing_artifact(store: ArtifactStore) -> None:
    assert store.read_manifest("train/absent") is None
    assert not store.has_artifact("train/absent")
    with pytest.raises(ArtifactNotFound, match="train/absent"):
        store.open_ref("train/absent")
    with pytest.raises(ArtifactNotFound, match="train/absent"):
        store.fetch(Ref(kind="train", uri="train/absent", sha256="0" * 64))


def _fail_on_manifest(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the manifest upload fail the way a crash or a network error would."""
    if isinstance(store, S3Store):
        put_object = store._client.put_object

        def failing_put_object(**kwargs):
            if kwargs["Key"].endswith(MANIFEST_NAME):
                raise ConnectionResetError("network dropped during the manifest upload")
            return put_object(**kwargs)

        monkeypatch.setattr(store._client, "put_object", failing_put_object)
    else:
        put_bytes = store.put_bytes

        def failing_put_bytes(path: str, data: bytes) -> None:
            if path.endswith(MANIFEST_NAME):
                raise OSError("disk full while writing the manifest")
            put_bytes(path, data)

        monkeypatch.setattr(store, "put_bytes", failing_put_bytes)


def test_interrupted_commit_leaves_no_artifact(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _fail_on_manifest(store, patch)
        with pytest.raises((OSError, StoreError)):
            _commit(store, tmp_path)
        assert store.exists(f"{URI}/data.jsonl")  # the files went up ...
        assert store.read_manifest(URI) is None  # ... but without the marker there is no artifact
        assert not store.has_artifact(URI)
        with pytest.raises(ArtifactNotFound):
            store.open_ref(URI)

    # A failure halfway through the files leaves no artifact either.
    store.put_bytes(f"{URI}/stale-from-an-old-attempt.txt", b"old")
    put_file = store.put_file
    calls = []

    def failing_put_file(path: str, local: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("interrupted")
        put_file(path, local)

    monkeypatch.setattr(store, "put_file", failing_put_file)
    with pytest.raises(OSError):
        _commit(store, tmp_path)
    assert not store.has_artifact(URI) and store.read_manifest(URI) is None
    monkeypatch.undo()

    # The next attempt clears the leftovers and commits cleanly.
    ref = _commit(store, tmp_path)
    assert store.has_artifact(URI)
    assert store.list(URI) == sorted(
        f"{URI}/{rel}" for rel in ["data.jsonl", "empty.txt", "model/shards/weights.bin", MANIFEST_NAME]
    )
    assert store.fetch(ref).is_dir()


def test_corrupt_file_is_detected_and_uncommitted(store: ArtifactStore, tmp_path: Path) -> None:
    ref = _commit(store, tmp_path)
    path = f"{URI}/model/shards/weights.bin"
    data = bytearray(store.get_bytes(path))
    data[1000] ^= 0xFF  # same size: only hashing can tell
    store.put_bytes(path, bytes(data))
    assert store.has_artifact(URI)  # the cheap check only looks at sizes

    with pytest.raises(CorruptArtifact) as corrupt:
        store.fetch(ref)

    error = corrupt.value
    assert "model/shards/weights.bin" in str(error) and URI in str(error)
    assert error.file == "model/shards/weights.bin"
    assert error.expected == _staged_weights_sha(tmp_path) and error.found == _sha(bytes(data))
    assert error.expected in str(error) and error.found in str(error)
    # The manifest is gone: the artifact no longer exists and its stage recomputes it.
    assert store.read_manifest(URI) is None and not store.has_artifact(URI)
    with pytest.raises(ArtifactNotFound):
        store.fetch(ref)
    if isinstance(store, S3Store):
        cached = store.cache_root / URI
        assert not (cached / ".verified").exists()
        assert not (cached / "model/shards/weights.bin").exists()

    fresh = _commit(store, tmp_path)
    assert store.fetch(fresh).is_dir()


def _staged_weights_sha(tmp_path: Path) -> str:
    """The sha256 the manifest lists for the staged weights file."""
    return _sha((tmp_path / "staging/model/shards/weights.bin").read_bytes())


def test_manifest_not_matching_ref_is_rejected(store: ArtifactStore, tmp_path: Path) -> None:
    ref = _commit(store, tmp_path)
    stale = ref.model_copy(update={"sha256": "f" * 64})
    with pytest.raises(CorruptArtifact, match=MANIFEST_NAME) as corrupt:
        store.fetch(stale)
    assert corrupt.value.expected == "f" * 64 and corrupt.value.found == ref.sha256
    assert store.read_manifest(URI) is None


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "s3://x", "", "a\\b", "a/./b", "a/"])
def test_path_validation(store: ArtifactStore, bad: str) -> None:
    for operation in (
        lambda: store.put_bytes(bad, b"x"),
        lambda: store.get_bytes(bad),
        lambda: store.exists(bad),
        lambda: store.read_manifest(bad),
    ):
        with pytest.raises(ValueError) as rejected:
            operation()
        assert repr(bad) in str(rejected.value)
    if bad != "a/":  # a trailing '/' is fine for a prefix
        with pytest.raises(ValueError):
            store.delete(bad)
    assert store.list() == []


def test_two_commits_of_one_uri_at_once_keep_the_first_and_share_its_ref(
    store: ArtifactStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two runs of one config commit the same uri: the second waits for the first and gets its Ref.

    Without a commit lock the second would discard the first's files while the first was still
    writing, and the first's Ref would point at a manifest that is gone.
    """
    import threading

    settings = (
        request.getfixturevalue("s3_settings") if isinstance(store, S3Store) else StoreSettings(uri=str(store.root))
    )
    second = open_store(settings)  # another run's store object on the same location
    uploading, slow_put = threading.Event(), store.put_file
    seen_while_locked: list[list[str]] = []

    def put_file_slowly(path: str, local: Path) -> None:
        if not uploading.is_set():
            seen_while_locked.append(store.list())
            uploading.set()
            threading.Event().wait(1.0)  # the second committer arrives meanwhile
        slow_put(path, local)

    store.put_file = put_file_slowly  # type: ignore[method-assign]
    refs: dict[str, Ref] = {}
    first = threading.Thread(target=lambda: refs.update(first=_commit(store, tmp_path / "a")))
    first.start()
    assert uploading.wait(30), "the first commit never started uploading"
    refs["second"] = _commit(second, tmp_path / "b")  # other random bytes: a commit of its own would differ
    first.join(60)
    assert refs["second"] == refs["first"], "the second commit must return the first's artifact"
    folder = store.fetch(refs["first"])  # still valid: nothing of it was discarded
    assert (folder / "model" / "shards" / "weights.bin").read_bytes() == (
        tmp_path / "a" / "staging" / "model" / "shards" / "weights.bin"
    ).read_bytes()
    assert not any(".~tmp-" in path for path in seen_while_locked[0]), "a held lock shows in no listing"
    assert not any(".~tmp-" in path for path in store.list())


# --------------------------------------------------------------------------- S3 only


def test_wrong_credentials_raise_store_error_without_the_secret(s3_settings: StoreSettings) -> None:
    secret = "wrong-secret-do-not-print-Kx7"
    bad = open_store(s3_settings.model_copy(update={"secret_access_key": SecretStr(secret)}))
    with pytest.raises(StoreError) as denied:
        bad.put_bytes("a.txt", b"x")
    message = str(denied.value)
    assert secret not in message and s3_settings.secret_access_key.get_secret_value() not in message
    assert bad.endpoint in message and bad.bucket in message
    assert "access" in message.lower()

    unknown = open_store(s3_settings.model_copy(update={"access_key_id": SecretStr("nobody")}))
    with pytest.raises(StoreError) as denied:
        unknown.list()
    assert s3_settings.secret_access_key.get_secret_value() not in str(denied.value)


def test_missing_bucket_is_created(s3_settings: StoreSettings, seaweedfs) -> None:
    import boto3

    store = open_store(s3_settings)
    assert isinstance(store, S3Store)
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=seaweedfs.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    names = lambda: {b["Name"] for b in client.list_buckets().get("Buckets", [])}  # noqa: E731
    assert store.bucket not in names()  # opening the store makes no request
    assert store.list() == []
    assert store.bucket in names()

    # The same bucket and prefix from another client (a fresh machine) sees the same artifact.
    store.put_bytes("x/y.txt", b"shared")
    other = open_store(s3_settings.model_copy(update={"cache_dir": None}))
    assert other.get_bytes("x/y.txt") == b"shared"


def test_local_store_is_a_plain_folder(tmp_path: Path) -> None:
    store = open_store(StoreSettings(uri=str(tmp_path / "plain")))
    assert isinstance(store, LocalStore)
    ref = _commit(store, tmp_path)
    assert (tmp_path / "plain" / URI / MANIFEST_NAME).is_file()
    assert store.fetch(ref) == tmp_path / "plain" / URI


def _plant_lock(store: S3Store, holder: dict) -> str:
    """Put a commit lock for URI in the bucket as another (gone) committer would have left it."""
    path = commit_lock_name(URI)
    store.put_bytes(path, json.dumps(holder).encode())
    assert store.exists(path) and path not in store.list()
    return path


@pytest.mark.parametrize("who", ["a dead process on this host", "an earlier attempt of this process"])
def test_a_commit_lock_whose_holder_is_gone_is_broken_at_once(
    s3_settings: StoreSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture, who: str
) -> None:
    import socket
    import subprocess
    import sys

    store = open_store(s3_settings)
    if who.startswith("a dead"):
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        holder = {"host": socket.gethostname(), "pid": gone.pid, "token": "t"}
    else:  # e.g. the server went down before this process could release it
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "released-never"}
    path = _plant_lock(store, holder)
    with caplog.at_level("WARNING", logger="pipeline.store"):
        ref = _commit(store, tmp_path)
    assert store.has_artifact(ref.uri) and not store.exists(path), "committed, and the lock released"
    assert "breaking the stale commit lock" in caplog.text


def test_a_live_commit_lock_from_another_host_is_waited_for_until_stale(
    s3_settings: StoreSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import pipeline.store.locks as lock_module

    monkeypatch.setattr(lock_module, "COMMIT_LOCK_POLL_S", 0.2)
    store = open_store(s3_settings)
    path = _plant_lock(store, {"host": "another-machine", "pid": 1, "token": "t"})
    done = threading.Event()
    worker = threading.Thread(target=lambda: (_commit(store, tmp_path), done.set()))
    with caplog.at_level("INFO", logger="pipeline.store"):
        worker.start()
        assert not done.wait(1.5), "a live lock from another machine must hold the commit off"
        assert "waiting for another run to finish committing" in caplog.text
        monkeypatch.setattr(
            lock_module, "COMMIT_LOCK_STALE_S", 0.0
        )  # from now on the lock counts as older than the limit
        worker.join(30)
    assert done.is_set() and store.has_artifact(URI) and not store.exists(path)
