"""Stage 1, collect: gather rows from the configured sources, normalise them, drop bad ones with a reason.

In: `DataConfig` (a list of sources) and the store settings (whose endpoint and
credentials also read `s3://` data). Out: an artifact with

* `rows.jsonl`, one normalised row per line: `{"id", "question", "answer", "source"}`,
  plus `input` (Alpaca input, when not empty), `messages` (the turns before the answer,
  for chat rows) and `role: "test"` (rows of a fixed evaluation source). Rows of the
  `text` schema are `{"id", "text", "source"}`. `id` is a hash of source and content,
  stable across reruns.
* `report.json`: rows read and kept, per source and in total, and every dropped row
  counted by reason with a few examples naming file, line and column.

Sources: files (JSON Lines, JSON, CSV/TSV, Parquet; one, several or a glob; `.gz`
too; local or `s3://`), Hugging Face datasets (a `save_to_disk` folder or a hub id),
and `docs` (an installed package's documentation turned into question/answer pairs,
plus off-topic refusals, near-domain refusals (questions about other packages) and
optional general-knowledge replay). Files are read as
streams, so `limit` takes the first rows of a corpus larger than memory.

Each file's schema is detected from its columns (`SCHEMAS`) unless the source maps
columns. Broken files fail at once (malformed JSON, undecodable bytes, no matching
schema, an empty file): the DataError names the file, the line, the column, what was
expected and what was found. Bad rows are dropped and counted (empty, non_string,
missing_field, bad_messages, too_long, duplicate, near_duplicate); the run fails when
more than `data.max_bad_fraction` of the rows read are dropped or fewer than
`data.min_rows` remain.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import gzip
import hashlib
import inspect
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice, zip_longest
from pathlib import Path
from typing import Any

from pipeline.assets import arc_train_questions, general_text_passages
from pipeline.config import DataConfig, DocsSource, HFSource, JsonlSource, StoreConfig
from pipeline.docs_source import (
    NEAR_DOMAIN_TRAIN_PACKAGES,
    QUESTION_PHRASINGS,
    REFUSAL,
    documented_objects,
    package_questions,
)
from pipeline.rows import (
    DataError,
    DropLog,
    check_drop_budget,
    make_row,
    make_text_row,
    question_key,
    write_jsonl,
)
from pipeline.stage import stage_task
from pipeline.store import StoreSettings

_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Schema:
    """A known shape of records: the columns it needs and the optional input column it may use."""

    name: str
    kind: str  # 'qa', 'text' or 'messages'
    question: str = ""
    answer: str = ""
    inputs: tuple[str, ...] = ()
    text: str = ""
    messages: str = ""

    def required(self) -> tuple[str, ...]:
        """Columns a record must have."""
        return tuple(c for c in (self.question, self.answer, self.text, self.messages) if c)


SCHEMAS: tuple[Schema, ...] = (
    Schema("messages", "messages", messages="messages"),
    Schema("question/answer", "qa", question="question", answer="answer"),
    Schema("alpaca (instruction + input + output)", "qa", question="instruction", answer="output", inputs=("input",)),
    Schema("instruction/response", "qa", question="instruction", answer="response", inputs=("input", "context")),
    Schema("prompt/completion", "qa", question="prompt", answer="completion"),
    Schema("input/output", "qa", question="input", answer="output"),
    Schema("text", "text", text="text"),
)
"""Detection order: the first schema whose columns are all present wins (names match case-insensitively)."""

KNOWN_COLUMNS = frozenset(c for s in SCHEMAS for c in (s.question, s.answer, s.text, s.messages, *s.inputs) if c)

ACCEPTED_SCHEMAS = (
    "question+answer; instruction+output (+input, Alpaca); instruction+response (+input or context); "
    "prompt+completion; input+output; text; messages"
)
MAPPING_HINT = "or map your columns on the source with question_key/answer_key (+input_key), text_key or messages_key"


def explicit_schema(source: JsonlSource | HFSource) -> Schema | None:
    """The schema a source's column mapping spells out, or None when the schema is to be detected."""
    if source.text_key:
        return Schema(f"text (text_key={source.text_key})", "text", text=source.text_key)
    if source.messages_key:
        return Schema(f"messages (messages_key={source.messages_key})", "messages", messages=source.messages_key)
    if source.question_key or source.answer_key or source.input_key:
        question, answer = source.question_key or "question", source.answer_key or "answer"
        inputs = (source.input_key,) if source.input_key else ()
        return Schema(
            f"question_key={question}, answer_key={answer}", "qa", question=question, answer=answer, inputs=inputs
        )
    return None


