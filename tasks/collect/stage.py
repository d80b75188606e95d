"""The collect stage body: every source's rows collected, checked and written with the collect report.

`collect_data` is the pure core (config in, rows and report out); `collect` is the stage task (name "collect").
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, StoreConfig
from pipeline.rows import DropLog, check_drop_budget, write_jsonl
from pipeline.stage import stage_task
from pipeline.store import StoreSettings
from tasks.collect.mixing import drop_duplicates, mix_sources, read_source


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
