"""The store's error types, and the one mapping of boto3/botocore/S3 failures onto them.

`classify_s3_error` says what an exception from boto3, botocore or s3transfer means (not found,
access denied, endpoint unavailable, ...); `s3_store_error` turns it into the store's error with a
message naming the endpoint, the bucket and what to check. The S3 store and the S3 data source
(tasks/collect/sources.py) both go through these two, so a failure means the same everywhere. Messages never
hold a credential: they are built from error codes, statuses and botocore's own texts, which do not
contain one either.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


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
    throttling, after botocore's retries. Stage tasks that retry (I/O tasks) retry on this, not on others."""


# --------------------------------------------------------------------------- what an S3 failure means


class S3ErrorKind(StrEnum):
    """What an S3 failure means for whoever made the request."""

    NOT_FOUND = "not found"
    NO_BUCKET = "no such bucket"
    DENIED = "access denied"
    NO_CREDENTIALS = "no credentials"
    UNAVAILABLE = "unavailable"  # may pass: unreachable, timed out, 5xx, throttled
    OTHER = "other"


_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "TooManyRequests",
        "InternalError",
        "ServiceUnavailable",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "Forbidden",
        "403",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})

_ATTEMPTS_ATTRIBUTE = "_store_s3_attempts"
# Set on a botocore exception by the client's retry observer (s3client.py): how many times the request was sent.


@dataclass(frozen=True)
class S3Failure:
    """An S3 failure, classified: its kind, the S3 error code (or HTTP status, or exception name), the
    attempts botocore made (0 when unknown) and the botocore exception behind any wrapper."""

    kind: S3ErrorKind
    code: str
    attempts: int
    cause: BaseException


def s3_error_kind(code: str, status: int, exception: BaseException | None = None) -> S3ErrorKind:
    """In: an S3 error code ('' if none), an HTTP status (0 if none) and/or the exception botocore raised
    instead of a response. Out: its kind. The one place that decides what a failure means."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError, NoCredentialsError, PartialCredentialsError

    if isinstance(exception, (NoCredentialsError, PartialCredentialsError)):
        return S3ErrorKind.NO_CREDENTIALS
    if isinstance(exception, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return S3ErrorKind.UNAVAILABLE  # no (complete) answer: refused, timed out, dropped mid-stream
    if status >= 500 or status == 429 or code in _THROTTLE_CODES:
        return S3ErrorKind.UNAVAILABLE
    if code in _MISSING_BUCKET_CODES:
        return S3ErrorKind.NO_BUCKET
    if code in _NOT_FOUND_CODES or status == 404:  # GET says NoSuchKey, HEAD only says 404
        return S3ErrorKind.NOT_FOUND
    if code in _ACCESS_CODES or status == 403:
        return S3ErrorKind.DENIED
    return S3ErrorKind.OTHER


def classify_s3_error(exc: BaseException) -> S3Failure | None:
    """In: an exception raised by a boto3 client or transfer. Out: what it means, or None when it is no
    S3 failure at all (a local OSError, a bug), which callers let through unchanged.

    boto3's and s3transfer's wrappers (S3UploadFailedError, RetriesExceededError) are looked through to
    the botocore error behind them.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    cause = _botocore_cause(exc)
    if isinstance(cause, ClientError):
        response = cause.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        metadata = response.get("ResponseMetadata", {})
        status = int(metadata.get("HTTPStatusCode", 0) or 0)
        retries = metadata.get("RetryAttempts")
        attempts = retries + 1 if isinstance(retries, int) else attempts_made(cause)
        return S3Failure(s3_error_kind(code, status), code or str(status), attempts, cause)
    if isinstance(cause, BotoCoreError):
        return S3Failure(s3_error_kind("", 0, cause), type(cause).__name__, attempts_made(cause), cause)
    if _is_wrapper(exc):  # no botocore error behind it: judge it by its own type
        # s3transfer gives up re-reading a download whose body stream kept breaking: a network failure.
        transient = type(exc).__name__ == "RetriesExceededError"
        return S3Failure(S3ErrorKind.UNAVAILABLE if transient else S3ErrorKind.OTHER, type(exc).__name__, 0, exc)
    return None


