"""Bad data files, refused by the collect stage itself: the DataError names the file / line / row / column, what
was expected and what was found, and the store is left as it was.

Each case runs the collect task's own function (`collect.fn`: the stage shell of pipeline/stage.py around the
collect body; key, body, commit) on the tiny config with one data source, without Prefect or a flow: a bad file
costs a fraction of a second here instead of a flow run. The path from such an error to the user (the flow
fails in collect, `finetune run` prints the message and exits 2, nothing is committed) is checked end to end
once per kind of error by tests/reliability/test_bad_input.py (the cases there marked `flow=True`).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_files import GOOD, jsonl, write

from pipeline.config import load_config
from pipeline.rows import DataError
from pipeline.store import LocalStore
from tasks.collect import collect, source_fingerprints

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


@dataclass(frozen=True)
class Case:
    """One bad data source: `make(tmp)` writes its files and returns (the source as a YAML flow mapping, the
    other --set items); `message` is a regex the DataError's text must match."""

    id: str
    make: Callable[[Path], tuple[str, list[str]]]
    message: str


# No row floor unless a case is about the row count: each case fails on its own problem, not on too few rows.
NO_FLOOR = ["data.min_rows=1"]


def _file(name: str, content: str | bytes, extra: str = "") -> Callable[[Path], tuple[str, list[str]]]:
    """A case maker: `content` written to tmp/name is the only source (+ `extra` keys of the source)."""
    return lambda tmp: (f"{{path: '{write(tmp, name, content)}'{extra}}}", NO_FLOOR)


def _all_duplicates(tmp: Path) -> tuple[str, list[str]]:
    # The tiny config's data.min_rows (20) stays, and every dropped row is allowed: only the row count fails.
    return f"{{path: '{write(tmp, 'dup.jsonl', jsonl(GOOD[:1] * 30))}'}}", ["data.max_bad_fraction=1.0"]


def _parquet_numbers(tmp: Path) -> tuple[str, list[str]]:
    path = tmp / "faq.parquet"
    pq.write_table(pa.table({"question": [r["question"] for r in GOOD], "answer": list(range(30))}), path)
    return f"{{path: '{path}'}}", NO_FLOOR


def _mixed_schemas(tmp: Path) -> tuple[str, list[str]]:
    write(tmp, "part1.jsonl", jsonl(GOOD))
    write(tmp, "part2.jsonl", jsonl([{"text": "Some plain text."}]))
    return f"{{path: '{tmp / 'part*.jsonl'}'}}", NO_FLOOR


def _hf_not_saved(tmp: Path) -> tuple[str, list[str]]:
    write(tmp, "not-a-dataset/readme.txt", "hello")
    return f"{{kind: hf, dataset: '{tmp / 'not-a-dataset'}'}}", NO_FLOOR


