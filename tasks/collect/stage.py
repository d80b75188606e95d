"""The collect stage body: every source's rows streamed, checked, de-duplicated, mixed and written with the report.

`collect_to` is the core (config in, `rows.jsonl` and the report out), streaming: the rows pass through a spool
file on disk, so memory stays flat however many rows the sources hold. `collect_data` is the same core returning
the rows in memory; `collect` is the stage task (name "collect").
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, StoreConfig
from pipeline.digests import DigestLog
from pipeline.progress import Progress
from pipeline.rows import DropLog, check_drop_budget, read_jsonl
from pipeline.stage import stage_task
from pipeline.store import StoreSettings
from tasks.collect.mixing import SourceResult, row_digests, source_rows, write_mixed


def collect_to(
    config: DataConfig, path: Path, store: StoreSettings | None = None, *, buffer_rows: int = 1 << 16
) -> dict[str, Any]:
    """Collect every configured source into the JSON Lines file `path`; out: the collect report.

    In: the data config; the store settings, whose endpoint and credentials read s3://
    data; how many duplicate keys to hold between writes to disk (results do not depend
    on it). Two passes: the first reads and normalises every source into a spool file
    and logs each row's two keys; the second drops duplicates and draws the mix while
    writing `path`. Raises DataError for unusable input, for more than
    `max_bad_fraction` of the rows read dropped, and for fewer than `min_rows` left
    (`path` is then written but incomplete: the stage discards its staging folder).
    """
    progress = Progress("collect", unit="rows")
    with tempfile.TemporaryDirectory(prefix="finetune-collect-") as workdir:
        work = Path(workdir)
        exact = DigestLog(work / "exact", buffer_rows)
        near = DigestLog(work / "near", buffer_rows)
        results: list[SourceResult] = []
        with (work / "spool.jsonl").open("w", encoding="utf-8") as spool:
            for index, source in enumerate(config.sources):
                result, rows = source_rows(source, index, config, store, work)
                results.append(result)
                for row in rows:
                    spool.write(json.dumps(row, ensure_ascii=False) + "\n")
                    exact_key, near_key = row_digests(row)
                    exact.add(exact_key)
                    near.add(near_key)
                    progress.advance()
        near_repeats = near.repeats() if config.dedupe == "near" else None
        with (work / "spool.jsonl").open(encoding="utf-8") as spool, path.open("w", encoding="utf-8") as out:
            not_drawn = write_mixed(spool, results, exact.repeats(), near_repeats, config, out)
    progress.finish()
    drops = DropLog()
    for result in results:
        drops.merge(result.drops)
    report = {
        "rows_read": sum(r.read for r in results),
        "rows": sum(r.kept for r in results),
        "dropped": dict(drops.counts.most_common()),
        "examples": drops.examples,
        "not_drawn": not_drawn,
        "sources": [r.describe() for r in results],
    }
    check_rows(report, drops, config)
    return report


def collect_data(config: DataConfig, store: StoreSettings | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configured source's rows, normalised, checked, de-duplicated and mixed, in memory; plus the report.

    The same core as the stage (`collect_to`), for callers that want the rows as a list. Raises as `collect_to`.
    """
    with tempfile.TemporaryDirectory(prefix="finetune-collect-out-") as folder:
        report = collect_to(config, Path(folder) / "rows.jsonl", store)
        return read_jsonl(Path(folder) / "rows.jsonl"), report


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
    report = collect_to(config, out / "rows.jsonl", store)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sources = sorted(collected_sources(out / "rows.jsonl"))
    return {"rows": report["rows"], "rows_read": report["rows_read"], "dropped": report["dropped"], "sources": sources}


def collected_sources(path: Path) -> set[str]:
    """The distinct `source` names in a collected rows file, read one line at a time."""
    names: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                names.add(json.loads(line)["source"])
    return names
