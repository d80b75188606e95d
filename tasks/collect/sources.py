"""Where the collect stage's records come from: local files and globs, s3:// objects, Hugging Face datasets.

S3 objects are read with the store's endpoint and credentials (`S3Data`); a Hugging Face source is a
`save_to_disk` folder or a hub id (refused with advice when the hub is offline).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from pipeline.config import HFSource, JsonlSource
from pipeline.rows import DataError
from pipeline.store import StoreSettings
from tasks.collect.readers import Record

_GLOB_CHARS = re.compile(r"[*?\[]")


def source_label(index: int) -> str:
    """How messages name the configured source at `index`: 'data.sources[<index>]'."""
    return f"data.sources[{index}]"


def local_files(pattern: str, index: int) -> list[Path]:
    """The files a local path or glob names, sorted; DataError when there are none."""
    expanded = os.path.expanduser(pattern)
    if _GLOB_CHARS.search(expanded):
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{source_label(index)}.path: expected files matching {pattern!r}, found none")
        return matches
    path = Path(expanded)
    if not path.is_file():
        raise DataError(
            f"{source_label(index)}.path: expected a file, found nothing at {pattern!r}"
            + (" (a folder: add a glob like /*.jsonl)" if path.is_dir() else "")
        )
    return [path]


class S3Data:
    """Reads data objects from S3 with the store's endpoint and credentials (never creating buckets).

    Error messages name the object, the endpoint and what to check; never a secret.
    """

    def __init__(self, settings: StoreSettings | None) -> None:
        """In: store settings (endpoint, region, credentials, retry_attempts; their uri is not used). None: boto3's
        own chain. The client is the store's (pipeline.store.make_s3_client): same retries, same redaction."""
        from pipeline.store import make_s3_client

        self.settings = settings or StoreSettings()
        self._client = make_s3_client(self.settings)
        self.endpoint = str(self._client.meta.endpoint_url)

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        """'s3://bucket/some/key' -> ('bucket', 'some/key')."""
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bucket, key

    def _error(self, uri: str, exc: Exception) -> Exception:
        """In: a failed S3 call on `uri`. Out: the error to raise, decided by the store's one mapping of S3 failures
        (pipeline.store.errors): the store's StoreUnavailable when the endpoint is unreachable, failing or throttling
        after botocore's retries (an I/O stage retries on it), else a DataError naming the object and what to check."""
        from pipeline.store.errors import S3ErrorKind, classify_s3_error, s3_store_error

        failure = classify_s3_error(exc)
        kind = failure.kind if failure is not None else S3ErrorKind.OTHER
        if kind is S3ErrorKind.UNAVAILABLE:
            return s3_store_error(exc, endpoint=self.endpoint, bucket=self.split(uri)[0], action=f"reading {uri}")
        if kind is S3ErrorKind.NO_CREDENTIALS:
            return DataError(
                f"{uri}: expected S3 credentials, found none: set store.access_key_id/secret_access_key "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if kind is S3ErrorKind.NOT_FOUND:
            return DataError(f"{uri}: expected an object, found none at {self.endpoint}")
        if kind is S3ErrorKind.NO_BUCKET:
            return DataError(f"{uri}: expected bucket {self.split(uri)[0]!r}, found no such bucket at {self.endpoint}")
        code = failure.code if failure is not None else type(exc).__name__
        if kind is S3ErrorKind.DENIED:
            return DataError(
                f"{uri}: access denied ({code}) at {self.endpoint}: check the access key id and secret "
                "key (store.access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
                "and that they may read this bucket"
            )
        return DataError(f"{uri}: S3 error {code} at {self.endpoint}")

    def keys(self, pattern: str, index: int) -> list[str]:
        """The s3:// URIs a URI or a URI with a glob in its key names, sorted; DataError when there are none."""
        bucket, key = self.split(pattern)
        if not _GLOB_CHARS.search(key):
            return [pattern]
        prefix = _GLOB_CHARS.split(key, maxsplit=1)[0]
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            found = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except Exception as exc:
            raise self._error(pattern, exc) from None
        matches = sorted(k for k in found if fnmatch.fnmatchcase(k, key) and not k.endswith("/"))
        if not matches:
            raise DataError(
                f"{source_label(index)}.path: expected objects matching {pattern!r}, found none at {self.endpoint}"
            )
        return [f"s3://{bucket}/{k}" for k in matches]

    def download(self, uri: str, folder: Path) -> Path:
        """Download one object into `folder`; out: the local file (same name as the key's last part)."""
        bucket, key = self.split(uri)
        local = folder / hashlib.sha256(uri.encode()).hexdigest()[:12] / key.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client.download_file(bucket, key, str(local))
        except Exception as exc:
            raise self._error(uri, exc) from None
        return local

    def fingerprint(self, uri: str) -> str:
        """ETag and size of an object (no download)."""
        bucket, key = self.split(uri)
        head = self._client.head_object(Bucket=bucket, Key=key)
        return f"{head.get('ETag', '')}:{head.get('ContentLength', '')}"


def source_files(source: JsonlSource, index: int, store: StoreSettings | None, workdir: Path) -> list[tuple[str, Path]]:
    """(display name, local path) of every file a source names; s3:// objects are downloaded into `workdir`."""
    files: list[tuple[str, Path]] = []
    s3: S3Data | None = None
    for pattern in source.paths:
        if pattern.startswith("s3://"):
            s3 = s3 or S3Data(store)
            files.extend((uri, s3.download(uri, workdir)) for uri in s3.keys(pattern, index))
        else:
            files.extend((str(path), path) for path in local_files(pattern, index))
    return files


def _hub_offline() -> bool:
    """Whether the environment tells Hugging Face libraries not to use the network."""
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hf_records(source: HFSource, index: int) -> tuple[str, list[str], Iterator[Record]]:
    """(display name, columns, records) of a Hugging Face dataset split: a save_to_disk folder or a hub id.

    Raises DataError naming the dataset: a folder that is not a saved dataset, a missing
    split (listing the ones there are), or a hub dataset that cannot be loaded (offline
    here: it says so and how to bring the data over).
    """
    local = Path(source.dataset).expanduser()
    if local.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(local))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"{local}: expected a folder written by save_to_disk, found {exc}") from None
        if isinstance(dataset, DatasetDict):
            if source.split not in dataset:
                raise DataError(f"{local}: expected split {source.split!r}, found splits {sorted(dataset)}")
            dataset = dataset[source.split]
        display = f"{local}[{source.split}]"
    elif source.dataset.startswith((".", "/", "~")) or source.dataset.count("/") > 1:
        raise DataError(
            f"{source_label(index)}.dataset: expected a save_to_disk folder, found no folder at {source.dataset!r}"
        )
    else:
        dataset = _load_hub_dataset(source)
        display = f"hub:{source.dataset}" + (f"/{source.subset}" if source.subset else "") + f"[{source.split}]"
    records = ((f"{display} row {i}", dict(record)) for i, record in enumerate(dataset, start=1))
    first = next(records, None)
    if first is None:
        raise DataError(f"{display}: expected rows, found an empty split")
    columns = list(getattr(dataset, "column_names", None) or first[1])
    return display, columns, chain([first], records)


def _load_hub_dataset(source: HFSource) -> Any:
    """The split of a hub dataset (streamed when asked); DataError when the hub cannot serve it."""
    from datasets import load_dataset

    try:
        return load_dataset(
            source.dataset, source.subset, split=source.split, revision=source.revision, streaming=source.streaming
        )
    except Exception as exc:  # the datasets library raises many types here; all mean "cannot load it"
        hint = (
            " HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the local cache: run "
            "`load_dataset(...).save_to_disk(folder)` where a hub is reachable, copy the folder here and set "
            "dataset: <folder>."
            if _hub_offline()
            else ""
        )
        raise DataError(
            f"hub dataset {source.dataset!r} (split {source.split!r}; no local folder of that name): "
            "expected a loadable dataset, "
            f"found {type(exc).__name__}: {str(exc)[:300]}.{hint}"
        ) from None
