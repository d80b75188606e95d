"""File readers of the collect stage: JSON Lines, JSON, CSV/TSV and Parquet, each optionally gzip-compressed.

Each reader yields `Record`s, (origin, column -> value), as a stream, so a source's `limit` stops reading a
corpus larger than memory. A broken file raises DataError naming the file, the line (or record) and what was
expected and found.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from itertools import chain, islice, zip_longest
from pathlib import Path
from typing import IO

from pipeline.config import JsonlSource
from pipeline.rows import DataError, parquet_file
from tasks.collect.schemas import KNOWN_COLUMNS, json_type

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
    """Records of a Parquet file, read one batch at a time (a .gz one is gunzipped to a temporary file first:
    Parquet is read by seeking, which a gzip stream cannot do, and holding the whole file in memory would make
    memory grow with it)."""
    import pyarrow as pa

    with ExitStack() as stack:
        try:
            source: Path | IO[bytes] = path
            if path.name.endswith(".gz"):
                source = stack.enter_context(tempfile.TemporaryFile(prefix="finetune-parquet-"))
                with _open_binary(path) as handle:
                    shutil.copyfileobj(handle, source, 1 << 20)
                source.seek(0)
            parquet = parquet_file(source)
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
