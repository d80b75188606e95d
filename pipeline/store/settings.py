"""Store settings: where artifacts live (a folder or s3://bucket/prefix), how to reach S3, how often to retry.

In: values from the config tree (`store:` section), the CLI or Python. Out: a validated StoreSettings;
secrets are SecretStr and never shown in its repr or in validation errors.
"""

from __future__ import annotations

import logging
from functools import cache

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.store.keys import parse_s3_uri, redact_uri

log = logging.getLogger(__name__)

DEFAULT_RETRY_BACKOFF_SECONDS = 0.5
BACKOFF_DEPRECATION = (
    "store.retry_backoff_seconds is deprecated and has no effect: S3 requests are retried by botocore's standard "
    "retry mode, whose backoff cannot be configured (a random wait below 50 ms x 2^n after a failure, 1 s x 2^n "
    "after throttling, at most 20 s). Remove it from the config; raise store.retry_attempts to ride out longer "
    "outages."
)


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
        8,
        ge=1,
        le=20,
        description="Attempts per S3 request, the first included (botocore's total_max_attempts in its standard "
        "retry mode; the store has no retry loop of its own). botocore retries only an unreachable endpoint, a "
        "timeout, a server error (5xx) or throttling, after a random wait below 50 ms x 2^n (1 s x 2^n when "
        "throttled, at most 20 s); the default 8 rides out about 3 s of outage per request (6 s at most), then "
        "the store raises StoreUnavailable naming the endpoint and I/O stages retry in Prefect. Access denied or "
        "a missing key fails at once.",
    )
    retry_backoff_seconds: float = Field(
        DEFAULT_RETRY_BACKOFF_SECONDS,
        ge=0,
        le=60,
        deprecated=BACKOFF_DEPRECATION,
        description="Deprecated, ignored: botocore's standard retry mode chooses the waits between attempts "
        "(see retry_attempts). Still accepted so older configs load; a value other than the default logs a "
        "warning.",
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
            raise ValueError(
                f"expected an endpoint URL without credentials (set access_key_id and secret_access_key "
                f"instead), found {redact_uri(value)!r}"
            )
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

    @model_validator(mode="after")
    def _backoff_is_deprecated(self) -> StoreSettings:
        """Say once per process that a configured retry_backoff_seconds no longer does anything."""
        if self.__dict__.get("retry_backoff_seconds") != DEFAULT_RETRY_BACKOFF_SECONDS:  # no deprecation warning here
            _warn_backoff_is_deprecated()
        return self


@cache
def _warn_backoff_is_deprecated() -> None:
    """Log BACKOFF_DEPRECATION (once: settings are validated again in every task and process)."""
    log.warning(BACKOFF_DEPRECATION)
