"""Fast checks of store paths, settings and the local store's commit/fetch (no server needed)."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

import pipeline.store as store_module
from pipeline.refs import MANIFEST_NAME, Ref
from pipeline.store import (
    ArtifactNotFound,
    CorruptArtifact,
    LocalStore,
    S3Store,
    StoreSettings,
    StoreUnavailable,
    default_cache_dir,
    manifest_sha256,
    open_store,
    parse_s3_uri,
    sha256_file,
    validate_path,
)

URI = "collect/00112233445566778899aabbccddeeff"


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("path", ["a", "collect/abc/data.jsonl", "a/b-c_d.e/f g", ".hidden/x", "a..b/c", "model/v1.0"])
def test_valid_paths_pass_unchanged(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("../x", "'..'"),
        ("a/../b", "'..'"),
        ("a/./b", "'.'"),
        ("/abs", "absolute"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a\\b", "backslash"),
        ("s3://x", "URL"),
        ("file:x", "URL"),
        ("C:/x", "drive"),
        ("a\x00b", "NUL"),
    ],
)
def test_invalid_paths_are_rejected_by_name(path: str, reason: str) -> None:
    with pytest.raises(ValueError) as rejected:
        validate_path(path)
    assert repr(path) in str(rejected.value)
    assert reason in str(rejected.value)


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ["s3://", "s3:///x", "s3://b/../x", "http://b/x"]:
        with pytest.raises(ValueError, match="s3|prefix"):
            parse_s3_uri(bad)


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_validation() -> None:
    assert StoreSettings().uri == "./artifacts"
    for field in StoreSettings.model_fields.values():
        assert field.description
    with pytest.raises(ValidationError, match="together"):
        StoreSettings(uri="s3://b/p", access_key_id=SecretStr("k"))
    with pytest.raises(ValidationError, match="no bucket"):
        StoreSettings(uri="s3:///p")
    with pytest.raises(ValidationError, match="gs://"):
        StoreSettings(uri="gs://bucket/p")


def test_settings_never_show_the_secret() -> None:
    settings = StoreSettings(uri="s3://b/p", access_key_id=SecretStr("k"), secret_access_key=SecretStr("s3cr3t"))
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings.model_dump())


def test_open_store_picks_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = open_store(StoreSettings(uri="rel/artifacts"))
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / "rel" / "artifacts" and local.root.is_dir()
    assert open_store(StoreSettings(uri=f"file://{tmp_path}/f")).root == tmp_path / "f"

    # No request is made when the store is opened, so an unreachable endpoint is fine here.
    remote = open_store(StoreSettings(uri="s3://bucket/pre/fix/", endpoint_url="http://127.0.0.1:9"))
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix, remote.uri) == ("bucket", "pre/fix", "s3://bucket/pre/fix")
    assert remote.location("a/b") == "s3://bucket/pre/fix/a/b"
    assert remote.cache_root == default_cache_dir("s3://bucket/pre/fix")


def test_region_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert store_module.resolve_region(StoreSettings()) == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert store_module.resolve_region(StoreSettings()) == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert store_module.resolve_region(StoreSettings()) == "eu-central-1"
    assert store_module.resolve_region(StoreSettings(region="ap-south-1")) == "ap-south-1"


def test_unreachable_endpoint_is_a_store_error(tmp_path: Path) -> None:
    settings = StoreSettings(
        uri="s3://some-bucket/p",
        endpoint_url="http://127.0.0.1:9",
        access_key_id=SecretStr("key"),
        secret_access_key=SecretStr("the-secret-value"),
        cache_dir=str(tmp_path),
        retry_attempts=1,  # the translation is what is under test here, not botocore's retries
    )
    with pytest.raises(StoreUnavailable) as unreachable:
        open_store(settings).get_bytes("x")
    message = str(unreachable.value)
    assert "http://127.0.0.1:9" in message and "some-bucket" in message and "endpoint_url" in message
    assert "Gave up after 1 attempt(s)" in message
    assert "the-secret-value" not in message


def test_s3_requests_retry_in_botocore_only(caplog: pytest.LogCaptureFixture) -> None:
    """store.retry_attempts is botocore's total_max_attempts in standard mode; the backoff setting is deprecated."""
    client = store_module.make_s3_client(
        StoreSettings(uri="s3://b/p", endpoint_url="http://127.0.0.1:9", retry_attempts=6)
    )
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert StoreSettings().retry_attempts == 8
    from pipeline.store import settings as settings_module

    settings_module._warn_backoff_is_deprecated.cache_clear()
    with caplog.at_level("WARNING", logger="pipeline.store"):
        StoreSettings(retry_attempts=3)
        assert "retry_backoff_seconds" not in caplog.text  # the default says nothing
        StoreSettings(retry_backoff_seconds=0.25)
    assert "store.retry_backoff_seconds is deprecated and has no effect" in caplog.text


