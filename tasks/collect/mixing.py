"""From sources to the collected rows: one source read up to its limit, duplicates dropped, sources mixed.

`read_source` reads a configured source into a `SourceResult` (rows kept, records read, drops counted);
`drop_duplicates` drops exact and near duplicates across sources; `mix_sources` draws the train sources to their
weights and to `data.max_rows`, seeded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, DocsSource, HFSource, JsonlSource
from pipeline.rows import DataError, DropLog, question_key
from pipeline.store import StoreSettings
from tasks.collect.docs import read_docs_source
from tasks.collect.readers import Record, file_format, read_file_records
from tasks.collect.schemas import Schema, check_columns, detect_schema, explicit_schema, normalise_record
from tasks.collect.sources import hf_records, source_files, source_label


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
    result = SourceResult(index, source_label(index), source.role, source.weight)
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
                f"{source_label(index)}: expected every file of a source to have the same schema, "
                f"found {found}; put files of different schemas in separate sources"
            )
        result.schema = schema.name
        result.label = name if not result.files else f"{source_label(index)} ({len(result.files) + 1} files)"
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
