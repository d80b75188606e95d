"""The artifact store under s3://bucket/prefix on any S3-compatible server (AWS S3, MinIO, SeaweedFS, R2, Ceph).

In: StoreSettings with an s3:// uri (or a ready client, in tests). Out: an ArtifactStore whose paths are
object keys under the prefix. Every request is sent once by this code and retried only by botocore
(s3client.py); a failure that outlasts botocore's retries becomes the store's error through the one mapping
in errors.py (StoreUnavailable for an outage, StoreError for access denied etc., ArtifactNotFound).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.refs import MANIFEST_NAME
from pipeline.store.artifacts import VERIFIED_MARKER, ArtifactStore, manifest_bytes, sha256_file
from pipeline.store.atomic import atomic_write, require_local_file, write_bytes_atomic
from pipeline.store.errors import (
    ArtifactNotFound,
    CorruptArtifact,
    S3ErrorKind,
    StoreError,
    classify_s3_error,
    s3_store_error,
)
from pipeline.store.keys import parse_s3_uri, prefix_path, validate_path
from pipeline.store.locks import COMMIT_LOCK_PREFIX, s3_commit_lock
from pipeline.store.s3client import default_cache_dir, make_s3_client
from pipeline.store.settings import StoreSettings

log = logging.getLogger(__name__)

MULTIPART_BYTES = 8 * 1024 * 1024
"""S3 objects larger than this are uploaded (and downloaded) in parts of this size."""


class S3Store(ArtifactStore):
    """An artifact store under s3://bucket/prefix on any S3-compatible server.

    The bucket is checked on first use and created when missing (fine on SeaweedFS and
    MinIO; on AWS it needs s3:CreateBucket). Fetched artifacts are downloaded into
    `cache_dir/<uri>/` and verified there.
    """

    def __init__(self, settings: StoreSettings, client: Any | None = None) -> None:
        """In: settings with an s3:// uri; optionally a ready boto3 client (tests)."""
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = parse_s3_uri(settings.uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = client if client is not None else make_s3_client(settings)
        self.endpoint = str(self._client.meta.endpoint_url)
        self.cache_root = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir(self.uri)
        self._credentials_from = (
            "the store settings" if settings.access_key_id is not None else "the environment / boto3 chain"
        )
        # Objects above 8 MB go multipart: parts upload in parallel, each retried by botocore. s3transfer's own
        # download retries (num_download_attempts) stay: they re-read a body stream that broke after the response
        # arrived, which botocore does not retry (it retries a request only until its response headers arrive).
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        self._bucket_ready = False

    # ---- helpers

    def _key(self, path: str) -> str:
        """The object key of a store path."""
        validate_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def location(self, path: str) -> str:
        """In: a store path. Out: s3://bucket/key."""
        return f"s3://{self.bucket}/{self._key(path)}"

    @contextmanager
    def _s3_errors(self, action: str, missing: str | None = None) -> Iterator[None]:
        """Turn an S3 failure in the body into the store's error (errors.s3_store_error), raised from it.

        `action` says what was being done, for the message; `missing` names what is read, so that a
        missing object becomes ArtifactNotFound naming it. Anything else (a local OSError, a ValueError)
        passes unchanged.
        """
        try:
            yield
        except (ArtifactNotFound, StoreError):
            raise
        except Exception as exc:
            error = s3_store_error(
                exc,
                endpoint=self.endpoint,
                bucket=self.bucket,
                action=action,
                credentials_from=self._credentials_from,
                missing=missing,
            )
            if error is exc:
                raise
            raise error from (None if isinstance(error, ArtifactNotFound) else exc)

    def _ensure_bucket(self) -> None:
        """Check once that the bucket answers; create it when it does not exist."""
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        with self._s3_errors("checking the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                failure = classify_s3_error(exc)
                if failure is None or failure.kind not in (S3ErrorKind.NOT_FOUND, S3ErrorKind.NO_BUCKET):
                    raise
                self._create_bucket()
        self._bucket_ready = True

    def _create_bucket(self) -> None:
        """Create the missing bucket (a concurrent creator winning the race is fine)."""
        from botocore.exceptions import ClientError

        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s at %s", self.bucket, self.endpoint)
        except ClientError as exc:
            failure = classify_s3_error(exc)
            if failure is not None and failure.kind is S3ErrorKind.UNAVAILABLE:
                raise  # the outage is the news: _s3_errors says so
            code = failure.code if failure is not None else "?"
            if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return
            raise StoreError(
                f"bucket {self.bucket!r} at {self.endpoint} does not exist and could not be created ({code}): "
                "create it, or use credentials allowed to create buckets"
            ) from exc

    # ---- file level

    def put_bytes(self, path: str, data: bytes) -> None:
        """Upload `data` as one object at `path`."""
        key = self._key(path)
        self._ensure_bucket()
        with self._s3_errors(f"writing {self.location(path)}"):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_bytes(self, path: str) -> bytes:
        """Out: the object's bytes. Raises ArtifactNotFound naming s3://bucket/key."""
        return self.read_with_time(path)[0]

    def read_with_time(self, path: str) -> tuple[bytes, float | None]:
        """Out: the object's bytes and when it was last written (seconds since the epoch; None when the
        server does not say). ArtifactNotFound if there is no such object."""
        key = self._key(path)
        self._ensure_bucket()
        with self._s3_errors(f"reading {self.location(path)}", missing=self.location(path)):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            written = response.get("LastModified")
            return response["Body"].read(), written.timestamp() if written is not None else None

    def put_file(self, path: str, local: Path) -> None:
        """Upload a local file; above 8 MB as a multipart upload."""
        local = require_local_file(local)
        key = self._key(path)
        self._ensure_bucket()
        with self._s3_errors(f"uploading {local} to {self.location(path)}"):
            self._client.upload_file(str(local), self.bucket, key, Config=self._transfer)

    def get_file(self, path: str, local: Path) -> None:
        """Download `path` to `local` through a temp file + os.replace. Raises ArtifactNotFound."""
        key = self._key(path)
        self._ensure_bucket()

        def download(tmp: Path) -> None:
            self._client.download_file(self.bucket, key, str(tmp), Config=self._transfer)

        with self._s3_errors(f"downloading {self.location(path)}", missing=self.location(path)):
            atomic_write(Path(local), download, durable=False)

    def exists(self, path: str) -> bool:
        """Out: whether an object is stored at `path` (one HEAD request)."""
        key = self._key(path)
        self._ensure_bucket()
        try:
            with self._s3_errors(f"checking {self.location(path)}", missing=self.location(path)):
                self._client.head_object(Bucket=self.bucket, Key=key)
        except ArtifactNotFound:
            return False
        return True

    def delete(self, prefix: str) -> None:
        """Delete the object `prefix` and every object under `prefix/`; missing is fine."""
        prefix = prefix_path(prefix)
        keys = [self._key(path) for path in self._sizes(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._s3_errors(f"deleting {self.location(prefix)}"):
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"could not delete {len(response['Errors'])} objects under {self.location(prefix)} "
                    f"in bucket {self.bucket!r} at {self.endpoint}, e.g. {first.get('Key')}: {first.get('Code')} "
                    f"{first.get('Message')}"
                )

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the object `prefix` and the objects under `prefix/` (one paged listing)."""
        root = f"{self.prefix}/" if self.prefix else ""
        list_prefix = self._key(prefix) if prefix else root
        self._ensure_bucket()
        sizes: dict[str, int] = {}
        with self._s3_errors(f"listing {self.uri}/{prefix}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=list_prefix):
                for obj in page.get("Contents", []):
                    key: str = obj["Key"]
                    rel = key[len(root) :]
                    if key.endswith("/") or not key.startswith(root):  # folder markers some servers keep
                        continue
                    if rel.startswith(COMMIT_LOCK_PREFIX):  # held locks are no part of the store's content
                        continue
                    # 'stage' must not match 'stage2/...': only the path itself or what is below it
                    if not prefix or rel == prefix or rel.startswith(prefix + "/"):
                        sizes[rel] = int(obj["Size"])
        return sizes

    # ---- commit lock (locks.py)

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Hold off other commits of `uri`: a lock object created only if absent (see locks.s3_commit_lock)."""
        with s3_commit_lock(self, uri):
            yield

    def create_if_absent(self, path: str, data: bytes) -> bool:
        """Create the object `path` with `data` unless it exists (a conditional PUT); True when created.

        A server without conditional writes answers 501: then True, with a warning that commits are not locked.
        """
        from botocore.exceptions import ClientError

        key = self._key(path)
        self._ensure_bucket()
        with self._s3_errors(f"taking the commit lock {self.location(path)}"):
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                failure = classify_s3_error(exc)
                code, status = (failure.code, exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if status == 501 or code == "NotImplemented":
                    log.warning(
                        "bucket %r at %s does not support conditional writes: commits are not locked",
                        self.bucket,
                        self.endpoint,
                    )
                    return True
                raise

    def remove_object(self, path: str, action: str) -> None:
        """Delete the one object `path` (`delete` lists first, and listings skip locks); `action` is for messages."""
        key = self._key(path)
        with self._s3_errors(f"{action} {self.location(path)}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    # ---- artifact level

    def _materialise(self, uri: str, manifest: dict[str, Any], manifest_sha: str) -> Path:
        """Download the artifact into cache_dir/<uri>/ and verify it; reuse a verified copy.

        A copy counts as verified when its '.verified' marker holds this manifest's sha256
        and every file still has its listed size (no re-hashing on every fetch).
        """
        folder = self.cache_root / validate_path(uri)
        marker = folder / VERIFIED_MARKER
        files: dict[str, Any] = manifest["files"]
        if self._cached_copy_is_current(folder, files, manifest_sha):
            return folder
        marker.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        for rel, entry in sorted(files.items()):
            local = folder / validate_path(rel)
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            # A file from an interrupted earlier fetch that already matches need not be downloaded again.
            if local.is_file() and local.stat().st_size == entry.get("size") and sha256_file(local) == expected:
                continue
            try:
                self.get_file(f"{uri}/{rel}", local)
            except ArtifactNotFound:
                local.unlink(missing_ok=True)
            try:
                self._check_file(uri, rel, entry, local)
            except CorruptArtifact:
                local.unlink(missing_ok=True)  # never leave a bad copy in the cache
                raise
        self._remove_strays(folder, set(files))
        write_bytes_atomic(folder / MANIFEST_NAME, manifest_bytes(manifest), durable=False)
        write_bytes_atomic(marker, manifest_sha.encode("ascii"), durable=False)
        return folder

    @staticmethod
    def _cached_copy_is_current(folder: Path, files: dict[str, Any], manifest_sha: str) -> bool:
        """Whether `folder` holds a copy verified for this manifest with every file at its listed size."""
        marker = folder / VERIFIED_MARKER
        try:
            if marker.read_text().strip() != manifest_sha:
                return False
        except OSError:
            return False
        for rel, entry in files.items():
            local = folder / rel
            if not local.is_file() or local.stat().st_size != entry.get("size"):
                return False
        return True

    @staticmethod
    def _remove_strays(folder: Path, keep: set[str]) -> None:
        """Delete files in the cache folder that the manifest does not list (an older version's)."""
        for path in sorted(folder.rglob("*"), reverse=True):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in keep and rel not in {MANIFEST_NAME, VERIFIED_MARKER}:
                path.unlink()