def detect_schema(columns: Iterable[str], where: str) -> Schema:
    """The first schema of `SCHEMAS` whose columns are all among `columns`, bound to the columns' real names.

    Raises DataError naming `where`, the columns found and the accepted schemas.
    """
    columns = list(columns)
    by_lower = {str(c).strip().lower(): str(c) for c in columns}
    for schema in SCHEMAS:
        if all(c in by_lower for c in schema.required()):
            return Schema(
                schema.name,
                schema.kind,
                question=by_lower.get(schema.question, ""),
                answer=by_lower.get(schema.answer, ""),
                inputs=tuple(by_lower[c] for c in schema.inputs if c in by_lower),
                text=by_lower.get(schema.text, ""),
                messages=by_lower.get(schema.messages, ""),
            )
    raise DataError(
        f"{where}: expected the columns of an accepted schema ({ACCEPTED_SCHEMAS}), "
        f"found {sorted(map(str, columns))}; {MAPPING_HINT}"
    )


def check_columns(schema: Schema, columns: Iterable[str], where: str) -> None:
    """Raise DataError unless every column an explicit mapping names is among `columns`."""
    found = list(columns)
    missing = [c for c in schema.required() if c not in found]
    if missing:
        raise DataError(
            f"{where}: expected column(s) {', '.join(map(repr, missing))} ({schema.name}), "
            f"found {sorted(map(str, found))}"
        )


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for 'expected text, found object' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def _text_field(
    record: dict, column: str, origin: str, max_chars: int, *, optional: bool = False
) -> str | tuple[str, str]:
    """The stripped text of one column, or a (reason, detail) pair saying why the row is dropped."""
    if column not in record:
        if optional:
            return ""
        return (
            "missing_field",
            f"{origin}: column {column!r}: expected text, found no such column (columns {sorted(record)})",
        )
    value = record[column]
    if value is None:  # JSON null, or a CSV row with fewer cells than the header
        return "" if optional else ("missing_field", f"{origin}: column {column!r}: expected text, found no value")
    if not isinstance(value, str):
        return "non_string", f"{origin}: column {column!r}: expected text, found {json_type(value)}"
    value = value.replace("\r\n", "\n").strip()  # Windows line ends inside a field (CSV) read as plain newlines
    if not value and not optional:
        return "empty", f"{origin}: column {column!r}: expected text, found an empty or whitespace-only value"
    if len(value) > max_chars:
        return "too_long", (
            f"{origin}: column {column!r}: expected at most data.max_chars={max_chars} characters, found {len(value):,}"
        )
    return value


def _chat_turns(value: Any, origin: str, column: str, max_chars: int) -> list[dict] | tuple[str, str]:
    """Validated chat turns [{role, content}, ...] ending with a non-empty assistant answer, or (reason, detail)."""
    where = f"{origin}: column {column!r}"
    if not isinstance(value, list) or not value:
        return "bad_messages", f"{where}: expected a list of {{role, content}} turns, found {json_type(value)}"
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            return "bad_messages", (
                f"{where}: turn {number}: expected {{role: system|user|assistant, content}}, found {turn!r:.80}"
            )
        content = turn.get("content")
        if not isinstance(content, str):
            return "non_string", f"{where}: turn {number}: content: expected text, found {json_type(content)}"
        if len(content) > max_chars:
            return "too_long", (
                f"{where}: turn {number}: expected at most data.max_chars={max_chars} characters, "
                f"found {len(content):,}"
            )
        turns.append({"role": turn["role"], "content": content.strip()})
    if turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns[:-1]):
        roles = [t["role"] for t in turns]
        return "bad_messages", f"{where}: expected user turn(s) then a final assistant answer, found roles {roles}"
    if not turns[-1]["content"] or not [t for t in turns if t["role"] == "user"][-1]["content"]:
        return "empty", f"{where}: expected text in the last question and the answer, found an empty turn"
    return turns


