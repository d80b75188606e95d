"""The artifact store: a local folder or any S3-compatible server (AWS S3, MinIO, SeaweedFS, R2, Ceph).

Two levels:

* Files. `put_bytes`, `get_bytes`, `put_file`, `get_file`, `exists`, `list`, `delete` take
  '/'-separated paths relative to the store root (checked by `validate_path`), so the same
  path means the same thing in a folder and in a bucket.
* Artifacts. An artifact lives under `<stage>/<key>/` (its `uri`). `commit` uploads a staging
  folder and then writes `manifest.json` last: the manifest is the commit marker. `fetch` hands
  back a local folder whose every file has been checked against the manifest; a mismatch raises
  `CorruptArtifact` and the stage recomputes. The Ref's sha256 covers the content, not the time.

`open_store(StoreSettings(...))` picks the implementation from the uri (`s3://bucket/prefix`
or a folder). Nothing here reads configuration from globals: everything comes from the
settings object, and from the environment only where boto3 would read it anyway.

Modules: `keys` (path and s3:// uri checks), `settings` (StoreSettings), `errors` (error types and the
one mapping of S3 failures onto them), `artifacts` (hashing, manifests, the shared artifact level),
`atomic` (atomic local writes), `locks` (commit locks), `local` (LocalStore), `s3client` (client
construction, botocore retries), `s3` (S3Store). This module re-exports what the rest of the project uses.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.store.artifacts import ArtifactStore, manifest_sha256, sha256_bytes, sha256_file
from pipeline.store.errors import ArtifactNotFound, CorruptArtifact, StoreError, StoreUnavailable
from pipeline.store.keys import parse_s3_uri, validate_path
from pipeline.store.local import LocalStore
from pipeline.store.locks import commit_lock_name
from pipeline.store.s3 import S3Store
from pipeline.store.s3client import default_cache_dir, make_s3_client, resolve_region
from pipeline.store.settings import StoreSettings

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "CorruptArtifact",
    "LocalStore",
    "S3Store",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "commit_lock_name",
    "default_cache_dir",
    "make_s3_client",
    "manifest_sha256",
    "open_store",
    "parse_s3_uri",
    "resolve_region",
    "sha256_bytes",
    "sha256_file",
    "validate_path",
]


def open_store(settings: StoreSettings) -> ArtifactStore:
    """In: store settings. Out: an S3Store for s3://bucket/prefix, else a LocalStore.

    A local uri may be relative (resolved against the working directory) or file://...;
    its folder is created. No network call happens here: an S3 store checks its bucket
    on first use.
    """
    if settings.uri.startswith("s3://"):
        return S3Store(settings)
    root = settings.uri[len("file://") :] if settings.uri.startswith("file://") else settings.uri
    return LocalStore(Path(root))
