"""The quality report and gate of validate: figures, thresholds, markdown and the token-length plot."""

import pytest

from pipeline.config import DataConfig
from pipeline.rows import DataError
from tasks.validate import check_quality, length_stats, plot_token_lengths, quality_markdown, quality_report, vocabulary

COLLECT = {
    "rows_read": 10,
    "rows": 7,
    "dropped": {"duplicate": 2, "empty": 1},
    "examples": {"duplicate": ["faq.jsonl:4: repeats"], "empty": ["faq.jsonl:9: column 'answer': empty"]},
}
TOKENIZE = {
    "rows_in": 7,
    "rows": 6,
    "truncated": 2,
    "max_length": 32,
    "dropped": {"answer_truncated": 1},
    "examples": {"answer_truncated": ["row x: no answer token is left"]},
}
COLUMNS = {
    "role": ["train"] * 5 + ["test"],
    "question": ["What is a?", "What is b?", "What is c?", "Why d?", "How e?", ""],
    "completion": ["Refused.", "Refused.", "Refused.", "B is b.", "E is e.", "Plain text row."],
    "prompt_tokens": [5, 6, 7, 8, 9, 0],
    "answer_tokens": [2, 2, 2, 4, 4, 3],
    "input_ids": [[1, 2, 3], [1, 2], [4], [5, 6], [7], [8, 9, 9]],
}


def test_report_counts_rows_reasons_lengths_duplicates_and_diversity():
    report = quality_report(COLLECT, TOKENIZE, COLUMNS)
    assert report["rows_read"] == 10 and report["rows"] == 6 and report["rows_by_role"] == {"train": 5, "test": 1}
    assert report["dropped"] == {"duplicate": 2, "empty": 1, "answer_truncated": 1}
    assert report["dropped_share"] == 0.4 and report["duplicate_rate"] == 0.2
    assert report["steps"] == [
        {"step": "collect", "rows_in": 10, "rows_out": 7},
        {"step": "tokenize", "rows_in": 7, "rows_out": 6},
    ]
    assert report["tokens"]["prompt"] == {"count": 6, "mean": 5.8, "min": 0, "p50": 6, "p90": 9, "p99": 9, "max": 9}
    assert report["top_answers"] == [{"text": "Refused.", "count": 3}]
    assert report["diversity"]["distinct_token_ids"] == 9
    assert report["diversity"]["question"]["words"] == 13  # the text row has no question


def test_vocabulary_and_length_stats_edge_cases():
    assert vocabulary(["the the the", "cat"]) == {"words": 4, "distinct": 2, "type_token_ratio": 0.5}
    assert vocabulary([]) == {"words": 0, "distinct": 0, "type_token_ratio": 0.0}
    assert length_stats([]) == {"count": 0}


def test_gate_fails_on_bad_share_and_on_too_few_rows():
    report = quality_report(COLLECT, TOKENIZE, COLUMNS)
    with pytest.raises(
        DataError,
        match=r"max_bad_fraction=0.25 .* found 4 of 10 \(40%\) after collect and tokenize:\n"
        r"  duplicate: 2 \(e.g. faq.jsonl:4: repeats\)",
    ):
        check_quality(report, DataConfig(max_bad_fraction=0.25, min_rows=1))
    with pytest.raises(DataError, match=r"expected at least data.min_rows=20 rows, found 6 after collect and tokenize"):
        check_quality(report, DataConfig(max_bad_fraction=0.5, min_rows=20))
    check_quality(report, DataConfig(max_bad_fraction=0.5, min_rows=6))


def test_markdown_and_plot(tmp_path):
    report = quality_report(COLLECT, TOKENIZE, COLUMNS)
    markdown = quality_markdown(report)
    assert (
        "| collect | 10 | 7 |" in markdown and "| answer_truncated | 1 | row x: no answer token is left |" in markdown
    )
    assert "| prompt | 5.8 | 0 | 6 | 9 | 9 | 9 |" in markdown and "| Refused. | 3 |" in markdown
    plot_token_lengths(COLUMNS, 32, tmp_path / "lengths.png")
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