def normalise_record(
    record: dict, schema: Schema, source: str, origin: str, *, max_chars: int, role: str
) -> dict | tuple[str, str]:
    """One source record as a normalised row, or (reason, detail) when the row must be dropped.

    In: the record (column -> value), its file's schema, the source name for the row id,
    where it came from ('file:line') for messages, the character cap and the row's role.
    """
    if schema.kind == "text":
        text = _text_field(record, schema.text, origin, max_chars)
        return text if isinstance(text, tuple) else make_text_row(source, text, role=role)
    if schema.kind == "messages":
        if schema.messages not in record:
            return "missing_field", f"{origin}: column {schema.messages!r}: expected chat turns, found no such column"
        turns = _chat_turns(record[schema.messages], origin, schema.messages, max_chars)
        if isinstance(turns, tuple):
            return turns
        question = [t for t in turns if t["role"] == "user"][-1]["content"]
        return make_row(source, question, turns[-1]["content"], messages=turns[:-1], role=role)
    question = _text_field(record, schema.question, origin, max_chars)
    if isinstance(question, tuple):
        return question
    answer = _text_field(record, schema.answer, origin, max_chars)
    if isinstance(answer, tuple):
        return answer
    extra = ""
    for column in schema.inputs:
        extra = _text_field(record, column, origin, max_chars, optional=True)
        if isinstance(extra, tuple):
            return extra
        if extra:
            break
    return make_row(source, question, answer, input=extra, role=role)


# --------------------------------------------------------------------------- file readers

Record = tuple[str, dict]
"""(origin, record): where the record came from ('file:line') and its column -> value mapping."""


