"""Store keys cannot escape the store's root: '..', absolute paths, backslashes, URL schemes, percent-encoded
or look-alike dots, empty segments, NUL and control characters, symbolic links, and Refs / manifests / aliases
whose paths escape are all refused with a ValueError naming the path, before any file or request is touched.

Both backends: a local folder, and an S3 store whose client is a stub that fails the test on any request
(so a refused key provably never reaches the server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.refs import MANIFEST_NAME, Ref
from pipeline.store import (
    LocalStore,
    S3Store,
    StoreSettings,
    manifest_sha256,
    open_store,
    parse_s3_uri,
    validate_path,
)

ESCAPES = [
    "../outside.txt",
    "a/../../outside.txt",
    "collect/key/../../../outside.txt",
    "..",
    ".",
    "/etc/passwd",
    "/",
    "a\\..\\..\\outside.txt",
    "..\\outside.txt",
    "%2e%2e/outside.txt",
    "a/%2E%2E/%2e%2e/outside.txt",
    "a/%252e%252e/%252e%252e/outside.txt",  # double-encoded
    "a/%2e%2e%2f%2e%2e%2foutside.txt",
    "a/%5c..%5coutside.txt",
    "\uff0e\uff0e/outside.txt",  # full-width dots: '..' after NFKC normalisation
    "s3://other-bucket/x",
    "S3://other-bucket/x",
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data",
    "C:/Windows/x",
    "c:x",
    "a//b",
    "a/",
    "",
    "a/\x00b",
    "a/%00b",
    "a/b\nc",
    "a/b\rc",
]
FINE = [
    "a",
    "collect/abc/data.jsonl",
    "a..b/c",
    ".hidden/x",
    "model/v1.0",
    "a/100%/b",
    "a/%zz/b",
    "caf\u00e9/x",
    "a b/c",
]


class NoNetwork:
    """A boto3 client stand-in: any request fails the test. Only `meta.endpoint_url` may be read."""

    class meta:
        endpoint_url = "http://127.0.0.1:9"
        region_name = "us-east-1"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an S3 request ({name}) was made for a key that should have been refused")


class OneManifest(NoNetwork):
    """Serves exactly one object (a manifest) from a bucket that exists; anything else fails the test."""

    def __init__(self, key: str, body: bytes):
        self.key, self.body = key, body

    def head_bucket(self, Bucket: str) -> dict:
        return {}

    def get_object(self, Bucket: str, Key: str) -> dict:
        assert Key == self.key, f"unexpected read of {Key}"

        class Body:
            @staticmethod
            def read() -> bytes:
                return self.body

        return {"Body": Body()}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "outer" / "store")
    settings = StoreSettings(uri="s3://team-bucket/runs", cache_dir=str(tmp_path / "outer" / "cache"))
    return S3Store(settings, client=NoNetwork())


def operations(store, bad: str, tmp_path: Path) -> dict[str, Any]:
    local = tmp_path / "local.bin"
    local.write_bytes(b"payload")
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    (staging / "f.txt").write_text("x")
    return {
        "put_bytes": lambda: store.put_bytes(bad, b"x"),
        "get_bytes": lambda: store.get_bytes(bad),
        "put_file": lambda: store.put_file(bad, local),
        "get_file": lambda: store.get_file(bad, tmp_path / "downloaded.bin"),
        "exists": lambda: store.exists(bad),
        "delete": lambda: store.delete(bad),
        "list": lambda: store.list(bad),
        "location": lambda: store.location(bad),
        "read_manifest": lambda: store.read_manifest(bad),
        "has_artifact": lambda: store.has_artifact(bad),
        "open_ref": lambda: store.open_ref(bad),
        "commit": lambda: store.commit(bad, staging, kind="collect", inputs={}, config={}, meta={}),
        "fetch": lambda: store.fetch(Ref(kind="collect", uri=bad, sha256="0" * 64)),
    }


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("bad", ESCAPES, ids=[repr(b) for b in ESCAPES])
def test_every_operation_refuses_an_escaping_key(store, bad: str, tmp_path: Path):
    outer = tmp_path / "outer"
    before = files_under(outer)
    for name, operation in operations(store, bad, tmp_path).items():
        if name in ("list", "delete") and bad in ("", "a/"):
            continue  # '' lists/deletes the whole root, a trailing '/' is a folder prefix: both stay inside
        with pytest.raises(ValueError) as refused:
            operation()
        named = (
            repr(bad[:-1]) if name in ("list", "delete") and bad.endswith("/") else repr(bad)
        )  # prefixes: one '/' trimmed
        assert named in str(refused.value), f"{name}: {refused.value}"
    assert files_under(outer) == before, "something was written"
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "downloaded.bin").exists()


@pytest.mark.parametrize("good", FINE)
def test_unusual_but_harmless_keys_still_work(good: str, tmp_path: Path):
    assert validate_path(good) == good
    store = LocalStore(tmp_path / "store")
    store.put_bytes(f"{good}/f", b"x")
    assert store.get_bytes(f"{good}/f") == b"x"
    assert (tmp_path / "store" / good / "f").is_file()


def _manifest(files: dict[str, dict]) -> bytes:
    return json.dumps(
        {
            "kind": "collect",
            "uri": "collect/k",
            "files": files,
            "inputs": {},
            "config": {},
            "meta": {},
            "created_at": "2026-01-01T00:00:00Z",
        },
        indent=2,
        sort_keys=True,
    ).encode()


@pytest.mark.parametrize(
    "entry", ["../../../outside.txt", "/etc/passwd", "a/%2e%2e/%2e%2e/%2e%2e/outside.txt", "a\\..\\x"]
)
def test_a_tampered_manifest_cannot_point_outside_the_artifact(entry: str, tmp_path: Path):
    """A manifest is data from the store: its file names are checked like any key (local and S3 cache)."""
    data = _manifest({entry: {"sha256": "0" * 64, "size": 1}})
    ref = Ref(kind="collect", uri="collect/k", sha256=manifest_sha256(json.loads(data)))  # it matches its Ref

    local = LocalStore(tmp_path / "outer" / "store")
    local.put_bytes(f"collect/k/{MANIFEST_NAME}", data)
    with pytest.raises(ValueError, match="invalid store path"):
        local.fetch(ref)

    remote = S3Store(
        StoreSettings(uri="s3://team-bucket/runs", cache_dir=str(tmp_path / "outer" / "cache")),
        client=OneManifest(f"runs/collect/k/{MANIFEST_NAME}", data),
    )
    with pytest.raises(ValueError, match="invalid store path"):
        remote.fetch(ref)
    assert not (tmp_path / "outside.txt").exists()
    assert files_under(tmp_path / "outer" / "cache") in ([], ["collect", "collect/k"]), "nothing downloaded"


def test_an_alias_whose_ref_escapes_is_refused(tmp_path: Path):
    from pipeline.models import find_model, read_alias, write_alias

    store = LocalStore(tmp_path / "store")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / MANIFEST_NAME).write_text('{"files": {}}')
    write_alias(store, "evil_1_steps_20260101T000000Z", Ref(kind="train", uri="../victim", sha256="0" * 64))
    with pytest.raises(ValueError, match=r"invalid store path '\.\./victim'"):
        find_model("evil_1_steps_20260101T000000Z", store)
    assert read_alias(store, "evil_1_steps_20260101T000000Z").uri == "../victim"  # stored as written, refused on use
    from pipeline.store import ArtifactNotFound

    with pytest.raises(ArtifactNotFound, match="not an alias name"):
        read_alias(store, "../victim")


def test_a_symbolic_link_inside_the_store_cannot_lead_out(tmp_path: Path):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "private.txt").write_text("not yours")
    store = LocalStore(tmp_path / "store")
    (store.root / "collect").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link leads it out of the store root"):
        store.get_bytes("collect/private.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        store.put_bytes("collect/planted.txt", b"x")
    assert sorted(p.name for p in secret.iterdir()) == ["private.txt"]


def test_prefect_result_paths_are_store_keys_too(tmp_path: Path):
    from pipeline.stage import ArtifactStoreResults

    results = ArtifactStoreResults(uri=str(tmp_path / "store"))
    for bad in ("../../outside", "/etc/passwd", "%2e%2e/%2e%2e/x"):
        with pytest.raises(ValueError, match="invalid store path"):
            results.write_path(bad, b"x")
        with pytest.raises(ValueError, match="invalid store path"):
            results.read_path(bad)
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/runs/../../other", r"'\.' and '\.\.' segments"),
        ("s3://bucket/runs/%2e%2e/x", "percent-encoded"),
        ("s3://bucket//runs", None),  # leading slashes of the prefix are trimmed: same as s3://bucket/runs
        ("s3://other-bucket@bucket/x", "invalid bucket"),
        ("s3://bucket:443/x", "invalid bucket"),
        ("s3://bucket?versionId=1/x", "invalid bucket"),
        ("s3://bucket#frag/x", "invalid bucket"),
        ("s3://..bucket/x", "invalid bucket"),
        ("s3://%62ucket/x", "invalid bucket"),
        ("s3://Bucket/x", "invalid bucket"),
    ],
)
def test_s3_roots_are_validated(uri: str, message: str | None):
    if message is None:
        assert parse_s3_uri(uri) == ("bucket", "runs")
        return
    with pytest.raises(ValueError, match=message):
        parse_s3_uri(uri)
    with pytest.raises(ValidationError, match=message):
        StoreSettings(uri=uri)


def test_a_refused_store_location_never_echoes_credentials():
    for uri in ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@bucket/x", "ftp://user:wJalrXUtnFEMI@host/x"):
        with pytest.raises(ValidationError) as refused:
            StoreSettings(uri=uri)
        assert "wJalrXUtnFEMI" not in str(refused.value) and "AKIAIOSFODNN7EXAMPLE" not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        StoreSettings(endpoint_url="http://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@127.0.0.1:8333")
    assert "wJalrXUtnFEMI" not in str(refused.value) and "***@127.0.0.1:8333" in str(refused.value)


def test_open_store_keeps_a_local_root_where_it_was_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    store = open_store(StoreSettings(uri="file://" + str(tmp_path / "a" / "store")))
    store.put_bytes("collect/k/f", b"x")
    assert files_under(tmp_path / "a") == ["store", "store/collect", "store/collect/k", "store/collect/k/f"]
