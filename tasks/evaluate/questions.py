"""The split's questions as evaluation reads them: test rows to score, the questions probes avoid, taught packages.

Split files are read a batch at a time (`file_rows`): only what evaluation keeps (at most `eval.limit` test
rows, the split's refusal sentences) is held, never a whole split's columns or questions at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import TemplateConfig
from pipeline.prompts import render_prompt
from pipeline.rows import BATCH_ROWS, parquet_file

log = logging.getLogger(__name__)


REQUIRED_TEST_COLUMNS = ("id", "prompt", "completion")
"""Columns the split stage writes that evaluation reads (`question` is used when present)."""


class EmptyTestSplit(ValueError):
    """The test split has no rows to evaluate (or only rows with an empty target)."""


def question_of(prompt: str, template: TemplateConfig) -> str:
    """The question inside a templated prompt (the prompt itself when it does not fit the template)."""
    prefix, _, suffix = render_prompt("\x00", template).partition("\x00")
    if prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) >= len(prefix) + len(suffix):
        return prompt[len(prefix) : len(prompt) - len(suffix)]
    return prompt


def split_files(split_dir: Path) -> Iterator[Path]:
    """The split folder's files that exist, train.parquet then test.parquet."""
    return (path for path in (split_dir / "train.parquet", split_dir / "test.parquet") if path.is_file())


def file_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of a split file (those columns only) in file order, read `BATCH_ROWS` at a time."""
    for batch in parquet_file(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def read_test_rows(test_path: Path, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rows to score, excluded counts {"empty_target": n, "no_prompt": n}).

    Rows with an empty target cannot be scored; rows with an empty prompt (plain-text
    rows, which carry no question) cannot be asked. Raises EmptyTestSplit when the
    split (after `limit`) has no rows, or none left to score, and ValueError naming
    the missing columns when the file lacks `id`, `prompt` or `completion`.
    """
    names = pq.read_schema(test_path).names
    missing = [c for c in REQUIRED_TEST_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"eval: the test split {test_path} needs the columns {list(REQUIRED_TEST_COLUMNS)}, "
            f"missing {missing}, found {names}"
        )
    columns = list(REQUIRED_TEST_COLUMNS) + [c for c in ("question",) if c in names]
    rows = list(islice(file_rows(test_path, columns), limit))  # the rest of the file is never read
    if not rows:
        raise EmptyTestSplit(
            f"eval: the test split {test_path} has no rows (expected at least one question with a "
            "target answer, found 0 rows); raise split.test_fraction or add data"
        )
    with_target = [row for row in rows if (row["completion"] or "").strip()]
    kept = [row for row in with_target if (row["prompt"] or "").strip()]
    if not kept:
        raise EmptyTestSplit(
            f"eval: none of the {len(rows)} rows of the test split {test_path} can be scored "
            f"(expected a question and a target answer): {len(rows) - len(with_target)} have an "
            f"empty target answer, {len(with_target) - len(kept)} an empty prompt"
        )
    excluded = {"empty_target": len(rows) - len(with_target), "no_prompt": len(with_target) - len(kept)}
    if any(excluded.values()):
        log.warning(
            "eval: %d test rows with an empty target answer and %d with an empty prompt are excluded "
            "(counted in summary.json)",
            excluded["empty_target"],
            excluded["no_prompt"],
        )
    return kept, excluded


def row_question(row: Mapping[str, Any], template: TemplateConfig) -> str:
    """A split row's question: its `question` column when it has one, else read out of its prompt."""
    return row.get("question") or question_of(row["prompt"], template)


class SplitQuestions:
    """The question of every train and test row of a split folder, read from its files a batch at a time each time
    it is iterated: the probes are checked against them without holding them (a large split's questions, indexed
    for near-duplicates, took about 2 KB a row)."""

    def __init__(self, split_dir: Path, template: TemplateConfig) -> None:
        """In: the split folder (train.parquet, test.parquet) and the template its prompts were rendered with."""
        self.split_dir, self.template = split_dir, template

    def __iter__(self) -> Iterator[str]:
        for path in split_files(self.split_dir):
            columns = ["prompt"] + [c for c in ("question",) if c in pq.read_schema(path).names]
            for row in file_rows(path, columns):
                yield row_question(row, self.template)


def seen_questions(split_dir: Path, template: TemplateConfig) -> SplitQuestions:
    """The question of every train and test row of a split folder (a probe must be none of them, nor near one), as
    an iterable that reads the files again each time (`SplitQuestions`)."""
    return SplitQuestions(split_dir, template)


def taught_packages(split_dir: Path) -> list[str]:
    """Packages a docs source taught in this split (row source `docs:<package>`), in name order; [] for other data."""
    packages: set[str] = set()
    for path in split_files(split_dir):
        if "source" in pq.read_schema(path).names:
            for batch in parquet_file(path).iter_batches(batch_size=BATCH_ROWS, columns=["source"]):
                sources = pc.unique(batch.column(0)).to_pylist()
                packages.update(s.removeprefix("docs:") for s in sources if s and s.startswith("docs:"))
    return sorted(packages)


def split_targets(split_dir: Path) -> Iterator[str]:
    """Every target answer in the split (train, then test), one at a time: where the refusal sentences come from."""
    for path in split_files(split_dir):
        for row in file_rows(path, ["completion"]):
            yield row["completion"]