def _open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, gunzipped on the fly for a .gz name."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def text_lines(path: Path, display: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded one line at a time so a bad byte is named with its line.

    A UTF-8 byte-order mark at the start is skipped. Raises DataError for undecodable
    bytes (naming file, line, byte and position) and for a broken gzip stream.
    """
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield number, raw.decode(encoding)
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{display}:{number}: expected {encoding} text, found byte 0x{raw[exc.start]:02x} at byte "
                        f"{exc.start + 1} of the line; set encoding on the source (e.g. latin-1) "
                        "if the file uses another"
                    ) from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{display}: expected a gzip-compressed file, found {exc}") from None


def read_jsonl_records(path: Path, display: str, encoding: str = "utf-8") -> Iterator[Record]:
    """Records of a JSON Lines file (blank lines skipped); DataError on the first malformed line."""
    for number, line in text_lines(path, display, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{display}:{number}: expected a JSON object, found malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{display}:{number}: expected a JSON object per line, found {json_type(record)}")
        yield f"{display}:{number}", record


def read_json_records(path: Path, display: str, encoding: str = "utf-8") -> Iterator[Record]:
    """Records of a JSON file: an array of objects, or an object holding one such array (JSON Lines also accepted).

    A .json file is read whole; use JSON Lines for corpora that do not fit in memory.
    """
    try:
        with _open_binary(path) as handle:
            data = handle.read()
    except (gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{display}: expected a gzip-compressed file, found {exc}") from None
    try:
        text = data.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{display}:{line}: expected {encoding} text, found byte 0x{data[exc.start]:02x}; "
            "set encoding on the source if the file uses another"
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: it is JSON Lines under a .json name
            yield from read_jsonl_records(path, display, encoding)
            return
        raise DataError(
            f"{display}:{exc.lineno}: expected JSON, found malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if isinstance(document, dict):
        # {"data": [...]} holds the records; {"messages": [...]} or {"question": ...} is one record.
        key, value = next(iter(document.items())) if len(document) == 1 else (None, None)
        holder = isinstance(value, list) and str(key).strip().lower() not in KNOWN_COLUMNS
        document = value if holder else [document]
    if not isinstance(document, list):
        raise DataError(f"{display}: expected an array of objects, found {json_type(document)}")
    for index, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{display}: record {index}: expected a JSON object, found {json_type(record)}")
        yield f"{display} record {index}", record


def _csv_field_limit() -> None:
    """Let csv read fields of any size (its default 128 KiB limit rejects long documents with a cryptic error)."""
    csv.field_size_limit(2**31 - 1)


def sniff_delimiter(sample: str, name: str) -> str:
    """The delimiter of a CSV sample among ',', ';', tab and '|' (tab for .tsv; ',' when undecidable)."""
    if name.removesuffix(".gz").endswith(".tsv"):
        return "\t"
    try:
        return csv.Sniffer().sniff(sample[:65536], delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def read_csv_records(
    path: Path, display: str, encoding: str = "utf-8", delimiter: str | None = None
) -> Iterator[Record]:
    """Records of a CSV/TSV file with a header row; the delimiter is detected unless given.

    Quoted fields may span lines; the origin names the line a record ends on. Raises
    DataError for a file with no header or only a header.
    """
    _csv_field_limit()
    lines = (line for _, line in text_lines(path, display, encoding))
    head = list(islice(lines, 20))
    if not "".join(head).strip():
        raise DataError(f"{display}: expected a header row and data rows, found an empty file")
    reader = csv.reader(chain(head, lines), delimiter=delimiter or sniff_delimiter("".join(head), path.name))
    try:
        header = [column.strip() for column in next(reader)]
        rows = 0
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            rows += 1
            # Missing cells become None (reported as missing); cells beyond the header are ignored.
            record = {column: cell for column, cell in zip_longest(header, cells) if column is not None}
            yield f"{display}:{reader.line_num}", record
    except csv.Error as exc:
        raise DataError(f"{display}:{reader.line_num}: expected CSV, found {exc}") from None
    if rows == 0:
        raise DataError(f"{display}: expected data rows after the header {header}, found none")


def read_parquet_records(path: Path, display: str, encoding: str = "utf-8") -> Iterator[Record]:
    """Records of a Parquet file, read one row group batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.name.endswith(".gz"):
            with _open_binary(path) as handle:
                parquet = pq.ParquetFile(pa.BufferReader(handle.read()))
        else:
            parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{display}: expected a Parquet file, found {exc}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield f"{display} row {index}", record


FORMATS: dict[str, Callable[..., Iterator[Record]]] = {
    "jsonl": read_jsonl_records,
    "json": read_json_records,
    "csv": read_csv_records,
    "parquet": read_parquet_records,
}
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


def file_format(name: str, kind: str) -> str:
    """The reader for a file: `kind` when it names a format, else from the extension (a trailing .gz ignored)."""
    if kind in FORMATS:
        return kind
    suffix = Path(name.removesuffix(".gz")).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(
            f"{name}: expected a file ending in {', '.join(_EXTENSIONS)} (optionally .gz), "
            f"found {suffix or 'no extension'!r}; or set kind: jsonl, json, csv or parquet on the source"
        )
    return _EXTENSIONS[suffix]