def _is_wrapper(exc: BaseException) -> bool:
    """Whether `exc` is boto3's or s3transfer's wrapper around another failure."""
    from boto3.exceptions import Boto3Error

    return isinstance(exc, Boto3Error) or type(exc).__module__.startswith("s3transfer")


def _botocore_cause(exc: BaseException) -> BaseException:
    """The botocore exception behind boto3/s3transfer wrappers, else `exc` itself."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (ClientError, BotoCoreError)):
            return current
        if not _is_wrapper(current):
            break  # only wrappers are looked through: a StoreError raised from a ClientError stays a StoreError
        seen.add(id(current))
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__
    return exc


def note_attempts(exc: BaseException, attempts: int) -> None:
    """Record on a botocore exception how many times its request was sent (botocore does not say)."""
    with suppress(AttributeError):  # an exception type with __slots__: the count is only for messages
        setattr(exc, _ATTEMPTS_ATTRIBUTE, attempts)


def attempts_made(exc: BaseException) -> int:
    """How many times the request behind `exc` was sent, as noted by `note_attempts`; 0 when unknown."""
    return int(getattr(exc, _ATTEMPTS_ATTRIBUTE, 0) or 0)


# --------------------------------------------------------------------------- the store's errors


def s3_store_error(
    exc: BaseException,
    *,
    endpoint: str,
    bucket: str,
    action: str,
    credentials_from: str = "the store settings or the environment",
    missing: str | None = None,
) -> BaseException:
    """In: an exception from an S3 request, where it went and what was being done ('reading s3://b/k').
    Out: the store's error for it, to raise `from exc`:

    * ArtifactNotFound naming `missing` when the object is not there and the caller reads `missing`;
    * StoreUnavailable for an unreachable endpoint, a timeout, a 5xx or throttling (botocore has already
      retried it store.retry_attempts times in all);
    * StoreError for missing credentials, access denied, a missing bucket or any other S3 error.

    An exception that is no S3 failure is handed back unchanged.
    """
    failure = classify_s3_error(exc)
    if failure is None:
        return exc
    where = f"bucket {bucket!r} at {endpoint}"
    if failure.kind is S3ErrorKind.NOT_FOUND and missing is not None:
        return ArtifactNotFound(f"{missing} does not exist")
    if failure.kind is S3ErrorKind.NO_CREDENTIALS:
        return StoreError(
            f"no usable S3 credentials for {where} while {action}: set store.access_key_id "
            "and store.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if failure.kind is S3ErrorKind.UNAVAILABLE:
        return StoreUnavailable(f"{_unavailable_text(failure, endpoint, bucket, action)} {_gave_up(failure)}")
    if failure.kind is S3ErrorKind.DENIED:
        return StoreError(
            f"access denied ({failure.code}) for {where} while {action}: check the access key id "
            f"and secret key (taken from {credentials_from}) and that they may read and write this "
            "bucket"
        )
    if failure.kind is S3ErrorKind.NO_BUCKET:
        return StoreError(f"{where} does not exist (while {action}): create it or fix store.uri")
    return StoreError(f"S3 error {failure.code} from {where} while {action}: {exc}")


def _unavailable_text(failure: S3Failure, endpoint: str, bucket: str, action: str) -> str:
    """The first sentence of a StoreUnavailable: no answer at all, or a failing/overloaded server."""
    from botocore.exceptions import ClientError

    if isinstance(failure.cause, ClientError):
        return (
            f"the S3 endpoint {endpoint} answered {failure.code} for bucket {bucket!r} while {action}: "
            "the server is failing or overloaded."
        )
    return (
        f"cannot reach the S3 endpoint {endpoint} (bucket {bucket!r}) while {action}: {failure.cause}. "
        "Check store.endpoint_url (or AWS_ENDPOINT_URL) and that the server is running."
    )


def _gave_up(failure: S3Failure) -> str:
    """How many times botocore sent the request before giving up, for the message."""
    if failure.attempts:
        return f"Gave up after {failure.attempts} attempt(s) with botocore's backoff (store.retry_attempts)."
    return "Gave up after botocore's retries (store.retry_attempts)."
