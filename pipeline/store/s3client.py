"""The one way S3 clients are made: endpoint, region, credentials, timeouts and retries from StoreSettings.

In: StoreSettings. Out: a boto3 S3 client that

* retries in botocore only (standard retry mode, `store.retry_attempts` attempts per request in all);
  the store has no retry loop of its own, and stages retry in Prefect on top (I/O stages only);
* logs what botocore's retries did, since botocore itself says so only at DEBUG: each transient failure
  of an attempt that is not the last (WARNING, logger `pipeline.store.s3client`) and each request that
  succeeded only after retries, with botocore's `ResponseMetadata.RetryAttempts` (INFO); and notes on a
  final exception how many attempts were made, for the store's error message (`errors.attempts_made`);
* keeps its credentials out of every log record of boto3, botocore, s3transfer and urllib3.

Used by the S3 store (s3.py) and the S3 data source (tasks/collect/sources.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.store.artifacts import sha256_bytes
from pipeline.store.errors import S3ErrorKind, StoreError, note_attempts, s3_error_kind
from pipeline.store.settings import StoreSettings

log = logging.getLogger(__name__)

RETRY_MODE = "standard"
"""botocore's retry mode: retries connection errors, timeouts, 5xx and throttling, with exponential backoff
(full jitter, at most 20 s per wait) and a retry quota per client that stops retrying in a long outage.
'adaptive' would add client-side rate limiting, which suits one busy client, not a pipeline's few requests."""


def resolve_region(settings: StoreSettings) -> str:
    """In: store settings. Out: settings.region, else AWS_REGION, else AWS_DEFAULT_REGION, else 'us-east-1'."""
    return settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def default_cache_dir(uri: str) -> Path:
    """In: a store root. Out: ~/.cache/finetune-pipeline/store/<16 hex digits of sha256(uri)> (honours
    XDG_CACHE_HOME). One folder per store root, so two buckets never share downloads."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finetune-pipeline" / "store" / sha256_bytes(uri.encode("utf-8"))[:16]


def s3_client_config(settings: StoreSettings) -> Any:
    """In: store settings. Out: the botocore Config for S3 clients.

    Path-style addressing because SeaweedFS/MinIO/Ceph on a bare host:port have no per-bucket DNS
    names; a short connect timeout so a wrong endpoint fails fast; botocore's standard retries with
    `total_max_attempts` (attempts in all, the first included: what store.retry_attempts promises).
    """
    from botocore.config import Config

    return Config(
        retries={"mode": RETRY_MODE, "total_max_attempts": settings.retry_attempts},
        s3={"addressing_style": "path"},
        connect_timeout=5,
        read_timeout=60,
    )


def make_s3_client(settings: StoreSettings) -> Any:
    """In: store settings. Out: a boto3 S3 client with the retries and retry logging described above.

    Endpoint and credentials are passed only when set in the settings, so otherwise
    boto3's own chain applies (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws, roles).
    A session of its own (`new_boto3_session`: only botocore's static service models are shared), so
    credentials resolve afresh and no state is shared with other boto3 users in the process.
    Raises StoreError naming the endpoint when it is malformed.
    """
    kwargs: dict[str, Any] = {"region_name": resolve_region(settings), "config": s3_client_config(settings)}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        kwargs["aws_access_key_id"] = settings.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
    session = new_boto3_session()
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
    watch_retries(client, settings.retry_attempts)
    return client


_LOADER_LOCK = threading.Lock()


@functools.cache
def _shared_data_loader() -> Any:
    """botocore's loader of service models (JSON), made once per process and shared by every client's session."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def new_boto3_session() -> Any:
    """Out: a new boto3 Session that shares this process's loader of botocore's service models.

    Each store gets a session of its own, so credentials resolve afresh (from the settings or boto3's chain) and
    no state but static data is shared. A fresh session would otherwise parse botocore's S3 model and endpoint
    files again (about 0.15 CPU s; bench/s3_client.py), and a run opens its store a few dozen times.
    """
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    with _LOADER_LOCK:
        loader = _shared_data_loader()
        core.register_component("data_loader", loader)
        session = boto3.session.Session(botocore_session=core)
        # boto3 appends its own data folder to the loader's search path for every session: keep it there once.
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


# --------------------------------------------------------------------------- what botocore's retries did


class RetryWatch:
    """Observes one client's requests through botocore's events (it never changes what botocore decides).

    `attempt_done` runs after every attempt ('needs-retry', where botocore's retry handler decides);
    `call_done` after every request ('after-call', whose parsed response carries RetryAttempts).
    """

    def __init__(self, max_attempts: int) -> None:
        """In: the attempts per request the client was configured with."""
        self.max_attempts = max_attempts

    def attempt_done(
        self,
        attempts: int,
        response: Any = None,
        caught_exception: BaseException | None = None,
        operation: Any = None,
        request_dict: Any = None,
        **_: Any,
    ) -> None:
        """After attempt number `attempts`: note it on a raised exception; log a transient failure botocore retries."""
        try:
            if caught_exception is not None:
                note_attempts(caught_exception, attempts)
                kind, what = s3_error_kind("", 0, caught_exception), type(caught_exception).__name__
            elif response is not None and response[0].status_code >= 300:
                http, parsed = response
                code = str((parsed or {}).get("Error", {}).get("Code", "")) if isinstance(parsed, dict) else ""
                kind, what = s3_error_kind(code, http.status_code), code or str(http.status_code)
            else:
                return
            if kind is S3ErrorKind.UNAVAILABLE and attempts < self.max_attempts:
                log.warning(
                    "S3 %s %s: attempt %d of %d failed (%s); botocore retries it after its backoff "
                    "(unless its retry quota is spent)",
                    _name(operation),
                    _url(request_dict),
                    attempts,
                    self.max_attempts,
                    what,
                )
        except Exception:  # an observer must never break the request it watches
            log.debug("could not log an S3 retry", exc_info=True)

    def call_done(self, http_response: Any = None, parsed: Any = None, model: Any = None, **_: Any) -> None:
        """After a request: log at INFO when it succeeded only thanks to botocore's retries."""
        try:
            retries = (parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
            if retries and http_response is not None and http_response.status_code < 300:
                log.info(
                    "S3 %s succeeded after %d botocore retr%s (ResponseMetadata.RetryAttempts)",
                    _name(model),
                    retries,
                    "y" if retries == 1 else "ies",
                )
        except Exception:  # an observer must never break the request it watches
            log.debug("could not log an S3 retry count", exc_info=True)


def watch_retries(client: Any, max_attempts: int) -> RetryWatch:
    """Register a RetryWatch on `client`'s events; out: the watch."""
    watch = RetryWatch(max_attempts)
    client.meta.events.register("needs-retry.s3", watch.attempt_done)
    client.meta.events.register("after-call.s3", watch.call_done)
    return watch


def _name(operation: Any) -> str:
    """The operation's name ('PutObject'), or '?'."""
    return str(getattr(operation, "name", "?"))


def _url(request_dict: Any) -> str:
    """The request's URL without its query (endpoint, bucket and key; no credential is ever in it)."""
    url = request_dict.get("url", "") if isinstance(request_dict, dict) else ""
    return str(url).split("?", 1)[0]


# --------------------------------------------------------------------------- credentials out of logs


class _RedactCredentials(logging.Filter):
    """Masks the credentials the store uses in log records of boto3, botocore, s3transfer and urllib3.

    botocore's DEBUG records dump request headers (`Authorization: ... Credential=<key id>/...`,
    `X-Amz-Security-Token: <token>`): whoever turns DEBUG on must still get no credential in a log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message with every known credential replaced by '***'; keep the record."""
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