def test_each_client_resolves_its_own_credentials_while_sharing_the_service_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients share botocore's loader (parsed once), never credentials: a changed environment is read afresh."""
    from pipeline.store import s3client

    settings = StoreSettings(uri="s3://b/p", endpoint_url="http://127.0.0.1:9")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFIRSTCLIENT00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret-for-this-test")
    first = store_module.make_s3_client(settings)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECONDCLIENT0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret-for-this-test")
    second = store_module.make_s3_client(settings)
    keys = [client._request_signer._credentials.get_frozen_credentials().access_key for client in (first, second)]
    assert keys == ["AKIAFIRSTCLIENT00000", "AKIASECONDCLIENT0000"]
    loader = s3client._shared_data_loader()
    assert s3client.new_boto3_session()._loader is loader
    assert len(loader.search_paths) == len(set(loader.search_paths))  # boto3's folder is not added once a session


# --------------------------------------------------------------------------- local artifacts


def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True, exist_ok=True)
    (staging / "rows.jsonl").write_text('{"a": 1}\n')
    (staging / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 9000)  # > 2 hash chunks
    return staging


def _commit(store: LocalStore, tmp_path: Path) -> Ref:
    return store.commit(
        URI, _staging(tmp_path), kind="collect", inputs={"source": "c" * 64}, config={"n": 3}, meta={"rows": 1}
    )


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_local_commit_and_fetch(local: LocalStore, tmp_path: Path) -> None:
    ref = _commit(local, tmp_path)
    folder = local.root / URI
    raw = (folder / MANIFEST_NAME).read_bytes()
    manifest = json.loads(raw)

    assert ref == Ref(kind="collect", uri=URI, sha256=manifest_sha256(manifest), meta={"rows": 1})
    assert raw == json.dumps(manifest, indent=2, sort_keys=True).encode()
    assert set(manifest) == {"kind", "uri", "files", "inputs", "config", "meta", "created_at"}
    # The Ref's sha256 covers everything in the manifest but when it was made.
    timeless = {key: value for key, value in manifest.items() if key != "created_at"}
    assert ref.sha256 == hashlib.sha256(json.dumps(timeless, indent=2, sort_keys=True).encode()).hexdigest()
    assert manifest["files"]["sub/blob.bin"]["size"] == 256 * 9000
    assert manifest["files"]["sub/blob.bin"]["sha256"] == sha256_file(tmp_path / "staging/sub/blob.bin")
    assert local.list(URI) == [f"{URI}/{MANIFEST_NAME}", f"{URI}/rows.jsonl", f"{URI}/sub/blob.bin"]
    assert local.has_artifact(URI) and local.open_ref(URI) == ref
    assert local.fetch(ref) == folder
    assert not list(local.root.rglob(".~tmp-*"))  # every temp file was renamed into place


def test_local_has_artifact_checks_sizes(local: LocalStore, tmp_path: Path) -> None:
    _commit(local, tmp_path)
    (local.root / URI / "rows.jsonl").write_text("shorter")
    assert not local.has_artifact(URI)
    (local.root / URI / "rows.jsonl").unlink()
    assert not local.has_artifact(URI)


def test_local_corruption_removes_the_manifest(local: LocalStore, tmp_path: Path) -> None:
    ref = _commit(local, tmp_path)
    blob = local.root / URI / "sub" / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))

    with pytest.raises(CorruptArtifact) as corrupt:
        local.fetch(ref)
    assert corrupt.value.file == "sub/blob.bin" and "sub/blob.bin" in str(corrupt.value)
    assert corrupt.value.found == hashlib.sha256(bytes(data)).hexdigest()
    assert not (local.root / URI / MANIFEST_NAME).exists()
    assert local.read_manifest(URI) is None
    with pytest.raises(ArtifactNotFound, match=URI):
        local.fetch(ref)


def test_local_missing_file_is_corrupt(local: LocalStore, tmp_path: Path) -> None:
    ref = _commit(local, tmp_path)
    (local.root / URI / "rows.jsonl").unlink()
    with pytest.raises(CorruptArtifact, match="<missing>"):
        local.fetch(ref)
    assert local.read_manifest(URI) is None