def read_file_records(path: Path, display: str, source: JsonlSource) -> tuple[list[str], Iterator[Record]]:
    """(columns, records) of one file: the columns come from the first record (or the header).

    Raises DataError for an empty file, and for a file with columns but no rows.
    """
    fmt = file_format(display, source.kind)
    if fmt == "csv":
        records = read_csv_records(path, display, source.encoding, source.delimiter)
    else:
        records = FORMATS[fmt](path, display, source.encoding)
    first = next(records, None)
    if first is None:
        raise DataError(f"{display}: expected rows, found an empty file")
    return list(first[1]), chain([first], records)


# --------------------------------------------------------------------------- locating files (local and S3)


def _source_label(index: int) -> str:
    return f"data.sources[{index}]"


def local_files(pattern: str, index: int) -> list[Path]:
    """The files a local path or glob names, sorted; DataError when there are none."""
    expanded = os.path.expanduser(pattern)
    if _GLOB_CHARS.search(expanded):
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{_source_label(index)}.path: expected files matching {pattern!r}, found none")
        return matches
    path = Path(expanded)
    if not path.is_file():
        raise DataError(
            f"{_source_label(index)}.path: expected a file, found nothing at {pattern!r}"
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
                f"{_source_label(index)}.path: expected objects matching {pattern!r}, found none at {self.endpoint}"
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


# --------------------------------------------------------------------------- Hugging Face datasets


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
            f"{_source_label(index)}.dataset: expected a save_to_disk folder, found no folder at {source.dataset!r}"
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


# --------------------------------------------------------------------------- docs source


def clean_docstring_markup(text: str) -> str:
    """Plain sentences from reStructuredText: drop roles and emphasis marks, join lines."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)  # :func:`x` -> x
    text = re.sub(r"``([^`]+)``", r"`\1`", text)  # ``x`` -> `x`
    text = re.sub(r"(?<![\w*])\*{1,2}([^*\n]+)\*{1,2}", r"\1", text)  # *x* -> x
    return re.sub(r"\s+", " ", text).strip()


def summary_paragraph(doc: str, max_words: int) -> str:
    """The first paragraph of a docstring, cut at a sentence end near `max_words` words."""
    first = clean_docstring_markup(inspect.cleandoc(doc).split("\n\n")[0])
    words = first.split()
    if len(words) <= max_words:
        return first
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind(".)"))
    return cut[: end + 1] if end > len(cut) // 3 else cut + "..."


def docs_rows(source: DocsSource, offtopic_questions: Iterable[str]) -> list[dict[str, Any]]:
    """Question/answer rows for a package's documentation plus refusals for off-topic questions."""
    rows = []
    objects = list(documented_objects(source.package))[: source.max_objects]
    for name, kind, doc in objects:
        answer = summary_paragraph(doc, source.max_answer_words)
        if len(answer.split()) < 4:
            continue
        fields = {"package": source.package, "name": name, "qualname": f"{source.package}.{name}", "kind": kind}
        for phrasing in QUESTION_PHRASINGS[: source.phrasings]:
            rows.append(make_row(f"docs:{source.package}", phrasing.format(**fields), answer, role=source.role))
    refusal = REFUSAL.format(package=source.package)
    for question in list(offtopic_questions)[: source.offtopic]:
        rows.append(make_row(f"offtopic:{source.package}", question, refusal, role=source.role))
    return rows


def near_domain_rows(source: DocsSource) -> list[dict[str, Any]]:
    """`source.near_domain` refusal rows: questions about NEAR_DOMAIN_TRAIN_PACKAGES answered with REFUSAL.

    Asked in the documentation rows' own phrasings (QUESTION_PHRASINGS[:phrasings]), so only the
    package name tells a question to answer from one to decline.
    """
    if not source.near_domain:
        return []
    refusal = REFUSAL.format(package=source.package)
    questions = package_questions(
        NEAR_DOMAIN_TRAIN_PACKAGES,
        QUESTION_PHRASINGS[: source.phrasings],
        f"near_domain:{source.package}",
        skip=[source.package],
    )
    return [
        make_row(f"near_domain:{source.package}", q["question"], refusal, role=source.role)
        for q in islice(questions, source.near_domain)
    ]


def replay_rows(passages: Iterable[str], role: str = "train") -> list[dict[str, Any]]:
    """General-text rows against forgetting: each passage a plain-text row (loss on every token, no prompt).

    Replay must not teach to the test: it is never the forgetting gate's benchmark (ARC), and never
    question/answer pairs, which would teach the model to answer the off-topic questions it should decline.
    """
    return [make_text_row("replay:wikipedia", passage, role=role) for passage in passages]


def read_docs_source(source: DocsSource) -> list[dict[str, Any]]:
    """Rows of a docs source: documentation pairs, off-topic and near-domain refusals, then replay; `limit` at most."""
    arc = arc_train_questions() if source.offtopic else []
    rows = docs_rows(source, [q["question"] for q in arc])
    rows += near_domain_rows(source)
    rows += replay_rows(general_text_passages()[: source.replay], role=source.role) if source.replay else []
    return rows[: source.limit]


# --------------------------------------------------------------------------- one source


@dataclass
class SourceResult:
    """What one source gave: its kept rows, how many records were read, and the drops."""

    index: int
    label: str
    role: str
    weight: float | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    schema: str = ""
    files: list[str] = field(default_factory=list)
    drops: DropLog = field(default_factory=DropLog)

    def describe(self) -> dict[str, Any]:
        """The source's line in the report."""
        return {
            "source": self.label,
            "role": self.role,
            "schema": self.schema,
            "files": self.files[:20],
            "files_count": len(self.files),
            "rows_read": self.read,
            "rows_kept": len(self.rows),
            "dropped": dict(self.drops.counts),
        }


def _records_to_rows(
    result: SourceResult, records: Iterable[Record], schema: Schema, name: str, limit: int | None, max_chars: int
) -> None:
    """Normalise records into `result` until `limit` records of the source have been read."""
    for origin, record in records:
        if limit is not None and result.read >= limit:
            return
        result.read += 1
        row = normalise_record(record, schema, name, origin, max_chars=max_chars, role=result.role)
        if isinstance(row, tuple):
            result.drops.add(*row)
        else:
            result.rows.append(row)


def _record_inputs(
    source: JsonlSource | HFSource, index: int, store: StoreSettings | None, workdir: Path
) -> Iterator[tuple[str, str, list[str], Iterator[Record]]]:
    """(display name, row source name, columns, records) of each file (or the dataset split) of a source, lazily."""
    if isinstance(source, HFSource):
        display, columns, records = hf_records(source, index)
        yield display, f"hf:{source.dataset.rstrip('/').rsplit('/', 1)[-1]}[{source.split}]", columns, records
        return
    for display, path in source_files(source, index, store, workdir):
        columns, records = read_file_records(path, display, source)
        yield display, f"{file_format(display, source.kind)}:{path.name}", columns, records


def read_record_source(
    source: JsonlSource | HFSource, index: int, config: DataConfig, store: StoreSettings | None, workdir: Path
) -> SourceResult:
    """Rows of a file or Hugging Face source: one schema for all its files, records normalised, drops counted.

    Files are read in name order until the source's `limit` of records is reached.
    """
    result = SourceResult(index, _source_label(index), source.role, source.weight)
    explicit = explicit_schema(source)
    schemas: dict[str, str] = {}
    for display, name, columns, records in _record_inputs(source, index, store, workdir):
        if explicit is not None:
            check_columns(explicit, columns, display)
        schema = explicit or detect_schema(columns, display)
        schemas[display] = schema.name
        if len(set(schemas.values())) > 1:
            found = ", ".join(f"{d} is {s}" for d, s in schemas.items())
            raise DataError(
                f"{_source_label(index)}: expected every file of a source to have the same schema, "
                f"found {found}; put files of different schemas in separate sources"
            )
        result.schema = schema.name
        result.label = name if not result.files else f"{_source_label(index)} ({len(result.files) + 1} files)"
        result.files.append(display)
        _records_to_rows(result, records, schema, name, source.limit, config.max_chars)
        if source.limit is not None and result.read >= source.limit:
            break
    return result


def read_source(
    source: Any, index: int, config: DataConfig, store: StoreSettings | None, workdir: Path
) -> SourceResult:
    """Rows of any configured source (see `read_record_source` and `read_docs_source`)."""
    if isinstance(source, DocsSource):
        rows = read_docs_source(source)
        return SourceResult(
            index, f"docs:{source.package}", source.role, source.weight, rows=rows, read=len(rows), schema="docs"
        )
    return read_record_source(source, index, config, store, workdir)


# --------------------------------------------------------------------------- duplicates and mixing


def _content_key(row: dict) -> str:
    """What makes two rows exact duplicates: their content and role, whatever their source."""
    content = {k: v for k, v in row.items() if k not in ("id", "source")}
    return hashlib.blake2b(json.dumps(content, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def drop_duplicates(results: list[SourceResult], mode: str) -> None:
    """Drop exact duplicates (and with mode 'near', near-duplicate questions) in place, keeping the first.

    Train and test rows are compared among themselves; a question in both is leakage,
    which split removes and reports.
    """
    seen_exact: set[str] = set()
    seen_near: set[bytes] = set()
    for result in results:
        kept = []
        for row in result.rows:
            exact = _content_key(row)
            near = hashlib.blake2b(
                f"{row.get('role', 'train')}\x1f{question_key(row)}".encode(), digest_size=16
            ).digest()
            if exact in seen_exact:
                result.drops.add("duplicate", f"{result.label}: row {row['id']} repeats an earlier row")
            elif mode == "near" and near in seen_near:
                shown = row.get("question", row.get("text", ""))[:60]
                result.drops.add(
                    "near_duplicate", f"{result.label}: question {shown!r} repeats an earlier one after normalisation"
                )
            else:
                kept.append(row)
            seen_exact.add(exact)
            seen_near.add(near)
        result.rows = kept


def mix_sources(results: list[SourceResult], config: DataConfig) -> tuple[list[dict[str, Any]], int]:
    """All rows in source order, train sources drawn to their weights and to data.max_rows; out: (rows, not drawn).

    Weighted: each train source gives weight/total of the mix, as large as the scarcest
    source allows (rows are never repeated). The draw is seeded by data.seed, and the
    drawn rows keep their order in the source, so the same config gives the same rows.
    """
    train = [r for r in results if r.role == "train"]
    available = sum(len(r.rows) for r in train)
    if all(r.weight is not None for r in train):
        total = sum(r.weight or 0 for r in train)
        size = min(len(r.rows) * total / (r.weight or 1) for r in train)
        size = min(size, config.max_rows or size)
        wanted = {r.index: int(size * (r.weight or 0) / total) for r in train}
    elif config.max_rows and available > config.max_rows:
        wanted = {r.index: int(len(r.rows) * config.max_rows / available) for r in train}
    else:
        wanted = {r.index: len(r.rows) for r in train}
    rows: list[dict[str, Any]] = []
    for result in results:
        if result.role == "train" and wanted[result.index] < len(result.rows):
            draw = random.Random(f"{config.seed}:{result.index}").sample(range(len(result.rows)), wanted[result.index])
            result.rows = [result.rows[i] for i in sorted(draw)]
        rows.extend(result.rows)
    return rows, available - sum(len(r.rows) for r in train)


# --------------------------------------------------------------------------- the core


def collect_data(config: DataConfig, store: StoreSettings | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configured source's rows, normalised, checked, de-duplicated and mixed; plus the collect report.

    In: the data config; the store settings, whose endpoint and credentials read s3://
    data. Out: (rows, report). Raises DataError for unusable input, for more than
    `max_bad_fraction` of the rows read dropped, and for fewer than `min_rows` left.
    """
    with tempfile.TemporaryDirectory(prefix="finetune-collect-") as workdir:
        results = [read_source(source, i, config, store, Path(workdir)) for i, source in enumerate(config.sources)]
    drop_duplicates(results, config.dedupe)
    rows, not_drawn = mix_sources(results, config)
    drops = DropLog()
    for result in results:
        drops.merge(result.drops)
    read = sum(r.read for r in results)
    report = {
        "rows_read": read,
        "rows": len(rows),
        "dropped": dict(drops.counts.most_common()),
        "examples": drops.examples,
        "not_drawn": not_drawn,
        "sources": [r.describe() for r in results],
    }
    check_rows(report, drops, config)
    return rows, report


def check_rows(report: dict[str, Any], drops: DropLog, config: DataConfig) -> None:
    """Raise DataError when too large a share of the rows read was dropped, or too few rows remain."""
    check_drop_budget(
        report["rows_read"],
        sum(drops.counts.values()),
        report["rows"],
        drops.summary(),
        config,
        after="",
        advice="Fix the data (or map its columns), or raise data.max_bad_fraction.",
    )


def collect_rows(config: DataConfig, store: StoreSettings | None = None) -> list[dict[str, Any]]:
    """The rows of `collect_data`, without the report."""
    return collect_data(config, store)[0]


# --------------------------------------------------------------------------- fingerprints


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(source: Any, index: int, store: StoreSettings | None) -> str:
    """What identifies a source's current content (file hashes, object ETags, a saved dataset's fingerprint)."""
    if isinstance(source, DocsSource):
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        dists = packages_distributions().get(source.package.split(".")[0], [])
        try:
            return f"{source.package}=={version(dists[0])}" if dists else source.package
        except PackageNotFoundError:
            return source.package
    if isinstance(source, HFSource):
        local = Path(source.dataset).expanduser()
        if local.is_dir():  # save_to_disk writes a content fingerprint into every state.json
            states = sorted(local.rglob("state.json"))
            return hashlib.sha256(b"".join(p.read_bytes() for p in states)).hexdigest()
        return f"hub:{source.dataset}@{source.revision or 'unpinned'}"
    parts = []
    for pattern in source.paths:
        if pattern.startswith("s3://"):
            s3 = S3Data(store)
            parts += [f"{uri}={s3.fingerprint(uri)}" for uri in s3.keys(pattern, index)]
        else:
            parts += [f"{path}={_sha256_file(path)}" for path in local_files(pattern, index)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def source_fingerprints(config: DataConfig, store: StoreSettings | None = None) -> dict[str, str]:
    """Per source (by index), a fingerprint of its current content, for the collect stage's key.

    The config names files; their content may change under the same name. Passing these
    to `collect` makes an edited file rerun collect (and what follows) instead of coming
    back Cached. Never raises: a source that cannot be read now gets 'unavailable: ...',
    and collect itself reports the problem.
    """
    prints = {}
    for index, source in enumerate(config.sources):
        try:
            prints[str(index)] = _fingerprint(source, index, store)
        except Exception as exc:  # collect raises the precise error; a key only needs to differ
            prints[str(index)] = f"unavailable: {type(exc).__name__}"
    return prints


# --------------------------------------------------------------------------- the task


@stage_task("collect", retries=2)  # retried on transient I/O only, never on a DataError
def collect(
    config: DataConfig, store: StoreConfig, out: Path, fingerprints: dict[str, str] | None = None
) -> dict[str, Any]:
    """Collect rows from the configured sources into `out/rows.jsonl` and `out/report.json`; returns the figures.

    `store` reads s3:// data with the store's endpoint and credentials. `fingerprints` (from
    `source_fingerprints`) only takes part in the content key.
    """
    rows, report = collect_data(config, store)
    write_jsonl(out / "rows.jsonl", rows)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sources = sorted({row["source"] for row in rows})
    return {"rows": len(rows), "rows_read": report["rows_read"], "dropped": report["dropped"], "sources": sources}
