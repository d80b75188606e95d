"""Stage 1, collect: gather rows from the configured sources, normalise them, drop bad ones with a reason.

In: `DataConfig` (a list of sources) and the store settings (whose endpoint and
credentials also read `s3://` data). Out: an artifact with

* `rows.jsonl`, one normalised row per line: `{"id", "question", "answer", "source"}`,
  plus `input` (Alpaca input, when not empty), `messages` (the turns before the answer,
  for chat rows) and `role: "test"` (rows of a fixed evaluation source). Rows of the
  `text` schema are `{"id", "text", "source"}`. `id` is a hash of source and content,
  stable across reruns.
* `report.json`: rows read and kept, per source and in total, and every dropped row
  counted by reason with a few examples naming file, line and column.

Sources: files (JSON Lines, JSON, CSV/TSV, Parquet; one, several or a glob; `.gz`
too; local or `s3://`), Hugging Face datasets (a `save_to_disk` folder or a hub id),
and `docs` (an installed package's documentation turned into question/answer pairs,
plus off-topic refusals, near-domain refusals (questions about other packages) and
optional general-knowledge replay). Files are read as
streams and rows pass through a spool file on disk, so memory stays flat as rows grow and `limit` takes the
first rows of a corpus larger than memory.

Each file's schema is detected from its columns (`SCHEMAS`) unless the source maps
columns. Broken files fail at once (malformed JSON, undecodable bytes, no matching
schema, an empty file): the DataError names the file, the line, the column, what was
expected and what was found. Bad rows are dropped and counted (empty, non_string,
missing_field, bad_messages, too_long, duplicate, near_duplicate); the run fails when
more than `data.max_bad_fraction` of the rows read are dropped or fewer than
`data.min_rows` remain.

Modules: `schemas` (schema detection, `normalise_record`), `readers` (the file readers), `sources` (local
files and globs, s3:// objects, Hugging Face datasets), `docs` (the docs source), `mixing` (one source's rows
up to its limit, streamed; duplicates and the weighted mix in a second pass), `fingerprints` (source content in
the key) and `stage` (the core `collect_to`, `collect_data` and the `collect` task). This module re-exports
their public names.
"""

from __future__ import annotations

from tasks.collect.docs import (
    clean_docstring_markup,
    docs_rows,
    near_domain_rows,
    read_docs_source,
    replay_rows,
    summary_paragraph,
)
from tasks.collect.fingerprints import source_fingerprints
from tasks.collect.mixing import SourceResult, draw_sizes, row_digests, sample_membership, source_rows, write_mixed
from tasks.collect.readers import (
    FORMATS,
    Record,
    file_format,
    read_csv_records,
    read_file_records,
    read_json_records,
    read_jsonl_records,
    read_parquet_records,
    sniff_delimiter,
    text_lines,
)
from tasks.collect.schemas import (
    ACCEPTED_SCHEMAS,
    KNOWN_COLUMNS,
    MAPPING_HINT,
    SCHEMAS,
    Schema,
    check_columns,
    detect_schema,
    explicit_schema,
    json_type,
    normalise_record,
)
from tasks.collect.sources import S3Data, hf_records, local_files, source_files, source_label
from tasks.collect.stage import check_rows, collect, collect_data, collect_rows, collect_to, collected_sources

__all__ = [
    "ACCEPTED_SCHEMAS",
    "FORMATS",
    "KNOWN_COLUMNS",
    "MAPPING_HINT",
    "SCHEMAS",
    "Record",
    "S3Data",
    "Schema",
    "SourceResult",
    "check_columns",
    "check_rows",
    "clean_docstring_markup",
    "collect",
    "collect_data",
    "collect_rows",
    "collect_to",
    "collected_sources",
    "detect_schema",
    "docs_rows",
    "draw_sizes",
    "explicit_schema",
    "file_format",
    "hf_records",
    "json_type",
    "local_files",
    "near_domain_rows",
    "normalise_record",
    "read_csv_records",
    "read_docs_source",
    "read_file_records",
    "read_json_records",
    "read_jsonl_records",
    "read_parquet_records",
    "replay_rows",
    "row_digests",
    "sample_membership",
    "sniff_delimiter",
    "source_files",
    "source_fingerprints",
    "source_label",
    "source_rows",
    "summary_paragraph",
    "text_lines",
    "write_mixed",
]