def test_commit_replaces_leftovers(local: LocalStore, tmp_path: Path) -> None:
    local.put_bytes(f"{URI}/half-written-by-a-crash.bin", b"junk")
    _commit(local, tmp_path)
    assert f"{URI}/half-written-by-a-crash.bin" not in local.list(URI)


def test_commit_refuses_a_staged_manifest(local: LocalStore, tmp_path: Path) -> None:
    staging = _staging(tmp_path)
    (staging / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="reserved"):
        local.commit(URI, staging, kind="collect", inputs={}, config=None, meta={})
    with pytest.raises(FileNotFoundError):
        local.commit(URI, tmp_path / "nowhere", kind="collect", inputs={}, config=None, meta={})


def test_unreadable_manifest_counts_as_absent(local: LocalStore) -> None:
    local.put_bytes(f"{URI}/{MANIFEST_NAME}", b"{not json")
    assert local.read_manifest(URI) is None and not local.has_artifact(URI)
    with pytest.raises(ArtifactNotFound):
        local.open_ref(URI)


def test_listing_skips_temp_files_and_delete_prunes_folders(local: LocalStore) -> None:
    local.put_bytes("s/k/a.txt", b"a")
    (local.root / "s" / "k" / ".~tmp-a.txt.123").write_bytes(b"interrupted write")
    assert local.list() == ["s/k/a.txt"]
    local.delete("s/k")
    assert not (local.root / "s").exists() and local.root.is_dir()


def test_corrupt_artifact_pickles() -> None:
    error = CorruptArtifact("s/k", "f.bin", "a" * 64, "b" * 64, "/store/s/k/f.bin")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.uri, copy.file, copy.expected, copy.found) == ("s/k", "f.bin", "a" * 64, "b" * 64)
    assert str(copy) == str(error)


class _Clock:
    """Stands in for `datetime` in pipeline/store/artifacts.py: each now() is a day after the one before."""

    def __init__(self) -> None:
        self.current = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def now(self, tz: object = None) -> datetime:
        self.current += timedelta(days=1)
        return self.current


def test_the_same_content_gets_the_same_sha_whenever_and_wherever_it_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.store import artifacts

    monkeypatch.setattr(artifacts, "datetime", _Clock())  # two commits a day apart, without waiting a day
    first, second = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "two")
    ref_one, ref_two = _commit(first, tmp_path / "a"), _commit(second, tmp_path / "b")
    assert first.read_manifest(URI)["created_at"] != second.read_manifest(URI)["created_at"]
    assert ref_one.sha256 == ref_two.sha256 == second.open_ref(URI).sha256
    assert second.fetch(ref_one) == second.root / URI  # either Ref verifies against either store

    # Different file content, config, inputs or figures: a different artifact.
    changed = _staging(tmp_path / "c")
    (changed / "rows.jsonl").write_text('{"a": 2}\n')
    other = LocalStore(tmp_path / "three").commit(
        URI, changed, kind="collect", inputs={"source": "c" * 64}, config={"n": 3}, meta={"rows": 1}
    )
    assert other.sha256 != ref_one.sha256
    for number, changes in enumerate([{"config": {"n": 4}}, {"inputs": {"source": "d" * 64}}, {"meta": {"rows": 2}}]):
        arguments = {
            "kind": "collect",
            "inputs": {"source": "c" * 64},
            "config": {"n": 3},
            "meta": {"rows": 1},
            **changes,
        }
        ref = LocalStore(tmp_path / f"four-{number}").commit(URI, _staging(tmp_path / f"d{number}"), **arguments)
        assert ref.sha256 != ref_one.sha256, changes


def test_a_rewritten_manifest_that_changes_content_is_rejected(local: LocalStore, tmp_path: Path) -> None:
    ref = _commit(local, tmp_path)
    path = local.root / URI / MANIFEST_NAME
    manifest = json.loads(path.read_bytes())
    manifest["created_at"] = "2030-01-01T00:00:00Z"  # when, not what: still the same artifact
    path.write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
    assert local.fetch(ref) == local.root / URI
    manifest["meta"]["rows"] = 99  # what: no longer the artifact the Ref names
    path.write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
    with pytest.raises(CorruptArtifact, match=MANIFEST_NAME):
        local.fetch(ref)
    assert local.read_manifest(URI) is None
