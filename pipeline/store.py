"""The artifact store: a local folder or any S3-compatible server (AWS S3, MinIO, SeaweedFS, R2, Ceph).

Two levels:

* Files. `put_bytes`, `get_bytes`, `put_file`, `get_file`, `exists`, `list`, `delete` take
  '/'-separated paths relative to the store root (checked by `validate_path`), so the same
  path means the same thing in a folder and in a bucket.
* Artifacts. An artifact lives under `<stage>/<key>/` (its `uri`). `commit` uploads a staging
  folder and then writes `manifest.json` last: the manifest is the commit marker, an
  artifact without one does not exist. It lists every file's sha256 and size, the inputs'
  digests and the stage config. `fetch` hands back a local folder whose every file has been
  checked against the manifest; anything that does not match raises `CorruptArtifact` and
  the manifest is deleted, so the producing stage recomputes instead of a corrupt artifact
  ever being used.

`open_store(StoreSettings(...))` picks the implementation from the uri (`s3://bucket/prefix`
or a folder). Nothing here reads configuration from globals: everything comes from the
settings object, and from the environment only where boto3 would read it anyway.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import errno
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar

try:  # POSIX: commits of the same artifact to a local store take turns (see LocalStore._exclusive)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.refs import MANIFEST_NAME, Ref, canonical_json

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1024 * 1024
"""Files are hashed in 1 MiB chunks so memory stays flat for multi-GB checkpoints."""

MULTIPART_BYTES = 8 * 1024 * 1024
"""S3 objects larger than this are uploaded (and downloaded) in parts of this size."""

VERIFIED_MARKER = ".verified"
"""Name of the file in a downloaded artifact's cache folder holding the verified manifest sha256."""

_TMP_PREFIX = ".~tmp-"
# Temp files of interrupted local writes carry this prefix; listings skip them.

_COMMIT_LOCK_PREFIX = f"{_TMP_PREFIX}commit-"
# Commit locks live in the store's root as '<prefix><hash of the uri>.lock' (commit_lock_name).

REJECTED_MANIFEST = f"{_TMP_PREFIX}rejected-manifest.json"
# A manifest whose artifact was found corrupt is moved here (it matched its Ref, only a file did not). When
# the stage recomputes exactly the same content, the new manifest keeps its `created_at`, so the artifact keeps
# its sha256 and the stages after it stay cached.

_RETRY_MAX_DELAY_S = 30.0

COMMIT_LOCK_STALE_S = 15 * 60.0
"""An S3 commit lock older than this lost its holder (a commit uploads one artifact; a model takes minutes)."""
COMMIT_LOCK_POLL_S = 1.0
"""How often a committer waiting for an S3 commit lock looks again."""
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
     "TooManyRequests", "InternalError", "ServiceUnavailable"}
)
T = TypeVar("T")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# 's3:', 'file:', 'http:' and also Windows drive letters ('C:'): none belongs in a relative path.

_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
# S3 bucket names (DNS-compatible, as AWS, MinIO and SeaweedFS require); no ':', '@', '?', '#', '%' or '_'.

_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403",
     "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})


# --------------------------------------------------------------------------- errors


class ArtifactNotFound(FileNotFoundError):
    """A file or an artifact is not in the store. The message names its full location."""


