"""Collect's pure core: every file format and schema, column mapping, drops with reasons, mixing, HF datasets."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, DataConfig, DocsSource, HFSource, JsonlSource, load_config
from pipeline.rows import DataError, is_text_row
from tasks.collect import collect_data, read_docs_source, source_fingerprints

PAIRS = [{"question": f"What is item {i}?", "answer": f"Item {i} is a thing number {i}."} for i in range(6)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def collect(*sources, **data):
    """(rows, report) for the given sources, with no row-count floor unless asked."""
    return collect_data(DataConfig(sources=list(sources), **{"min_rows": 1, **data}))


def qa(rows):
    return [(r["question"], r["answer"]) for r in rows]


def test_every_file_format_gives_the_same_rows(tmp_path):
    expected = [(p["question"], p["answer"]) for p in PAIRS]
    write_jsonl(tmp_path / "a.jsonl", PAIRS)
    (tmp_path / "b.json").write_text(json.dumps(PAIRS))
    (tmp_path / "c.json").write_text(json.dumps({"data": PAIRS}))
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["question", "answer"])
        writer.writeheader()
        writer.writerows(PAIRS)
    with (tmp_path / "e.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["question", "answer"], delimiter="\t")
        writer.writeheader()
        writer.writerows(PAIRS)
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "f.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in PAIRS))
    with gzip.open(tmp_path / "h.parquet.gz", "wb") as handle:  # gunzipped to a temporary file, then read
        handle.write((tmp_path / "f.parquet").read_bytes())
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet", "g.jsonl.gz", "h.parquet.gz"):
        rows, report = collect(JsonlSource(path=str(tmp_path / name)))
        assert qa(rows) == expected, name
        assert report["rows_read"] == 6 and report["dropped"] == {}, name
    rows, _ = collect(JsonlSource(path=str(tmp_path / "a.jsonl")))
    assert rows[0]["source"] == "jsonl:a.jsonl" and len(rows[0]["id"]) == 16


def test_several_files_a_glob_and_a_forced_format(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", PAIRS[:3])
    write_jsonl(tmp_path / "part2.jsonl", PAIRS[3:])
    (tmp_path / "data.txt").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    by_list, _ = collect(JsonlSource(path=[str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.jsonl")]))
    by_glob, report = collect(JsonlSource(path=str(tmp_path / "part*.jsonl")))
    assert qa(by_list) == qa(by_glob) == [(p["question"], p["answer"]) for p in PAIRS]
    assert report["sources"][0]["files_count"] == 2
    forced, _ = collect(JsonlSource(kind="jsonl", path=str(tmp_path / "data.txt")))
    assert len(forced) == 6
    with pytest.raises(DataError, match=r"data.txt: expected a file ending in .jsonl.*found '.txt'"):
        collect(JsonlSource(path=str(tmp_path / "data.txt")))


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"question": "Q?", "answer": "A."}, {"question": "Q?", "answer": "A."}),
        ({"instruction": "Sum.", "input": "1 2", "output": "3"}, {"question": "Sum.", "input": "1 2", "answer": "3"}),
        ({"instruction": "Greet.", "input": "", "output": "Hi"}, {"question": "Greet.", "answer": "Hi"}),
        (
            {"instruction": "Sum.", "context": "1 2", "response": "3"},
            {"question": "Sum.", "input": "1 2", "answer": "3"},
        ),
        ({"prompt": "P", "completion": "C"}, {"question": "P", "answer": "C"}),
        ({"input": "I", "output": "O"}, {"question": "I", "answer": "O"}),
        ({"Question ": "Q?", "ANSWER": "A."}, {"question": "Q?", "answer": "A."}),
        ({"text": "  Plain text.  "}, {"text": "Plain text."}),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            {
                "question": "Hi?",
                "answer": "Hello.",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            },
        ),
    ],
    ids=[
        "qa",
        "alpaca",
        "alpaca-no-input",
        "instruction-response",
        "prompt-completion",
        "input-output",
        "case-insensitive",
        "text",
        "messages",
    ],
)
def test_schema_detection(tmp_path, record, expected):
    rows, _ = collect(JsonlSource(path=str(write_jsonl(tmp_path / "d.jsonl", [record]))))
    row = {k: v for k, v in rows[0].items() if k not in ("id", "source")}
    assert row == expected


def test_explicit_mapping_overrides_detection(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "ignored", "answer": "ignored", "q": "Q?", "a": "A.", "ctx": "C"}]
    )
    rows, _ = collect(JsonlSource(path=str(path), question_key="q", answer_key="a", input_key="ctx"))
    assert (rows[0]["question"], rows[0]["answer"], rows[0]["input"]) == ("Q?", "A.", "C")
    rows, _ = collect(JsonlSource(path=str(path), text_key="q"))
    assert rows[0]["text"] == "Q?" and "answer" not in rows[0]
    with pytest.raises(ConfigError, match="expected one column mapping"):
        load_config(None, [f"data.sources=[{{kind: file, path: {path}, text_key: q, answer_key: a}}]"])


def test_bad_rows_are_dropped_and_counted_with_file_line_and_column(tmp_path):
    good = [{"question": f"Question number {i}?", "answer": "Fine."} for i in range(20)]
    bad = [
        {"question": "   ", "answer": "x"},  # line 21: empty
        {"question": "Number?", "answer": 42},  # line 22: non_string
        {"question": "Null?", "answer": None},  # line 23: missing (null)
        {"question": "No answer key?"},  # line 24: missing_field
        good[0],  # line 25: exact duplicate
        {"question": "QUESTION number 1 ?!", "answer": "Other."},  # line 26: near duplicate
        {"question": "Long?", "answer": "x" * 50},  # line 27: too long for max_chars=40
    ]
    path = write_jsonl(tmp_path / "faq.jsonl", good + bad)
    rows, report = collect(JsonlSource(path=str(path)), max_chars=40, max_bad_fraction=0.5)
    assert len(rows) == 20 and report["rows_read"] == 27
    assert report["dropped"] == {
        "empty": 1,
        "non_string": 1,
        "missing_field": 2,
        "duplicate": 1,
        "near_duplicate": 1,
        "too_long": 1,
    }
    assert report["examples"]["non_string"] == [f"{path}:22: column 'answer': expected text, found number"]
    assert report["examples"]["empty"][0].startswith(f"{path}:21: column 'question'")
    assert any(":24: column 'answer'" in e for e in report["examples"]["missing_field"])
    exact, _ = collect(JsonlSource(path=str(path)), max_chars=40, max_bad_fraction=0.5, dedupe="exact")
    assert len(exact) == 21, "dedupe: exact keeps the near-duplicate question"


def test_too_many_bad_rows_fail_with_reasons(tmp_path):
    records = [{"question": f"Q{i}?", "answer": {"nested": i}} for i in range(3)] + PAIRS
    path = write_jsonl(tmp_path / "faq.jsonl", records)
    with pytest.raises(
        DataError,
        match=r"max_bad_fraction=0.25 .* found 3 of 9 \(33%\):\n  non_string: 3 "
        rf"\(e.g. {path}:1: column 'answer': expected text, found object\)",
    ):
        collect(JsonlSource(path=str(path)))
    rows, _ = collect(JsonlSource(path=str(path)), max_bad_fraction=0.5)
    assert len(rows) == 6


def test_chat_rows_must_end_with_an_answer(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi?"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    ]
    _, report = collect(JsonlSource(path=str(write_jsonl(tmp_path / "chat.jsonl", records))), max_bad_fraction=1)
    assert report["dropped"] == {"bad_messages": 2} and report["rows"] == 1


def test_limit_streams_only_the_first_rows_of_a_large_gzip_corpus(tmp_path):
    path = tmp_path / "web.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i in range(20_000):
            handle.write(json.dumps({"text": f"Document {i} about topic {i % 97}."}) + "\n")
        handle.write("{this line is broken and never read\n")
    rows, report = collect(JsonlSource(path=str(path), limit=500))
    assert len(rows) == 500 and report["rows_read"] == 500 and rows[0]["text"] == "Document 0 about topic 0."


def test_weighted_mix_is_deterministic_and_proportional(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"A{i}?", "answer": "a"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"B{i}?", "answer": "b"} for i in range(30)])
    sources = (JsonlSource(path=str(a), weight=3), JsonlSource(path=str(b), weight=1))
    rows, report = collect(*sources)
    counts = {s: sum(1 for r in rows if r["source"] == f"jsonl:{s}.jsonl") for s in "ab"}
    assert counts == {"a": 90, "b": 30}, "b is the scarcest: 30 rows are a quarter of a mix of 120"
    assert report["not_drawn"] == 10
    assert collect(*sources)[0] == rows
    capped, _ = collect(*sources, max_rows=40)
    assert len(capped) == 40 and sum(1 for r in capped if r["answer"] == "b") == 10
    reseeded, _ = collect(*sources, seed=7)
    assert reseeded != rows and len(reseeded) == len(rows)
    with pytest.raises(ConfigError, match="expected a weight on every train source or on none"):
        load_config(None, [f"data.sources=[{{kind: file, path: {a}, weight: 1}}, {{kind: file, path: {b}}}]"])


def test_test_role_rows_are_marked_and_not_deduplicated_against_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    test = write_jsonl(tmp_path / "test.jsonl", PAIRS[:2])
    rows, report = collect(JsonlSource(path=str(train)), JsonlSource(path=str(test), role="test"))
    assert [r.get("role", "train") for r in rows] == ["train"] * 6 + ["test"] * 2
    assert report["dropped"] == {}, "a question in both splits is leakage, which split removes"


def test_hf_save_to_disk_folder_and_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(PAIRS[:4]), "validation": Dataset.from_list(PAIRS[4:])}).save_to_disk(
        str(tmp_path / "dict")
    )
    rows, _ = collect(HFSource(dataset=str(tmp_path / "one")))
    assert qa(rows) == [(p["question"], p["answer"]) for p in PAIRS]
    rows, _ = collect(HFSource(dataset=str(tmp_path / "dict"), split="validation"))
    assert len(rows) == 2 and rows[0]["source"] == "hf:dict[validation]"
    with pytest.raises(DataError, match=r"expected split 'test', found splits \['train', 'validation'\]"):
        collect(HFSource(dataset=str(tmp_path / "dict"), split="test"))


def test_hub_dataset_fails_fast_and_clearly_offline():
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:  # read once at import; tests/conftest.py sets it unless told otherwise
        pytest.skip("the hub may be reachable: HF_HUB_OFFLINE is not set")
    with pytest.raises(
        DataError, match=r"hub dataset 'tatsu-lab/alpaca' \(split 'train'.*HF_HUB_OFFLINE.*save_to_disk"
    ):
        collect(HFSource(dataset="tatsu-lab/alpaca"))


def test_docs_source_replays_general_text_not_the_benchmark():
    from pipeline.assets import arc_data_dir

    rows = read_docs_source(DocsSource(phrasings=1, max_objects=2, offtopic=2, near_domain=0, replay=3))
    replayed = [r for r in rows if r["source"] == "replay:wikipedia"]
    assert len(replayed) == 3 and rows[-3:] == replayed
    # Plain text: no question to answer or decline, loss on every token.
    assert all(is_text_row(r) and len(r["text"].split()) >= 20 for r in replayed)
    arc_text = " ".join((arc_data_dir() / "arc_easy" / f"{split}.jsonl").read_text() for split in ("train", "test"))
    assert not any(r["text"][:60] in arc_text for r in replayed), "replay must not come from the gated benchmark"


def test_fingerprints_follow_file_content_and_never_raise(tmp_path):
    path = write_jsonl(tmp_path / "faq.jsonl", PAIRS)
    config = DataConfig(sources=[JsonlSource(path=str(path)), JsonlSource(path=str(tmp_path / "missing.jsonl"))])
    first = source_fingerprints(config)
    assert first["1"].startswith("unavailable")
    write_jsonl(path, PAIRS[:3])
    assert source_fingerprints(config)["0"] != first["0"]
