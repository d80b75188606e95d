"""Stage 4, split: hold out a test set, with no question on both sides.

In: the tokenize artifact and `SplitConfig`. Out: `train.parquet` and `test.parquet`
(same columns as the input). The test set is either the rows of `role: test` sources
(a fixed evaluation file) or a seeded random share of the rows (`test_fraction`,
`seed`, `shuffle`), so the same rows and seed always give the same split. Then
leakage is removed: a train row whose normalised question (`key`) is also a test
question is dropped, counted and reported in the Ref's meta (`leakage_removed`).

The rows stream: three passes over the input, `BATCH_ROWS` at a time (roles; the test questions, kept as
16-byte digests; the rows written to either side), so memory grows by a few bytes a row (the shuffled order,
4 bytes; test membership, 1 byte; a test question's digest, 16 bytes), not by the rows. The seeded order is
exactly `random.Random(seed).shuffle` of the row numbers, as it always was, so the same data and seed give the
same split as before streaming.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import SplitConfig
from pipeline.progress import Progress
from pipeline.rows import BATCH_ROWS, DataError, parquet_file
from pipeline.stage import stage_task

Batches = Callable[[list[str] | None], Iterator[pa.RecordBatch]]
"""`batches(columns)`: the rows again from the start, those columns only (None: all), a batch at a time."""


def shuffled_order(n_rows: int, seed: int) -> array:
    """`random.Random(seed).shuffle(list(range(n_rows)))`, step for step, in 4 bytes a row instead of 36."""
    order = array("i", range(n_rows))
    randbelow = random.Random(seed)._randbelow  # what shuffle itself draws with (CPython's Fisher-Yates)
    for i in reversed(range(1, n_rows)):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def test_membership(n_rows: int, config: SplitConfig) -> np.ndarray:
    """Per row, whether it is in the test set: ceil(fraction * n), at least 1, seeded-shuffled or the last rows."""
    if n_rows < 2:
        raise DataError(f"split: expected at least 2 rows to split, found {n_rows}")
    n_test = min(n_rows - 1, max(1, math.ceil(config.test_fraction * n_rows)))
    test = np.zeros(n_rows, dtype=bool)
    if not config.shuffle:
        test[n_rows - n_test :] = True
    else:
        test[np.frombuffer(shuffled_order(n_rows, config.seed), dtype=np.int32)[:n_test]] = True
    return test


def split_indices(n_rows: int, config: SplitConfig) -> tuple[list[int], list[int]]:
    """Row indices as (train, test), each ascending (see `test_membership`)."""
    test = test_membership(n_rows, config)
    return np.flatnonzero(~test).tolist(), np.flatnonzero(test).tolist()


def _key_digests(keys: list[str]) -> np.ndarray:
    """16-byte digests of normalised questions, as a numpy bytes array."""
    return np.array([hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys], dtype="S16")


def split_batches(
    batches: Batches, names: list[str], n_rows: int, config: SplitConfig, write: Callable[[str, pa.RecordBatch], None]
) -> dict[str, Any]:
    """Split rows given as record batches, writing each side's rows with `write('train' | 'test', batch)` in order.

    In: the rows (`batches`), their column names and count, the config. Out: the figures (rows on each side, how
    the test set was chosen, leakage removed). Rows without the `role`/`key` columns (written before they existed)
    split at random with no leakage check. Raises DataError for too few rows and for no train rows left.
    """
    roles = "role" in names
    fixed = False
    if roles:
        tests = sum(pc.sum(pc.equal(b.column(0), "test")).as_py() or 0 for b in batches(["role"]))
        fixed = tests > 0
        if fixed and tests == n_rows:
            raise DataError("split: expected train rows besides the role: test rows, found none")
    membership = None if fixed else test_membership(n_rows, config)
    how = (
        "fixed (role: test sources)"
        if fixed
        else f"random {config.test_fraction:.0%} (seed {config.seed})"
        if config.shuffle
        else f"last {config.test_fraction:.0%}"
    )

    def test_mask(batch: pa.RecordBatch, start: int) -> np.ndarray:
        if fixed:
            return pc.equal(batch.column("role"), "test").to_numpy(zero_copy_only=False)
        return membership[start : start + batch.num_rows]  # type: ignore[index]

    test_keys = np.array([], dtype="S16")
    if "key" in names:
        start, found = 0, []
        for batch in batches(["role", "key"] if fixed else ["key"]):
            mask = test_mask(batch, start)
            found.append(_key_digests(batch.column("key").filter(pa.array(mask)).to_pylist()))
            start += batch.num_rows
        test_keys = np.unique(np.concatenate(found)) if found else test_keys
    counts = {"train": 0, "test": 0}
    removed, examples, start = 0, [], 0
    progress = Progress("split", n_rows, unit="rows")
    for batch in batches(None):
        test = test_mask(batch, start)
        train = ~test
        if "key" in names and len(test_keys):
            digests = _key_digests(batch.column("key").to_pylist())
            at = np.minimum(np.searchsorted(test_keys, digests), len(test_keys) - 1)
            leak = train & (test_keys[at] == digests)
            removed += int(leak.sum())
            if len(examples) < 5:
                examples += batch.column("id").filter(pa.array(leak)).to_pylist()[: 5 - len(examples)]
            train &= ~leak
        for side, mask in (("train", train), ("test", test)):
            counts[side] += int(mask.sum())
            write(side, batch.filter(pa.array(mask)))
        start += batch.num_rows
        progress.advance(batch.num_rows)
    progress.finish()
    if not counts["train"]:
        raise DataError(
            f"split: expected train rows after removing questions also in the test set, found none "
            f"({removed} removed as leakage)"
        )
    figures: dict[str, Any] = {
        "train_rows": counts["train"],
        "test_rows": counts["test"],
        "test_set": how,
        "leakage_removed": removed,
    }
    if removed:
        figures["leakage_examples"] = examples
    return figures


def split_rows(table: pa.Table, config: SplitConfig, batch_rows: int = BATCH_ROWS) -> tuple[pa.Table, pa.Table, dict]:
    """The train and test tables for `table`, in memory, plus the figures of `split_batches` (the same core)."""
    sides: dict[str, list[pa.RecordBatch]] = {"train": [], "test": []}

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        return iter((table.select(columns) if columns else table).to_batches(max_chunksize=batch_rows))

    figures = split_batches(
        batches, table.column_names, table.num_rows, config, lambda side, batch: sides[side].append(batch)
    )
    train, test = (pa.Table.from_batches(sides[side], schema=table.schema) for side in ("train", "test"))
    return train, test, figures


def split_table(table: pa.Table, config: SplitConfig) -> tuple[pa.Table, pa.Table]:
    """The train and test tables of `split_rows`, without the figures."""
    train, test, _ = split_rows(table, config)
    return train, test


def split_file(tokens: Path, folder: Path, config: SplitConfig, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Split the Parquet file `tokens` into `folder/train.parquet` and `folder/test.parquet`, `batch_rows` at a time;
    out: the figures."""
    parquet = parquet_file(tokens)
    schema = parquet.schema_arrow

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        return parquet.iter_batches(batch_size=batch_rows, columns=columns)

    with (
        pq.ParquetWriter(folder / "train.parquet", schema) as train,
        pq.ParquetWriter(folder / "test.parquet", schema) as test,
    ):
        writers = {"train": train, "test": test}

        def write(side: str, batch: pa.RecordBatch) -> None:
            if batch.num_rows:
                writers[side].write_batch(batch)

        return split_batches(batches, schema.names, parquet.metadata.num_rows, config, write)


@stage_task("split")
def split(tokenized: Path, config: SplitConfig, out: Path) -> dict[str, Any]:
    """Split the tokenized rows into `out/train.parquet` and `out/test.parquet`, streamed; returns the figures."""
    return split_file(tokenized / "tokens.parquet", out, config)