class CorruptArtifact(RuntimeError):
    """A stored file (or manifest) does not hash to what the manifest (or the Ref) says.

    Carries `uri` (the artifact's '<stage>/<key>'), `file` (relative to the artifact),
    `expected` and `found` sha256 (`found` is '<missing>' for a file that is not there).
    """

    def __init__(self, uri: str, file: str, expected: str, found: str, where: str | None = None) -> None:
        self.uri, self.file, self.expected, self.found, self.where = uri, file, expected, found, where
        at = f" (at {where})" if where else ""
        super().__init__(
            f"corrupt artifact {uri}{at}: file {file!r} should have sha256 {expected} "
            f"but has {found}; it will not be used"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions are rebuilt from self.args when pickled (Prefect, multiprocessing);
        # ours has a different signature, so say how to rebuild it.
        return (type(self), (self.uri, self.file, self.expected, self.found, self.where))


class StoreError(RuntimeError):
    """The store cannot be used: endpoint unreachable, access denied, bucket missing, disk full,
    no write permission.

    The message names the endpoint and bucket (or the local folder) and what to check; never a secret key.
    """


class StoreUnavailable(StoreError):
    """A StoreError that may pass: the endpoint did not answer, or answered with a server error or
    throttling, after every retry. Stage tasks that retry (I/O tasks) retry on this, not on others."""


# --------------------------------------------------------------------------- settings


class StoreSettings(BaseModel):
    """Where artifacts live: a local folder or `s3://bucket/prefix` on any S3-compatible server."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected value may hold a credential

    uri: str = Field(
        "./artifacts",
        description="A local folder (relative paths are resolved against the working "
        "directory) or s3://bucket/prefix on an S3-compatible server.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. http://127.0.0.1:8333 for SeaweedFS or MinIO. "
        "Unset: AWS_ENDPOINT_URL from the environment, else AWS S3 itself.",
    )
    region: str | None = Field(
        None,
        description="S3 region. Unset: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1.",
    )
    access_key_id: SecretStr | None = Field(
        None,
        description="S3 access key id. Unset: boto3's usual chain (AWS_ACCESS_KEY_ID, "
        "~/.aws/credentials, instance roles).",
    )
    secret_access_key: SecretStr | None = Field(
        None,
        description="S3 secret key; set together with access_key_id. Never logged or shown.",
    )
    cache_dir: str | None = Field(
        None,
        description="Folder that S3 artifacts are downloaded into and verified in. Unset: "
        "~/.cache/finetune-pipeline/store/<hash of uri>.",
    )
    retry_attempts: int = Field(
        4,
        ge=1,
        le=20,
        description="Attempts per S3 request, the first included, before the store gives up with an error "
        "naming the endpoint. Only an unreachable endpoint, a timeout, a server error (5xx) or throttling is "
        "retried; access denied or a missing key fails at once.",
    )
    retry_backoff_seconds: float = Field(
        0.5,
        ge=0,
        le=60,
        description="Wait before the first retry of an S3 request; it doubles for each further retry (with "
        "+-20% jitter, at most 30 s each). The defaults ride out about 3.5 s of outage per request.",
    )

    @field_validator("uri")
    @classmethod
    def _uri_is_usable(cls, value: str) -> str:
        """Reject an empty uri, an s3 uri without a bucket, and URL schemes the store cannot serve."""
        if not value.strip():
            raise ValueError("expected a folder or s3://bucket/prefix, found an empty string")
        if value.startswith("s3://"):
            parse_s3_uri(value)
        elif "://" in value and not value.startswith("file://"):
            raise ValueError(f"expected a folder or s3://bucket/prefix, found {redact_uri(value)!r}")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_has_no_credentials(cls, value: str | None) -> str | None:
        """Credentials inside the endpoint URL would be shown wherever the endpoint is named."""
        if value is not None and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(f"expected an endpoint URL without credentials (set access_key_id and secret_access_key "
                             f"instead), found {redact_uri(value)!r}")
        return value

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> StoreSettings:
        """An access key without its secret (or the reverse) is always a mistake."""
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "access_key_id and secret_access_key must be set together, or neither "
                "(to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment)"
            )
        return self


# --------------------------------------------------------------------------- paths and hashes


def validate_path(path: str) -> str:
    """Check a store path and return it unchanged.

    In: a '/'-separated path relative to the store root, e.g. 'collect/ab12/data.jsonl'.
    Out: the same string. Raises ValueError naming the path when it is empty, absolute,
    has a URL scheme, backslashes, an empty segment ('//' or a trailing '/') or a '.' or
    '..' segment: such paths would mean different things in a folder and in a bucket,
    or escape the root.
    """
    problem = _path_problem(path)
    if problem:
        raise ValueError(f"invalid store path {path!r}: {problem}")
    return path


def _path_problem(path: object) -> str | None:
    """Say what is wrong with a store path, or None when it is fine."""
    if not isinstance(path, str) or path == "":
        return "expected a non-empty relative path like 'stage/key/file'"
    if "\\" in path:
        return "backslashes are not allowed, use '/'"
    if "://" in path or _SCHEME.match(path):
        return "a URL or drive is not allowed, paths are relative to the store root"
    if path.startswith("/"):
        return "absolute paths are not allowed, paths are relative to the store root"
    if "\x00" in path:
        return "NUL characters are not allowed"
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        return "control characters are not allowed"
    segments = path.split("/")
    if "" in segments:
        return "empty segments ('//' or a trailing '/') are not allowed"
    if any(seg in (".", "..") for seg in segments):
        return "'.' and '..' segments are not allowed"
    decoded = _decoded(path)
    if decoded != path and _path_problem(decoded):
        # '%2e%2e' is '..' to any server or proxy that decodes keys once more
        return f"percent-encoded or look-alike characters that read as {decoded!r} are not allowed"
    return None


def _decoded(path: str) -> str:
    """`path` as a server that percent-decodes (repeatedly) and Unicode-normalises keys might read it."""
    import unicodedata
    from urllib.parse import unquote

    for _ in range(3):  # '%252e' -> '%2e' -> '.'
        path = unquote(path)
    return unicodedata.normalize("NFKC", path)


def _prefix_path(prefix: str) -> str:
    """A listing/deletion prefix: a store path, with one trailing '/' tolerated."""
    return validate_path(prefix[:-1] if prefix.endswith("/") else prefix)


def sha256_bytes(data: bytes) -> str:
    """In: bytes. Out: their sha256 as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """In: a local file. Out: its sha256 as 64 hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def commit_lock_name(uri: str) -> str:
    """The store path of the lock that commits of the artifact `uri` take turns on (in the store's root)."""
    return f"{_COMMIT_LOCK_PREFIX}{sha256_bytes(uri.encode('utf-8'))[:32]}.lock"


def redact_uri(text: str) -> str:
    """`text` with any 'user:password@' part of a URL replaced by '***@', for messages."""
    text = re.sub(r"(?<=://)[^/@\s]*@", "***@", text)
    return re.sub(r"^[^/@\s]*@", "***@", text)  # a bare 'user:secret@bucket' (an s3 uri's netloc)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """In: 's3://bucket/some/prefix'. Out: ('bucket', 'some/prefix'); the prefix may be ''.

    Raises ValueError naming the uri when the bucket is missing or the prefix is not a valid store path.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://bucket/prefix, found {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"expected s3://bucket/prefix, found {uri!r} (no bucket)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        # Also stops URL tricks: 'user:secret@host', '?query', '#fragment', '%2e' never reach an endpoint.
        raise ValueError(f"invalid bucket in {redact_uri(uri)!r}: expected 1-63 lowercase letters, digits, '.' and "
                         f"'-', starting and ending with a letter or digit, found {redact_uri(bucket)!r}")
    if prefix and _path_problem(prefix):
        raise ValueError(f"invalid prefix in {uri!r}: {_path_problem(prefix)}")
    return bucket, prefix


def _staged_files(staging_dir: Path) -> dict[str, Path]:
    """In: a staging folder. Out: {relative posix path: file} for every file under it, sorted."""
    files: dict[str, Path] = {}
    for path in sorted(staging_dir.rglob("*")):
        if path.is_file():
            files[validate_path(path.relative_to(staging_dir).as_posix())] = path
    return files


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes a manifest is stored as (its sha256 is the Ref's sha256)."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")


def _parse_manifest(data: bytes) -> dict[str, Any] | None:
    """In: manifest bytes. Out: the manifest, or None when it is not a manifest at all."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _plain_json(value: Any) -> Any:
    """Turn pydantic models, Refs and containers into plain JSON values (secrets become null)."""
    return json.loads(canonical_json(value))


# --------------------------------------------------------------------------- local file helpers


def _atomic_write(target: Path, write: Callable[[Path], None], *, durable: bool) -> None:
    """Write `target` through a temp file in the same folder, then os.replace it into place.

    A reader therefore sees the old file or the complete new one, never a half-written one.
    `durable` fsyncs before the rename, so a crash cannot leave a renamed but empty file
    (which matters most for the manifest, the commit marker).
    """
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
    try:
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                write(tmp)
                break
            except FileNotFoundError:
                # Another process pruned the folder while it was empty (LocalStore.delete): make it again.
                if attempt == 2 or target.parent.is_dir():
                    raise
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_bytes_atomic(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Atomically write `data` to `target`."""
    _atomic_write(target, lambda tmp: tmp.write_bytes(data), durable=durable)


def _copy_atomic(source: Path, target: Path, *, durable: bool = True) -> None:
    """Atomically copy the file `source` to `target`."""
    _atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), durable=durable)


def _gone_is_fine(function: Any, path: str, exc_info: Any) -> None:
    """shutil.rmtree error handler: a file another process removed first is fine, anything else is raised."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _require_local_file(local: Path) -> Path:
    """Raise FileNotFoundError naming `local` unless it is an existing file."""
    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"local file {local} does not exist")
    return local


# --------------------------------------------------------------------------- the interface


class ArtifactStore(abc.ABC):
    """A root (folder or bucket prefix) holding files and committed artifacts.

    Subclasses implement the file level; the artifact level (commit, manifests, fetch
    with verification) is shared, so both stores behave the same.
    """

    uri: str
    """The root, for display: a folder path or s3://bucket/prefix."""

    # ---- file level (paths are relative to the root, checked by validate_path)

    @abc.abstractmethod
    def location(self, path: str) -> str:
        """In: a store path. Out: its full location (a local path or s3://bucket/key) for messages."""

    @abc.abstractmethod
    def put_bytes(self, path: str, data: bytes) -> None:
        """Store `data` at `path`, replacing what was there."""

    @abc.abstractmethod
    def get_bytes(self, path: str) -> bytes:
        """Out: the bytes stored at `path`. Raises ArtifactNotFound naming the location."""

    @abc.abstractmethod
    def put_file(self, path: str, local: Path) -> None:
        """Store the local file `local` at `path`, replacing what was there."""

    @abc.abstractmethod
    def get_file(self, path: str, local: Path) -> None:
        """Copy `path` to the local file `local` (atomically). Raises ArtifactNotFound."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Out: whether a file is stored at `path`."""

    @abc.abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete the file `prefix`, or every file under the folder `prefix`. Missing is fine."""

    @abc.abstractmethod
    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the file `prefix` and every file under it ('' = the whole root)."""

    @abc.abstractmethod
    def _materialise(self, uri: str, manifest: dict[str, Any], manifest_sha: str) -> Path:
        """Out: a local folder with the artifact's files, each checked against the manifest."""

    def list(self, prefix: str = "") -> list[str]:
        """Out: sorted paths (relative to the root, not to `prefix`) of the file `prefix` and
        every file under it, recursively. '' lists the whole store."""
        return sorted(self._sizes(_prefix_path(prefix) if prefix else ""))

    # ---- artifact level

    def commit(
        self,
        uri: str,
        staging_dir: Path,
        *,
        kind: str,
        inputs: dict[str, str],
        config: Any,
        meta: dict,
    ) -> Ref:
        """Store the folder `staging_dir` as the artifact `uri` ('<stage>/<key>').

        In: the files to store, the producing stage's name (`kind`), its inputs' sha256 by
        name, its config section (a model or plain values; secrets are dropped) and small
        summary figures (`meta`). Every file goes to '<uri>/<relpath>' first; the manifest
        goes last, so an interrupted commit leaves no artifact. Out: the Ref.

        Faults: when the store refuses a write (StoreError: disk full, no permission, endpoint
        gone) the files of this attempt are removed again, best effort, and the error raised.
        When another run committed the same uri meanwhile (two runs of one config), its
        artifact is kept and its Ref returned: a committed artifact is never overwritten, so a
        Ref another run holds stays valid. Local stores serialise commits of one uri.
        When the artifact was rejected as corrupt earlier and the same content is committed
        again, the old manifest's `created_at` is kept, so the Ref (and what depends on it) is the same.
        """
        validate_path(uri)
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise FileNotFoundError(f"staging folder {staging_dir} does not exist")
        files = _staged_files(staging_dir)
        for reserved in (MANIFEST_NAME, VERIFIED_MARKER):  # the store writes these itself
            if reserved in files:
                raise ValueError(f"{staging_dir / reserved}: {reserved!r} is reserved by the artifact store")
        entries = {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()}
        manifest = {
            "kind": kind,
            "uri": uri,
            "files": entries,
            "inputs": _plain_json(dict(inputs)),
            "config": _plain_json(config),
            "meta": _plain_json(dict(meta)),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        with self._exclusive(uri):
            if self.has_artifact(uri):
                log.info("%s was committed by another run meanwhile; keeping it", self.location(uri))
                return self.open_ref(uri)
            manifest["created_at"] = self._earlier_created_at(uri, manifest) or manifest["created_at"]
            self._discard(uri)  # leftovers of an earlier attempt (or a corrupt artifact) must not mix in
            try:
                for rel, path in files.items():
                    self.put_file(f"{uri}/{rel}", path)
                data = _manifest_bytes(manifest)
                self.put_bytes(f"{uri}/{MANIFEST_NAME}", data)
            except StoreError:
                self._abandon(uri)
                raise
        return Ref(kind=kind, uri=uri, sha256=sha256_bytes(data), meta=manifest["meta"])

    def read_manifest(self, uri: str) -> dict | None:
        """In: an artifact uri. Out: its manifest, or None when it has none (it does not exist).

        An unreadable manifest also counts as none, so the stage simply recomputes.
        """
        data = self._read_manifest_bytes(uri)
        if data is None:
            return None
        manifest = _parse_manifest(data)
        if manifest is None:
            log.warning("ignoring unreadable manifest %s", self.location(f"{uri}/{MANIFEST_NAME}"))
        return manifest

    def has_artifact(self, uri: str) -> bool:
        """Out: whether `uri` has a manifest and every file it lists is stored with the listed size.

        Cheap (one listing, no hashing); `fetch` does the full check.
        """
        manifest = self.read_manifest(uri)
        if manifest is None:
            return False
        sizes = self._sizes(uri)
        return all(
            isinstance(entry, dict) and sizes.get(f"{uri}/{rel}") == entry.get("size")
            for rel, entry in manifest["files"].items()
        )

    def fetch(self, ref: Ref) -> Path:
        """In: a Ref. Out: a local folder holding the artifact's files (and its manifest); read-only
        for the caller (for a local store it is the stored artifact itself).

        The manifest must hash to `ref.sha256` and every file to its manifest entry. On any
        mismatch the manifest is deleted from the store (the artifact stops existing, so
        its stage recomputes next run) and CorruptArtifact is raised. ArtifactNotFound
        when there is no manifest.
        """
        uri = validate_path(ref.uri)
        data = self._read_manifest_bytes(uri)
        if data is None:
            raise ArtifactNotFound(
                f"artifact {self.location(uri)} does not exist (no {MANIFEST_NAME}): "
                "it was never committed, or was removed as corrupt"
            )
        found = sha256_bytes(data)
        if found != ref.sha256:
            self._reject(CorruptArtifact(ref.uri, MANIFEST_NAME, ref.sha256, found, self.location(uri)))
        manifest = _parse_manifest(data)
        if manifest is None:
            self._reject(CorruptArtifact(ref.uri, MANIFEST_NAME, "a JSON manifest", "unparseable bytes"))
        return self._materialise(uri, manifest, found)

    def open_ref(self, uri: str) -> Ref:
        """In: an artifact uri. Out: the Ref of its stored manifest (kind and meta from it).

        Raises ArtifactNotFound when the artifact has no (readable) manifest.
        """
        data = self._read_manifest_bytes(uri)
        manifest = _parse_manifest(data) if data is not None else None
        if manifest is None:
            raise ArtifactNotFound(f"artifact {self.location(uri)} does not exist (no valid {MANIFEST_NAME})")
        return Ref(
            kind=str(manifest.get("kind", uri.split("/", 1)[0])),
            uri=uri,
            sha256=sha256_bytes(data),
            meta=manifest.get("meta") or {},
        )

    # ---- shared helpers

    def _read_manifest_bytes(self, uri: str) -> bytes | None:
        """Out: the stored manifest bytes of `uri`, or None when there is none."""
        validate_path(uri)
        try:
            return self.get_bytes(f"{uri}/{MANIFEST_NAME}")
        except ArtifactNotFound:
            return None

    def _discard(self, uri: str) -> None:
        """Remove an artifact: its manifest first (so it stops existing at once), then its files."""
        self.delete(f"{uri}/{MANIFEST_NAME}")
        self.delete(uri)

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Hold off other commits of `uri` while this one runs (each store has its own lock)."""
        yield

    def _abandon(self, uri: str) -> None:
        """After a failed commit: remove what this attempt wrote, unless a manifest is there. Never raises."""
        try:
            if self.read_manifest(uri) is None:
                self._discard(uri)
        except Exception as exc:  # the write failure is the news; e.g. the endpoint is still down
            log.warning("could not remove the partial upload %s: %s", self.location(uri), exc)

    def _earlier_created_at(self, uri: str, manifest: dict[str, Any]) -> str | None:
        """`created_at` of the manifest rejected at `uri` when everything else in it equals `manifest`."""
        try:
            earlier = _parse_manifest(self.get_bytes(f"{uri}/{REJECTED_MANIFEST}"))
        except ArtifactNotFound:
            return None
        if earlier is None or not isinstance(earlier.get("created_at"), str):
            return None
        same = all(earlier.get(key) == value for key, value in manifest.items() if key != "created_at")
        return earlier["created_at"] if same and set(earlier) == set(manifest) else None

    def is_intact(self, uri: str) -> bool:
        """Whether the committed artifact `uri` may be reused without recomputing it.

        Here: `has_artifact` (manifest present, every file at its listed size); `fetch` hashes
        every file that is used. LocalStore hashes every file now. A corrupt artifact is rejected
        (CorruptArtifact raised, its manifest removed), so its stage recomputes it.
        """
        return self.has_artifact(uri)

    def _reject(self, error: CorruptArtifact) -> NoReturn:
        """Delete the corrupt artifact's manifest so its stage recomputes it, then raise `error`.

        A manifest that matched its Ref (only a file did not) is kept aside as REJECTED_MANIFEST.
        """
        try:
            if error.file != MANIFEST_NAME:
                data = self._read_manifest_bytes(error.uri)
                if data is not None:
                    self.put_bytes(f"{error.uri}/{REJECTED_MANIFEST}", data)
            self.delete(f"{error.uri}/{MANIFEST_NAME}")
            log.warning("%s; removed its manifest so the producing stage recomputes it", error)
        except Exception as exc:  # the corruption is the news; a failed clean-up must not hide it
            log.warning("%s; could not remove its manifest: %s", error, exc)
        raise error

    def _check_file(self, uri: str, rel: str, entry: Any, local: Path) -> None:
        """Raise (through `_reject`) unless the local file `local` hashes to its manifest entry."""
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        found = sha256_file(local) if local.is_file() else "<missing>"
        if found != expected:
            self._reject(CorruptArtifact(uri, rel, str(expected), found, self.location(f"{uri}/{rel}")))


# --------------------------------------------------------------------------- local folder


class LocalStore(ArtifactStore):
    """An artifact store in a local folder. Writes go through a temp file and os.replace."""

    def __init__(self, root: Path | str) -> None:
        """In: the root folder (created if missing; relative paths resolve against the cwd)."""
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        with self._writing("creating", self.root):
            self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _writing(self, action: str, target: Path) -> Iterator[None]:
        """Turn an OSError of a write into a StoreError naming the file, the store and what to do.

        The temp file of a failed write is already gone (`_atomic_write`); `commit` removes the
        files of a failed attempt.
        """
        try:
            yield
        except StoreError:
            raise
        except OSError as exc:
            code = exc.errno
            if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                what = ("no space left on the device (disk or quota full): free space there or point store.uri "
                        "at a folder on a larger disk")
            elif code in (errno.EACCES, errno.EPERM):
                what = (f"permission denied: the pipeline (user id {os.getuid() if hasattr(os, 'getuid') else '?'}) "
                        "may not write there; fix the folder's owner or mode, or choose another store.uri")
            elif code == errno.EROFS:
                what = "the file system is read-only: choose a writable store.uri"
            else:
                what = f"{exc.strerror or exc} (errno {errno.errorcode.get(code, code)})"
            raise StoreError(f"cannot write to the local store {self.root} ({action} {target}): {what}. "
                             "Nothing of this write was kept.") from exc

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Take an exclusive lock for committing `uri`: a second committer waits, then finds it committed.

        The lock is a temp-named file in the root (listings skip it), removed on release; a
        waiter that locked a file already removed tries again.
        """
        if fcntl is None:  # pragma: no cover - Windows: no locking
            yield
            return
        path = self.root / commit_lock_name(uri)
        with self._writing("taking the commit lock", path):
            while True:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    if os.path.samestat(os.fstat(handle), os.stat(path)):
                        break
                except FileNotFoundError:
                    pass
                except BaseException:
                    os.close(handle)
                    raise
                os.close(handle)
        try:
            yield
        finally:
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(handle)

    def _abs(self, path: str) -> Path:
        """The local path of a store path; ValueError when a symbolic link inside the store leads out of its root."""
        target = self.root / validate_path(path)
        real = target.resolve()
        if real != self.root and self.root not in real.parents:
            raise ValueError(f"invalid store path {path!r}: a symbolic link leads it out of the store root {self.root}")
        return target

    def location(self, path: str) -> str:
        """In: a store path. Out: its absolute local path."""
        return str(self._abs(path))

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to `path` atomically (temp file + os.replace, fsynced). StoreError when the disk refuses."""
        target = self._abs(path)
        with self._writing("writing", target):
            _write_bytes_atomic(target, data)

    def get_bytes(self, path: str) -> bytes:
        """Out: the bytes at `path`. Raises ArtifactNotFound naming the local path."""
        target = self._abs(path)
        if not target.is_file():
            raise ArtifactNotFound(f"{target} does not exist")
        return target.read_bytes()

    def put_file(self, path: str, local: Path) -> None:
        """Copy the local file `local` to `path` atomically. StoreError when the disk refuses."""
        source, target = _require_local_file(local), self._abs(path)
        with self._writing("writing", target):
            _copy_atomic(source, target)

    def get_file(self, path: str, local: Path) -> None:
        """Copy `path` to `local` atomically. Raises ArtifactNotFound naming the local path."""
        source = self._abs(path)
        if not source.is_file():
            raise ArtifactNotFound(f"{source} does not exist")
        _copy_atomic(source, Path(local), durable=False)

    def exists(self, path: str) -> bool:
        """Out: whether a file is stored at `path`."""
        return self._abs(path).is_file()

    def delete(self, prefix: str) -> None:
        """Delete the file or folder `prefix` (missing is fine) and the empty folders left above it."""
        target = self._abs(_prefix_path(prefix))
        with self._writing("deleting", target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, onerror=_gone_is_fine)
            else:
                target.unlink(missing_ok=True)
        self._prune_empty_parents(target.parent)

    def _prune_empty_parents(self, folder: Path) -> None:
        """Remove empty folders from `folder` up to (not including) the root: no clutter of empty stage dirs."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                return
            folder = folder.parent

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the file `prefix` or the files under it, skipping temp files."""
        base = self._abs(prefix) if prefix else self.root
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        sizes: dict[str, int] = {}
        for folder, _, names in os.walk(base):  # another process may delete files meanwhile: skip those
            for name in names:
                if name.startswith(_TMP_PREFIX):
                    continue
                path = Path(folder) / name
                try:
                    if path.is_file():
                        sizes[path.relative_to(self.root).as_posix()] = path.stat().st_size
                except FileNotFoundError:
                    continue
        return sizes

    def _materialise(self, uri: str, manifest: dict[str, Any], manifest_sha: str) -> Path:
        """Verify every file in place; out: the artifact's own folder."""
        folder = self._abs(uri)
        for rel, entry in sorted(manifest["files"].items()):
            self._check_file(uri, rel, entry, folder / validate_path(rel))
        return folder

    def is_intact(self, uri: str) -> bool:
        """Whether `uri` is committed with every file hashing to its manifest entry (local files hash fast).

        False when there is no manifest or a file is missing or resized; CorruptArtifact (after
        rejecting the artifact) when a file's bytes changed.
        """
        if not self.has_artifact(uri):
            return False
        self.fetch(self.open_ref(uri))
        return True


# --------------------------------------------------------------------------- S3


def resolve_region(settings: StoreSettings) -> str:
    """Out: settings.region, else AWS_REGION, else AWS_DEFAULT_REGION, else 'us-east-1'."""
    return settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def default_cache_dir(uri: str) -> Path:
    """Out: ~/.cache/finetune-pipeline/store/<16 hex digits of sha256(uri)> (honours XDG_CACHE_HOME).

    One folder per store root, so two buckets never share downloads.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finetune-pipeline" / "store" / sha256_bytes(uri.encode("utf-8"))[:16]


def s3_client_config() -> Any:
    """Out: the botocore Config for store clients.

    Path-style addressing because SeaweedFS/MinIO/Ceph on a bare host:port have no
    per-bucket DNS names; a short connect timeout so a wrong endpoint fails fast;
    standard retries for the transient errors a real network has.
    """
    from botocore.config import Config

    return Config(
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"},
        connect_timeout=5,
        read_timeout=60,
    )


def make_s3_client(settings: StoreSettings) -> Any:
    """In: store settings. Out: a boto3 S3 client.

    Endpoint and credentials are passed only when set in the settings, so otherwise
    boto3's own chain applies (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws, roles).
    A private session: no state shared with other boto3 users in the process.
    """
    import boto3

    kwargs: dict[str, Any] = {"region_name": resolve_region(settings), "config": s3_client_config()}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        kwargs["aws_access_key_id"] = settings.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
    session = boto3.session.Session()
    try:
        client = session.client("s3", **kwargs)
    except ValueError as exc:  # e.g. a malformed endpoint URL
        raise StoreError(f"cannot use S3 endpoint {settings.endpoint_url!r} for {settings.uri}: {exc}") from exc
    if "aws_access_key_id" in kwargs:
        _redact_in_logs(kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"])
    else:  # the chain's credentials, already resolved (and cached by the session) for the client
        credentials = session.get_credentials()
        if credentials is not None:
            _redact_in_logs(*credentials.get_frozen_credentials())
    return client


class _RedactCredentials(logging.Filter):
    """Masks the credentials the store uses in log records of boto3, botocore, s3transfer and urllib3.

    botocore's DEBUG records dump request headers (`Authorization: ... Credential=<key id>/...`,
    `X-Amz-Security-Token: <token>`): whoever turns DEBUG on must still get no credential in a log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot be formatted is not ours to fix
            return True
        redacted = text
        for value in self.values:
            redacted = redacted.replace(value, "***")
        if redacted != text:
            record.msg, record.args = redacted, ()
        return True


_REDACTOR = _RedactCredentials()


def _redact_in_logs(*values: str | None) -> None:
    """Add credential values to the redaction filter and make sure every AWS library logger has it."""
    _REDACTOR.values.update(v for v in values if v and len(v) >= 8)  # shorter strings are no real credential
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("boto3", "botocore", "s3transfer", "urllib3"):
            logger = logging.getLogger(name)
            if _REDACTOR not in logger.filters:
                logger.addFilter(_REDACTOR)


def _error_code(exc: Any) -> tuple[str, int]:
    """Out: (S3 error code, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(exc: Any) -> bool:
    """Whether a ClientError means 'no such key' (GET says NoSuchKey, HEAD only says 404)."""
    code, status = _error_code(exc)
    return code in _NOT_FOUND_CODES or (status == 404 and code not in _MISSING_BUCKET_CODES)


_HELD_LOCKS: set[str] = set()
# Tokens of the S3 commit locks this process holds now. A lock naming this process but not one of these
# is a leftover of an earlier attempt (its release failed while the server was down) and is broken.


def _lock_holder_is_gone(holder: Any, age_seconds: float) -> bool:
    """Whether an S3 commit lock's holder {host, pid, token} can no longer release it.

    True when the lock is older than COMMIT_LOCK_STALE_S, or its holder is on this host and is
    either a process that no longer runs or this process without the lock in hand.
    """
    if age_seconds > COMMIT_LOCK_STALE_S or not isinstance(holder, dict):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if pid == os.getpid():
        return holder.get("token") not in _HELD_LOCKS
    try:
        os.kill(int(pid), 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return not isinstance(pid, int)
    return False


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
        # Objects above 8 MB go multipart: parts retry on their own and upload in parallel.
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        self._bucket_ready = False
        self._attempts, self._backoff = settings.retry_attempts, settings.retry_backoff_seconds

    # ---- helpers

    def _key(self, path: str) -> str:
        """The object key of a store path."""
        validate_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def location(self, path: str) -> str:
        """In: a store path. Out: s3://bucket/key."""
        return f"s3://{self.bucket}/{self._key(path)}"

    def _where(self) -> str:
        """'bucket B at endpoint E' for messages."""
        return f"bucket {self.bucket!r} at {self.endpoint}"

    @contextmanager
    def _s3_errors(self, action: str) -> Iterator[None]:
        """Turn botocore errors into StoreError messages a person can act on.

        They name the endpoint, the bucket and what to check, never a secret key
        (botocore's own messages do not contain it either).
        """
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError as BotoConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except (ArtifactNotFound, StoreError):
            raise
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"no usable S3 credentials for {self._where()} while {action}: set store.access_key_id "
                "and store.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            raise StoreUnavailable(
                f"cannot reach the S3 endpoint {self.endpoint} (bucket {self.bucket!r}) while {action}: {exc}. "
                "Check store.endpoint_url (or AWS_ENDPOINT_URL) and that the server is running."
            ) from exc
        except ClientError as exc:
            code, status = _error_code(exc)
            if status >= 500 or status == 429 or code in _THROTTLE_CODES:
                raise StoreUnavailable(
                    f"the S3 endpoint {self.endpoint} answered {code or status} for {self._where()} while {action}: "
                    "the server is failing or overloaded"
                ) from exc
            if code in _ACCESS_CODES or status == 403:
                raise StoreError(
                    f"access denied ({code or status}) for {self._where()} while {action}: check the "
                    f"access key id and secret key (taken from {self._credentials_from}) and that they "
                    "may read and write this bucket"
                ) from exc
            if code in _MISSING_BUCKET_CODES:
                raise StoreError(
                    f"{self._where()} does not exist (while {action}): create it or fix store.uri"
                ) from exc
            raise StoreError(f"S3 error {code or status} from {self._where()} while {action}: {exc}") from exc
        except (Boto3Error, BotoCoreError) as exc:  # e.g. S3UploadFailedError, which wraps the ClientError as text
            cause = exc.__cause__ or exc.__context__
            code, status = _error_code(cause)
            unavailable = isinstance(cause, (BotoConnectionError, HTTPClientError)) or status >= 500 or status == 429 \
                or code in _THROTTLE_CODES
            raise (StoreUnavailable if unavailable else StoreError)(
                f"S3 failure for {self._where()} while {action}: {exc}") from exc

    def _request(self, action: str, operation: Callable[[], T]) -> T:
        """Run one idempotent S3 request; retry it while the store is unavailable, with exponential backoff.

        Waits retry_backoff_seconds, then twice that, and so on (+-20% jitter, at most 30 s),
        retry_attempts attempts in all. Other errors (access denied, no such key) are not retried.
        When every attempt fails, the StoreUnavailable names the endpoint and what was waited.
        """
        started = time.monotonic()
        for attempt in range(1, self._attempts + 1):
            try:
                with self._s3_errors(action):
                    return operation()
            except StoreUnavailable as error:
                if attempt >= self._attempts:
                    waited = time.monotonic() - started
                    text = str(error).rstrip(".")
                    raise StoreUnavailable(f"{text}. Gave up after {attempt} attempt(s) over {waited:.1f} s "
                                           "(store.retry_attempts, store.retry_backoff_seconds).") from error.__cause__
                delay = min(self._backoff * 2 ** (attempt - 1), _RETRY_MAX_DELAY_S) * random.uniform(0.8, 1.2)
                log.warning("S3 request failed (attempt %d of %d), retrying in %.2f s: %s", attempt, self._attempts,
                            delay, error)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_bucket(self) -> None:
        """Check once that the bucket answers; create it when it does not exist."""
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        def check() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                code, status = _error_code(exc)
                if status != 404 and code not in _MISSING_BUCKET_CODES | {"NotFound"}:
                    raise
                self._create_bucket()

        self._request("checking the bucket", check)
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
            code, _ = _error_code(exc)
            if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return
            raise StoreError(
                f"{self._where()} does not exist and could not be created ({code}): create it, "
                "or use credentials allowed to create buckets"
            ) from exc

    # ---- file level

    def put_bytes(self, path: str, data: bytes) -> None:
        """Upload `data` as one object at `path`."""
        key = self._key(path)
        self._ensure_bucket()
        self._request(f"writing {self.location(path)}", lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def get_bytes(self, path: str) -> bytes:
        """Out: the object's bytes. Raises ArtifactNotFound naming s3://bucket/key."""
        return self._get_object(path)[0]

    def _get_object(self, path: str) -> tuple[bytes, float | None]:
        """Out: the object's bytes and when it was last written (seconds since the epoch; None when the
        server does not say). ArtifactNotFound if there is no such object."""
        from botocore.exceptions import ClientError

        key = self._key(path)
        self._ensure_bucket()
        def read() -> tuple[bytes, float | None]:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key)
                written = response.get("LastModified")
                return response["Body"].read(), written.timestamp() if written is not None else None
            except ClientError as exc:
                if _is_not_found(exc):
                    raise ArtifactNotFound(f"{self.location(path)} does not exist") from None
                raise

        return self._request(f"reading {self.location(path)}", read)

    def put_file(self, path: str, local: Path) -> None:
        """Upload a local file; above 8 MB as a multipart upload."""
        local = _require_local_file(local)
        key = self._key(path)
        self._ensure_bucket()
        self._request(f"uploading {local} to {self.location(path)}",
                      lambda: self._client.upload_file(str(local), self.bucket, key, Config=self._transfer))

    def get_file(self, path: str, local: Path) -> None:
        """Download `path` to `local` through a temp file + os.replace. Raises ArtifactNotFound."""
        from botocore.exceptions import ClientError

        key = self._key(path)
        self._ensure_bucket()

        def download(tmp: Path) -> None:
            self._client.download_file(self.bucket, key, str(tmp), Config=self._transfer)

        def fetch() -> None:
            try:
                _atomic_write(Path(local), download, durable=False)
            except ClientError as exc:
                if _is_not_found(exc):
                    raise ArtifactNotFound(f"{self.location(path)} does not exist") from None
                raise

        self._request(f"downloading {self.location(path)}", fetch)

    def exists(self, path: str) -> bool:
        """Out: whether an object is stored at `path` (one HEAD request)."""
        from botocore.exceptions import ClientError

        key = self._key(path)
        self._ensure_bucket()
        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise

        return self._request(f"checking {self.location(path)}", head)

    # ---- commit lock

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Hold off other commits of `uri`: a lock object created only if absent (a conditional PUT).

        Without it, a second run committing the same uri could discard the first run's
        files while that run writes its manifest. A waiter polls until the lock is gone,
        then finds the artifact committed. A lock whose holder is gone (a dead process on
        this host, an earlier attempt of this process, or older than COMMIT_LOCK_STALE_S)
        is broken. A server without conditional writes answers 501 and the commit goes on
        unlocked, as on stores without locking.
        """
        path = commit_lock_name(uri)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        waiting_logged = False
        _HELD_LOCKS.add(holder["token"])  # before the PUT: a thread that finds the lock must see it in hand
        try:
            while not self._take_lock(path, holder):
                if not waiting_logged:
                    log.info("waiting for another run to finish committing %s", self.location(uri))
                    waiting_logged = True
                time.sleep(COMMIT_LOCK_POLL_S * random.uniform(0.8, 1.2))
        except BaseException:
            _HELD_LOCKS.discard(holder["token"])
            raise
        try:
            yield
        finally:
            _HELD_LOCKS.discard(holder["token"])
            try:
                self._remove_lock(path, "releasing")
            except StoreError as error:  # the commit's own outcome matters more; a left lock is broken later
                log.warning("could not release the commit lock %s (the next commit breaks it): %s",
                            self.location(path), error)

    def _take_lock(self, path: str, holder: dict[str, Any]) -> bool:
        """Create the lock object `path` unless it exists; True when `holder` holds it now.

        When it exists and its holder is gone, it is deleted and False returned (the caller tries again).
        """
        from botocore.exceptions import ClientError

        key = self._key(path)
        self._ensure_bucket()

        def create() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(holder).encode(), IfNoneMatch="*")
                return True
            except ClientError as exc:
                code, status = _error_code(exc)
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if status == 501 or code == "NotImplemented":
                    log.warning("%s does not support conditional writes: commits are not locked", self._where())
                    return True
                raise

        if self._request(f"taking the commit lock {self.location(path)}", create):
            return True
        try:
            data, written_at = self._get_object(path)
            found, age = json.loads(data), time.time() - written_at if written_at is not None else 0.0
        except (ArtifactNotFound, ValueError):
            return False  # released (or being written) meanwhile: try again
        if _lock_holder_is_gone(found, age):
            # Two waiters breaking the same dead lock at once could also remove the new lock one of them
            # just took; dead holders are rare (a crash or an outage), so that window is accepted.
            log.warning("breaking the stale commit lock %s held by %s", self.location(path), found)
            self._remove_lock(path, "breaking")
        return False

    def _remove_lock(self, path: str, action: str) -> None:
        """Delete the lock object `path` (one request: `delete` lists, and listings skip locks)."""
        key = self._key(path)
        self._request(f"{action} the commit lock {self.location(path)}",
                      lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def delete(self, prefix: str) -> None:
        """Delete the object `prefix` and every object under `prefix/`; missing is fine."""
        prefix = _prefix_path(prefix)
        keys = [self._key(path) for path in self._sizes(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            response = self._request(f"deleting {self.location(prefix)}", lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"could not delete {len(response['Errors'])} objects under {self.location(prefix)} "
                    f"in {self._where()}, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the object `prefix` and the objects under `prefix/` (one paged listing)."""
        root = f"{self.prefix}/" if self.prefix else ""
        list_prefix = self._key(prefix) if prefix else root
        self._ensure_bucket()

        def listing() -> dict[str, int]:
            sizes: dict[str, int] = {}
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=list_prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    key: str = obj["Key"]
                    rel = key[len(root):]
                    if key.endswith("/") or not key.startswith(root):  # folder markers some servers keep
                        continue
                    if rel.startswith(_COMMIT_LOCK_PREFIX):  # held locks are no part of the store's content
                        continue
                    # 'stage' must not match 'stage2/...': only the path itself or what is below it
                    if not prefix or rel == prefix or rel.startswith(prefix + "/"):
                        sizes[rel] = int(obj["Size"])
            return sizes

        return self._request(f"listing {self.uri}/{prefix}", listing)

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
        _write_bytes_atomic(folder / MANIFEST_NAME, _manifest_bytes(manifest), durable=False)
        _write_bytes_atomic(marker, manifest_sha.encode("ascii"), durable=False)
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


# --------------------------------------------------------------------------- factory


def open_store(settings: StoreSettings) -> ArtifactStore:
    """In: store settings. Out: an S3Store for s3://bucket/prefix, else a LocalStore.

    A local uri may be relative (resolved against the working directory) or file://...;
    its folder is created. No network call happens here: an S3 store checks its bucket
    on first use.
    """
    if settings.uri.startswith("s3://"):
        return S3Store(settings)
    root = settings.uri[len("file://"):] if settings.uri.startswith("file://") else settings.uri
    return LocalStore(Path(root))
