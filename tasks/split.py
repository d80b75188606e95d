"""Stage 4, split: hold out a test set, with no question on both sides.

In: the tokenize artifact and `SplitConfig`. Out: `train.parquet` and `test.parquet`
(same columns as the input). The test set is either the rows of `role: test` sources
(a fixed evaluation file) or a seeded random share of the rows (`test_fraction`,
`seed`, `shuffle`), so the same rows and seed always give the same split. Then
leakage is removed: a train row whose normalised question (`key`) is also a test
question is dropped, counted and reported in the Ref's meta (`leakage_removed`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SplitConfig
from pipeline.rows import DataError
from pipeline.stage import stage_task


def split_indices(n_rows: int, config: SplitConfig) -> tuple[list[int], list[int]]:
    """Row indices as (train, test); test gets ceil(fraction * n), at least 1, seeded-shuffled or the last rows."""
    if n_rows < 2:
        raise DataError(f"split: expected at least 2 rows to split, found {n_rows}")
    order = list(range(n_rows))
    n_test = min(n_rows - 1, max(1, math.ceil(config.test_fraction * n_rows)))
    if not config.shuffle:
        return order[: n_rows - n_test], order[n_rows - n_test :]
    random.Random(config.seed).shuffle(order)
    return sorted(order[n_test:]), sorted(order[:n_test])


def fixed_indices(roles: list[str]) -> tuple[list[int], list[int]]:
    """(train, test) indices when some rows come from `role: test` sources."""
    train = [i for i, role in enumerate(roles) if role != "test"]
    test = [i for i, role in enumerate(roles) if role == "test"]
    if not train:
        raise DataError("split: expected train rows besides the role: test rows, found none")
    return train, test


def remove_leakage(keys: list[str], train: list[int], test: list[int]) -> tuple[list[int], list[int]]:
    """Train indices whose key is no test key, and the removed ones (a question in both would be leakage)."""
    test_keys = {keys[i] for i in test}
    kept = [i for i in train if keys[i] not in test_keys]
    return kept, [i for i in train if keys[i] in test_keys]


def split_rows(table: pa.Table, config: SplitConfig) -> tuple[pa.Table, pa.Table, dict]:
    """The train and test tables for `table`, plus figures: rows on each side, how the test set was chosen, leakage.

    Tables without the `role`/`key` columns (written before they existed) split at random with no leakage check.
    """
    names = set(table.column_names)
    roles = table.column("role").to_pylist() if "role" in names else ["train"] * table.num_rows
    if "test" in roles:
        train_idx, test_idx = fixed_indices(roles)
        how = "fixed (role: test sources)"
    else:
        train_idx, test_idx = split_indices(table.num_rows, config)
        how = (
            f"random {config.test_fraction:.0%} (seed {config.seed})"
            if config.shuffle
            else f"last {config.test_fraction:.0%}"
        )
    removed: list[int] = []
    if "key" in names:
        train_idx, removed = remove_leakage(table.column("key").to_pylist(), train_idx, test_idx)
    if not train_idx:
        raise DataError(
            f"split: expected train rows after removing questions also in the test set, found none "
            f"({len(removed)} removed as leakage)"
        )
    figures = {
        "train_rows": len(train_idx),
        "test_rows": len(test_idx),
        "test_set": how,
        "leakage_removed": len(removed),
    }
    if removed:
        figures["leakage_examples"] = table.column("id").take(removed[:5]).to_pylist()
    return table.take(train_idx), table.take(test_idx), figures


def split_table(table: pa.Table, config: SplitConfig) -> tuple[pa.Table, pa.Table]:
    """The train and test tables of `split_rows`, without the figures."""
    train, test, _ = split_rows(table, config)
    return train, test


@stage_task("split")
def split(tokenized: Path, config: SplitConfig, out: Path) -> dict[str, Any]:
    """Split the tokenized rows into `out/train.parquet` and `out/test.parquet`; returns the figures."""
    train, test, figures = split_rows(pq.read_table(tokenized / "tokens.parquet"), config)
    pq.write_table(train, out / "train.parquet")
    pq.write_table(test, out / "test.parquet")
    return figures
