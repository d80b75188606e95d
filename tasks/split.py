"""Stage 4, split: hold out a test set.

In: the tokenize artifact and `SplitConfig`. Out: `train.parquet` and
`test.parquet` (same columns as the input). The shuffle is seeded, so the same
rows and seed always give the same split.
"""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SplitConfig, StoreConfig
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task

VERSION = "1"


def split_indices(n_rows: int, config: SplitConfig) -> tuple[list[int], list[int]]:
    """Seeded shuffle of row indices into (train, test); test gets ceil(fraction * n), at least 1."""
    if n_rows < 2:
        raise ValueError(f"split: expected at least 2 rows to split, found {n_rows}")
    order = list(range(n_rows))
    random.Random(config.seed).shuffle(order)
    n_test = min(n_rows - 1, max(1, math.ceil(config.test_fraction * n_rows)))
    return sorted(order[n_test:]), sorted(order[:n_test])


def split_table(table: pa.Table, config: SplitConfig) -> tuple[pa.Table, pa.Table]:
    """The train and test tables for `table`."""
    train_idx, test_idx = split_indices(table.num_rows, config)
    return table.take(train_idx), table.take(test_idx)


@stage_task("split", version=VERSION)
def split(tokenized: Ref, config: SplitConfig, store: StoreConfig) -> Ref:
    """Split the tokenized rows into train and test Parquet files; returns the artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    table = pq.read_table(stage.fetch(tokenized) / "tokens.parquet")
    train, test = split_table(table, config)
    pq.write_table(train, stage.dir / "train.parquet")
    pq.write_table(test, stage.dir / "test.parquet")
    return stage.commit(meta={"train_rows": train.num_rows, "test_rows": test.num_rows})