FOUND_NONE = "found none"
CASES = [
    Case(
        "jsonl_broken_line",
        _file("bad.jsonl", jsonl(GOOD[:2]) + '{"question": "x", "answer": }\n'),
        r"bad\.jsonl:3: expected a JSON object, found malformed JSON \(Expecting value at column \d+\)",
    ),
    Case(
        "jsonl_array_line",
        _file("arr.jsonl", jsonl(GOOD[:1]) + "[1, 2]\n"),
        r"arr\.jsonl:2: expected a JSON object per line, found array",
    ),
    Case(
        "jsonl_not_utf8",
        _file("latin.jsonl", jsonl(GOOD[:1]).encode() + '{"question": "Café?", "answer": "Oui."}\n'.encode("latin-1")),
        r"latin\.jsonl:2: expected utf-8 text, found byte 0xe9 .*set encoding on the source",
    ),
    Case("empty_file", _file("empty.jsonl", ""), r"empty\.jsonl: expected rows, found an empty file"),
    Case(
        "jsonl_missing_columns",
        _file("faq.jsonl", jsonl([{"q": "Why?", "a": "Because."}])),
        r"faq\.jsonl: expected the columns of an accepted schema \(question\+answer; .*\), found \['a', 'q'\]",
    ),
    Case(
        "csv_missing_columns",
        _file("faq.csv", "q,a\nWhy?,Because.\n"),
        r"faq\.csv: expected the columns of an accepted schema \(question\+answer; .*; messages\), found \['a', 'q'\]; "
        r"or map your columns",
    ),
    Case(
        "csv_header_only",
        _file("faq.csv", "question,answer\n"),
        r"faq\.csv: expected data rows after the header \['question', 'answer'\], found none",
    ),
    Case(
        "csv_mapped_column_missing",
        _file("faq.csv", "q,a\nWhy?,Because.\n", ", question_key: q, answer_key: answer"),
        r"faq\.csv: expected column\(s\) 'answer' \(question_key=q, answer_key=answer\), found \['a', 'q'\]",
    ),
    Case(
        "mixed_schemas",
        _mixed_schemas,
        r"expected every file of a source to have the same schema, found .*part1.jsonl is question/answer, "
        r".*part2.jsonl is text",
    ),
    Case(
        "nested_objects",
        _file("nested.jsonl", jsonl([{"question": "Q?", "answer": {"text": "A."}}] * 3)),
        r"non_string: 3 \(e.g. .*nested.jsonl:1: column 'answer': expected text, found object\)",
    ),
    Case(
        "huge_row",
        _file("huge.jsonl", jsonl([{"question": "Huge?", "answer": "word " * 1_000_000}])),
        r"too_long: 1 \(e.g. .*huge.jsonl:1: column 'answer': expected at most data.max_chars=100000 characters, "
        r"found 4,999,999\)",
    ),
    Case(
        "parquet_non_string_answer",
        _parquet_numbers,
        r"expected at most data\.max_bad_fraction=0\.25 of the rows read to be dropped, found 30 of 30 .*\n"
        r"  non_string: 30 \(e\.g\. .*faq\.parquet row 1: column 'answer': expected text, found number\)",
    ),
    Case(
        "parquet_not_parquet",
        _file("rows.parquet", "question,answer"),
        r"rows\.parquet: expected a Parquet file, found ",
    ),
    Case(
        "all_rows_duplicates",
        _all_duplicates,
        r"data: expected at least data\.min_rows=20 rows, found 1\n  duplicate: 29 \(e\.g\. .*repeats an earlier row\)",
    ),
    Case(
        "glob_matches_nothing",
        lambda t: (f"{{path: '{t / 'nothing-*.jsonl'}'}}", NO_FLOOR),
        rf"data\.sources\[0\]\.path: expected files matching '.*nothing-\*\.jsonl', {FOUND_NONE}",
    ),
    Case(
        "missing_file",
        lambda t: (f"{{path: '{t / 'missing.jsonl'}'}}", NO_FLOOR),
        r"data\.sources\[0\]\.path: expected a file, found nothing at '.*missing\.jsonl'",
    ),
    Case(
        "folder_as_file",
        lambda t: (f"{{path: '{t}'}}", NO_FLOOR),
        r"data\.sources\[0\]\.path: expected a file, found nothing at '.*' \(a folder: add a glob like /\*\.jsonl\)",
    ),
    Case(
        "gz_not_gzip",
        _file("rows.jsonl.gz", jsonl(GOOD)),
        r"rows\.jsonl\.gz: expected a gzip-compressed file, found Not a gzipped file",
    ),
    Case(
        "gz_truncated",
        _file("cut.jsonl.gz", gzip.compress(jsonl(GOOD).encode())[:60]),
        r"cut\.jsonl\.gz: expected a gzip-compressed file, found Compressed file ended before",
    ),
    Case(
        "unknown_extension",
        _file("rows.txt", jsonl(GOOD)),
        r"rows\.txt: expected a file ending in \.jsonl, \.ndjson, .*found '\.txt'; or set kind",
    ),
    Case("json_scalar", _file("rows.json", "42"), r"rows\.json: expected an array of objects, found number"),
    Case(
        "hf_folder_not_saved_dataset",
        _hf_not_saved,
        r"not-a-dataset: expected a folder written by save_to_disk, found ",
    ),
    Case(
        "hf_hub_dataset_offline",
        lambda t: ("{kind: hf, dataset: some-org/some-dataset}", NO_FLOOR),
        r"hub dataset 'some-org/some-dataset' \(split 'train'; no local folder of that name\): expected a loadable "
        r"dataset, found .*HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set",
    ),
    Case(
        "docs_package_missing",
        lambda t: ("{kind: docs, package: no_such_package_xyz}", NO_FLOOR),
        r"data\.sources: docs package 'no_such_package_xyz' is not installed",
    ),
]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (folders as '<dir>/': empty)."""
    return {
        path.relative_to(root).as_posix() + ("/" if path.is_dir() else ""): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
        for path in sorted(root.rglob("*"))
    }


def test_the_corpus_covers_every_reader_and_source_kind():
    assert len({case.id for case in CASES}) == len(CASES) >= 20
    covered = {case.id.split("_")[0] for case in CASES}
    assert {"jsonl", "csv", "parquet", "gz", "json", "hf", "docs", "glob", "missing"} <= covered, covered


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_data_is_refused_by_collect_with_its_name_and_nothing_is_committed(case: Case, tmp_path: Path):
    root = tmp_path / "store"
    store = LocalStore(root)
    staging = write(tmp_path / "seed", "rows.jsonl", jsonl(GOOD[:3]))  # a store holding real content already
    store.commit("collect/" + "0" * 32, Path(staging).parent, kind="collect", inputs={}, config={}, meta={"rows": 3})
    before = snapshot(root)
    data = tmp_path / "data"
    data.mkdir()
    source, sets = case.make(data)
    config = load_config(TINY, [f"store.uri={root}", f"data.sources=[{source}]", *sets])

    with pytest.raises(DataError) as raised:
        collect.fn(config=config.data, store=config.store, fingerprints=source_fingerprints(config.data, config.store))

    assert raised.match(case.message)
    assert snapshot(root) == before, "the failed stage left something in the store"
