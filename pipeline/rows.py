"""The row model every data stage shares: what a row is, how it is identified, compared and stored.

A row is a dict: `{"id", "question", "answer", "source"}` (plus `input`, `messages`, `role` when they
carry something) or, for plain text, `{"id", "text", "source"}` (see tasks/collect/). Here: the stable
row id, the row constructors, the normalised question that near-duplicate and leakage checks compare
(`question_key`), the log of dropped rows and the data budget checked after collect and after tokenize,
the JSON Lines files the data stages write and read, the Parquet files they read a batch at a time
(`parquet_file`), and `DataError`, the error every data stage raises for input that cannot be used.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pipeline.config import DataConfig

if TYPE_CHECKING:
    import pyarrow.parquet as pq

EXAMPLES_PER_REASON = 3
"""Dropped rows quoted per reason in the report and in error messages."""

BATCH_ROWS = 4096
"""Rows a data stage holds at once: what keeps its memory flat however many rows there are. Results do not
depend on it (tests run the stages with batches of a few rows and compare)."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line, the column, expected and found."""


def row_id(source: str, question: str, answer: str, extra: str = "") -> str:
    """A stable 16-hex-digit id: the same content from the same source gets the same id.

    `extra` (an Alpaca input, earlier chat turns) takes part only when not empty, so plain
    question/answer rows keep the ids they always had.
    """
    text = f"{source}\x1f{question}\x1f{answer}" + (f"\x1f{extra}" if extra else "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_row(
    source: str, question: str, answer: str, *, input: str = "", messages: list[dict] | None = None, role: str = "train"
) -> dict[str, Any]:
    """A normalised question/answer row with its stable id; optional fields only when they carry something."""
    context = json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True) if messages and len(messages) > 1 else ""
    row: dict[str, Any] = {
        "id": row_id(source, question, answer, input + context),
        "question": question,
        "answer": answer,
        "source": source,
    }
    if input:
        row["input"] = input
    if messages:
        row["messages"] = messages
    if role != "train":
        row["role"] = role
    return row


def make_text_row(source: str, text: str, *, role: str = "train") -> dict[str, Any]:
    """A normalised row of plain text (self-supervised: no question, every token is trained)."""
    row: dict[str, Any] = {"id": row_id(source, "", text), "text": text, "source": source}
    if role != "train":
        row["role"] = role
    return row


def is_text_row(row: dict) -> bool:
    """Whether a row is plain text (no question/answer)."""
    return "text" in row and "answer" not in row


_PUNCTUATION = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    """Text for near-duplicate comparison: Unicode-normalised, case-folded, punctuation and spacing collapsed."""
    if not text:  # most rows have no input and no earlier turns: skip the regex for them
        return ""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def question_key(row: dict) -> str:
    """The normalised question of a row (with its input and earlier turns); the text itself for text rows.

    Two rows with the same key ask the same thing: near-duplicates within a split, leakage across splits.
    """
    if is_text_row(row):
        return normalise_text(row["text"])
    context = " ".join(m["content"] for m in row.get("messages", [])[:-1])
    return "\x1f".join(normalise_text(part) for part in (context, row["question"], row.get("input", "")))


@dataclass
class DropLog:
    """Dropped rows counted by reason, with the first few examples of each ('file:line: detail')."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        """Count one dropped row."""
        self.counts[reason] += 1
        quoted = self.examples.setdefault(reason, [])
        if len(quoted) < EXAMPLES_PER_REASON:
            quoted.append(detail)

    def merge(self, other: DropLog) -> None:
        """Add another log's counts and examples to this one."""
        for reason, count in other.counts.items():
            self.counts[reason] += count
            quoted = self.examples.setdefault(reason, [])
            quoted.extend(other.examples.get(reason, [])[: EXAMPLES_PER_REASON - len(quoted)])

    def summary(self) -> str:
        """One line per reason: count and the first example."""
        return "\n".join(
            f"  {reason}: {count} (e.g. {self.examples[reason][0]})" for reason, count in self.counts.most_common()
        )


def check_drop_budget(
    rows_read: int, dropped: int, rows_left: int, reasons: str, config: DataConfig, *, after: str, advice: str
) -> None:
    """The data budget, checked after collect and again after tokenize (`after` names the point).

    In: rows read, rows dropped, rows left, the drop reasons as text, `data.max_bad_fraction`
    and `data.min_rows`. Raises DataError naming the key, expected and found.
    """
    where = f" after {after}" if after else ""
    if rows_read and dropped / rows_read > config.max_bad_fraction:
        raise DataError(
            f"data: expected at most data.max_bad_fraction={config.max_bad_fraction:g} of the rows read to be dropped, "
            f"found {dropped} of {rows_read} ({dropped / rows_read:.0%}){where}:\n{reasons}\n{advice}"
        )
    if rows_left < config.min_rows:
        detail = f"\n{reasons}" if dropped and reasons else ""
        raise DataError(
            f"data: expected at least data.min_rows={config.min_rows} rows, found {rows_left}{where}{detail}"
        )


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines (UTF-8, one object per line); returns the count."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file the pipeline wrote itself."""
    return [row for batch in jsonl_batches(path) for row in batch]


def jsonl_batches(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[list[dict]]:
    """Rows of a JSON Lines file the pipeline wrote itself, `batch_rows` at a time (the last batch may be short)."""
    batch: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                batch.append(json.loads(line))
                if len(batch) >= batch_rows:
                    yield batch
                    batch = []
    if batch:
        yield batch


def parquet_file(source: Path | IO[bytes]) -> pq.ParquetFile:
    """A Parquet file (a path or a seekable binary file) opened to be read a batch at a time in flat memory.

    Why `pre_buffer=False`: with pyarrow's default (True), `iter_batches` over the whole file keeps every row
    group's compressed bytes it has read until the file object is dropped (measured with pyarrow 26: 66 MiB of
    Arrow memory held after reading a 69 MB tokens.parquet, growing by the file's size). That is what made data
    preparation's memory grow by about 0.35 KiB a row. Without pre-buffering the reader holds one row group at a
    time (18 MiB on the same file, whatever its length); the coalesced reads it gives up help on object stores,
    not on the local files the stages read.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(source, pre_buffer=False)
