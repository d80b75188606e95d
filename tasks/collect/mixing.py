"""From sources to the collected rows, streamed: one source read up to its limit, duplicates dropped, sources mixed.

`source_rows` yields a configured source's normalised rows one at a time, counting what it reads and drops in a
`SourceResult`; `row_digests` gives the two keys de-duplication compares (the row's content, its normalised
question); `write_mixed` makes the second pass over the spooled rows: it drops exact and near duplicates across
sources (decided beforehand by `pipeline.digests.DigestLog`, on disk) and draws the train sources to their
weights and to `data.max_rows`, seeded, writing the collected rows as it goes. Memory stays flat in the number of
rows: one row at a time, one byte a row for the duplicate marks and, only when a draw cuts a source, one byte a
row for the drawn positions (`sample_membership`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.config import DataConfig, DocsSource, HFSource, JsonlSource
from pipeline.rows import DataError, DropLog, question_key
from pipeline.store import StoreSettings
from tasks.collect.docs import read_docs_source
from tasks.collect.readers import Record, file_format, read_file_records
from tasks.collect.schemas import Schema, check_columns, detect_schema, explicit_schema, normalise_record
from tasks.collect.sources import hf_records, source_files, source_label


@dataclass
class SourceResult:
    """What one source gave: records read, rows normalised (before de-duplication), rows kept, and the drops."""

    index: int
    label: str
    role: str
    weight: float | None
    read: int = 0
    normalised: int = 0
    kept: int = 0
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
            "rows_kept": self.kept,
            "dropped": dict(self.drops.counts),
        }


def _records_to_rows(
    result: SourceResult, records: Iterable[Record], schema: Schema, name: str, limit: int | None, max_chars: int
) -> Iterator[dict[str, Any]]:
    """Normalised rows of `records` until `limit` records of the source have been read; drops counted in `result`."""
    for origin, record in records:
        if limit is not None and result.read >= limit:
            return
        result.read += 1
        row = normalise_record(record, schema, name, origin, max_chars=max_chars, role=result.role)
        if isinstance(row, tuple):
            result.drops.add(*row)
        else:
            result.normalised += 1
            yield row


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


def _record_source_rows(
    source: JsonlSource | HFSource, result: SourceResult, config: DataConfig, store: StoreSettings | None, workdir: Path
) -> Iterator[dict[str, Any]]:
    """Rows of a file or Hugging Face source: one schema for all its files, records normalised, drops counted.

    Files are read in name order until the source's `limit` of records is reached.
    """
    index = result.index
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
        yield from _records_to_rows(result, records, schema, name, source.limit, config.max_chars)
        if source.limit is not None and result.read >= source.limit:
            break


def source_rows(
    source: Any, index: int, config: DataConfig, store: StoreSettings | None, workdir: Path
) -> tuple[SourceResult, Iterator[dict[str, Any]]]:
    """(the source's tally, its normalised rows): the rows come one at a time, and the tally fills as they do.

    Files and datasets are read lazily; the docs source (one package's documentation) is built whole.
    """
    result = SourceResult(index, source_label(index), source.role, source.weight)
    if isinstance(source, DocsSource):
        rows = read_docs_source(source)
        result.label, result.schema = f"docs:{source.package}", "docs"
        result.read = result.normalised = len(rows)
        return result, iter(rows)
    return result, _record_source_rows(source, result, config, store, workdir)


def row_digests(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """(exact, near) 16-byte keys of a row: its content and role whatever its source; its role and normalised
    question (with its input and earlier turns)."""
    content = {k: v for k, v in row.items() if k not in ("id", "source")}
    exact = hashlib.blake2b(json.dumps(content, sort_keys=True, ensure_ascii=False).encode(), digest_size=16)
    near = hashlib.blake2b(f"{row.get('role', 'train')}\x1f{question_key(row)}".encode(), digest_size=16)
    return exact.digest(), near.digest()


def draw_sizes(results: list[SourceResult], config: DataConfig) -> dict[int, int]:
    """Rows wanted from each train source (by index), from the rows each kept after de-duplication.

    Weighted: each train source gives weight/total of the mix, as large as the scarcest
    source allows (rows are never repeated). Else `data.max_rows` cuts every train source
    in proportion. Otherwise every row is wanted.
    """
    train = [r for r in results if r.role == "train"]
    available = sum(r.kept for r in train)
    if all(r.weight is not None for r in train):
        total = sum(r.weight or 0 for r in train)
        size = min(r.kept * total / (r.weight or 1) for r in train)
        size = min(size, config.max_rows or size)
        return {r.index: int(size * (r.weight or 0) / total) for r in train}
    if config.max_rows and available > config.max_rows:
        return {r.index: int(r.kept * config.max_rows / available) for r in train}
    return {r.index: r.kept for r in train}


def sample_membership(n: int, k: int, rng: random.Random) -> np.ndarray:
    """Per row of range(n), whether `rng.sample(range(n), k)` picks it: CPython's draws step for step (the same
    picks, the same state of `rng` after), held as one byte a row (and a 4-byte pool for small n, as CPython's
    list) instead of a list of k Python ints, about 40 bytes each."""
    if not 0 <= k <= n:
        raise ValueError(f"expected a sample size from 0 to {n}, found {k}")
    taken = bytearray(n)
    randbelow = rng._randbelow  # what sample itself draws with
    setsize = 21  # CPython's choice between a pool and a set of picks, copied so the draws match
    if k > 5:
        setsize += 4 ** math.ceil(math.log(k * 3, 4))
    if n <= setsize:
        pool = array("i", range(n))
        for i in range(k):
            j = randbelow(n - i)
            taken[pool[j]] = 1
            pool[j] = pool[n - i - 1]
    else:
        for _ in range(k):
            j = randbelow(n)
            while taken[j]:
                j = randbelow(n)
            taken[j] = 1
    return np.frombuffer(taken, dtype=bool)


def _drawn(result: SourceResult, wanted: int, seed: int) -> np.ndarray | None:
    """Which of a source's kept rows the seeded draw takes (None: all of them); the same config, the same rows."""
    if result.role != "train" or wanted >= result.kept:
        return None
    return sample_membership(result.kept, wanted, random.Random(f"{seed}:{result.index}"))


def write_mixed(
    spool: Iterable[str],
    results: list[SourceResult],
    exact_repeats: np.ndarray,
    near_repeats: np.ndarray | None,
    config: DataConfig,
    out: IO[str],
) -> int:
    """The second pass: the spooled rows (JSON lines, in source order) without duplicates, drawn, written to `out`.

    In: the spool, each source's tally (its `normalised` rows are its run of the spool), per spooled row whether
    its content (`exact_repeats`) or, with `data.dedupe: near`, its question (`near_repeats`) came earlier. A
    duplicate is dropped and counted in its source's tally; a question in train and test is leakage, which split
    removes. Each tally's `kept` ends as the rows written. Out: the train rows the draw left out.
    """
    repeated = exact_repeats | near_repeats if near_repeats is not None else exact_repeats
    start = 0
    for result in results:
        result.kept = int((~repeated[start : start + result.normalised]).sum())
        start += result.normalised
    available = sum(r.kept for r in results if r.role == "train")
    wanted = draw_sizes(results, config)
    lines = iter(spool)
    seq = 0
    for result in results:
        drawn = _drawn(result, wanted.get(result.index, result.kept), config.seed)
        position = written = 0
        for line in (next(lines) for _ in range(result.normalised)):
            if exact_repeats[seq]:
                row = json.loads(line)
                result.drops.add("duplicate", f"{result.label}: row {row['id']} repeats an earlier row")
            elif near_repeats is not None and near_repeats[seq]:
                row = json.loads(line)
                shown = row.get("question", row.get("text", ""))[:60]
                result.drops.add(
                    "near_duplicate", f"{result.label}: question {shown!r} repeats an earlier one after normalisation"
                )
            else:
                if drawn is None or drawn[position]:
                    out.write(line)
                    written += 1
                position += 1
            seq += 1
        result.kept = written
    return available - sum(r.kept for r in results if r.role == "train")
