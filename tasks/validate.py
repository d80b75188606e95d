"""Stage 3b, validate: the data quality report, and the gate that stops a run on bad data.

In: the collect artifact (`report.json`: rows read, rows dropped by reason), the
tokenize artifact (`tokens.parquet`, `report.json`) and `DataConfig` (the thresholds).
Out: `quality.json` and `token_lengths.png`, and a markdown artifact in the Prefect UI
(key `data-quality`):

* rows in and out of each step, and dropped rows per reason (empty, non_string,
  missing_field, bad_messages, too_long, duplicate, near_duplicate, over_length,
  answer_truncated) with examples naming file, line and column;
* token-length distributions of prompts (the question in its template) and answers;
* duplicate rate, vocabulary diversity of questions and answers, the most repeated answers.

The tokenized rows are read `BATCH_ROWS` at a time and tallied (lengths and words as counts, repeated answers
as digests on disk: `pipeline.digests`), so memory stays flat however many rows there are.

The run fails here, with nothing stored for this stage, when more than
`data.max_bad_fraction` of the rows read were dropped or fewer than `data.min_rows`
remain. The markdown report is still shown in the UI, so the failure can be read there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.digests import DigestLog
from pipeline.progress import Progress
from pipeline.rows import BATCH_ROWS, EXAMPLES_PER_REASON, check_drop_budget, parquet_file
from pipeline.stage import stage_task

TOP_ANSWERS = 5
_WORD = re.compile(r"\w+")


def length_stats(values: Iterable[int]) -> dict[str, float]:
    """count, mean, min, p50, p90, p99 and max of some lengths (nearest-rank percentiles)."""
    return counted_length_stats(Counter(values))


def counted_length_stats(counts: Mapping[int, int]) -> dict[str, float]:
    """`length_stats` of lengths given as length -> how many rows have it (memory: one entry per distinct length)."""
    total = sum(counts.values())
    if not total:
        return {"count": 0}
    ordered = sorted(counts.items())

    def rank(p: float) -> int:
        position, seen = max(0, math.ceil(p * total) - 1), 0
        for value, count in ordered:
            seen += count
            if seen > position:
                return value
        return ordered[-1][0]

    return {
        "count": total,
        "mean": round(sum(v * c for v, c in ordered) / total, 1),
        "min": ordered[0][0],
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": ordered[-1][0],
    }


def word_counts(texts: Iterable[str], counts: Counter | None = None) -> Counter:
    """Lower-cased words of `texts` counted (added to `counts` when given)."""
    counts = Counter() if counts is None else counts
    for text in texts:
        counts.update(word.lower() for word in _WORD.findall(text))
    return counts


def vocabulary(texts: Iterable[str] | Counter) -> dict[str, float]:
    """Words, distinct words and their ratio (type-token ratio: 1.0 means no word repeats), of texts or of
    `word_counts`."""
    counts = texts if isinstance(texts, Counter) else word_counts(texts)
    words = sum(counts.values())
    return {
        "words": words,
        "distinct": len(counts),
        "type_token_ratio": round(len(counts) / words, 4) if words else 0.0,
    }


def _shorten(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def merge_drops(*reports: dict[str, Any]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Dropped-row counts and examples of several stage reports, added up by reason."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for report in reports:
        counts.update(report.get("dropped", {}))
        for reason, quoted in report.get("examples", {}).items():
            examples.setdefault(reason, []).extend(quoted)
    return dict(counts.most_common()), {r: q[:EXAMPLES_PER_REASON] for r, q in examples.items()}


class QualityTally:
    """The quality report's figures, tallied batch by batch: memory grows with distinct lengths, words and token
    ids, not with rows (repeated answers are counted as digests on disk, in `workdir`)."""

    def __init__(self, workdir: Path) -> None:
        """In: an empty folder for the answers' digests."""
        self.roles: Counter = Counter()
        self.lengths: dict[str, Counter] = {name: Counter() for name in ("prompt_tokens", "answer_tokens", "sequence")}
        self.words: dict[str, Counter] = {"question": Counter(), "answer": Counter()}
        self.token_ids: set[int] = set()
        self.answers = DigestLog(workdir / "answers")

    def add(self, columns: Mapping[str, list]) -> None:
        """Tally one batch of tokenized rows (`REPORT_COLUMNS`, as lists)."""
        self.roles.update(columns["role"])
        self.lengths["prompt_tokens"].update(columns["prompt_tokens"])
        self.lengths["answer_tokens"].update(columns["answer_tokens"])
        self.lengths["sequence"].update(map(len, columns["input_ids"]))
        word_counts((q for q in columns["question"] if q), self.words["question"])
        word_counts(columns["completion"], self.words["answer"])
        self.token_ids.update(chain.from_iterable(columns["input_ids"]))
        for text in columns["completion"]:
            self.answers.add(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest())

    def top_answers(self, completions: Callable[[], Iterable[str]], n: int = TOP_ANSWERS) -> list[dict[str, Any]]:
        """The `n` most repeated answers (only those seen more than once; ties: the first seen), shortened to 120
        characters. `completions()` gives every answer again, in the order they were added (to fetch the texts)."""
        common = self.answers.most_common(n)
        wanted = {first for _, first in common}
        texts = {i: text for i, text in enumerate(completions()) if i in wanted}
        return [{"text": _shorten(texts[first]), "count": count} for count, first in common]

    def report(
        self, collect_report: dict[str, Any], tokenize_report: dict[str, Any], completions: Callable[[], Iterable[str]]
    ) -> dict[str, Any]:
        """The quality report (see the module docstring) from the tallies and the two stage reports."""
        read = collect_report["rows_read"]
        dropped, examples = merge_drops(collect_report, tokenize_report)
        rows = sum(self.roles.values())
        duplicates = dropped.get("duplicate", 0) + dropped.get("near_duplicate", 0)
        return {
            "rows_read": read,
            "rows": rows,
            "rows_by_role": dict(self.roles),
            "steps": [
                {"step": "collect", "rows_in": read, "rows_out": collect_report["rows"]},
                {"step": "tokenize", "rows_in": tokenize_report["rows_in"], "rows_out": rows},
            ],
            "dropped": dropped,
            "dropped_share": round(sum(dropped.values()) / read, 4) if read else 0.0,
            "examples": examples,
            "not_drawn": collect_report.get("not_drawn", 0),
            "duplicate_rate": round(duplicates / read, 4) if read else 0.0,
            "truncated": tokenize_report.get("truncated", 0),
            "max_length": tokenize_report.get("max_length"),
            "tokens": {
                "prompt": counted_length_stats(self.lengths["prompt_tokens"]),
                "answer": counted_length_stats(self.lengths["answer_tokens"]),
                "sequence": counted_length_stats(self.lengths["sequence"]),
            },
            "diversity": {
                "question": vocabulary(self.words["question"]),
                "answer": vocabulary(self.words["answer"]),
                "distinct_token_ids": len(self.token_ids),
            },
            "top_answers": self.top_answers(completions),
            "sources": collect_report.get("sources", []),
        }


def quality_report(
    collect_report: dict[str, Any], tokenize_report: dict[str, Any], columns: dict[str, list]
) -> dict[str, Any]:
    """The quality report of a data set held in memory (the stage tallies the same way, batch by batch).

    In: collect's report.json, tokenize's report.json and the tokenized columns
    (`role`, `question`, `completion`, `prompt_tokens`, `answer_tokens`, `input_ids`).
    Out: a JSON-able dict (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as workdir:
        tally = QualityTally(Path(workdir))
        tally.add(columns)
        return tally.report(collect_report, tokenize_report, lambda: columns["completion"])


def tokens_quality(
    collect_report: dict[str, Any], tokenize_report: dict[str, Any], tokens: Path, batch_rows: int = BATCH_ROWS
) -> tuple[dict[str, Any], dict[str, Counter]]:
    """The quality report of a tokens.parquet file, read `batch_rows` at a time; out: (report, the length counts
    for `plot_token_lengths`)."""
    parquet = parquet_file(tokens)
    progress = Progress("validate", parquet.metadata.num_rows, unit="rows")

    def completions() -> Iterable[str]:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=["completion"]):
            yield from batch.column(0).to_pylist()

    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as workdir:
        tally = QualityTally(Path(workdir))
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(REPORT_COLUMNS)):
            tally.add({name: batch.column(name).to_pylist() for name in REPORT_COLUMNS})
            progress.advance(batch.num_rows)
        report = tally.report(collect_report, tokenize_report, completions)
    progress.finish()
    return report, tally.lengths


def check_quality(report: dict[str, Any], config: DataConfig) -> None:
    """Raise DataError when more than `max_bad_fraction` of the rows read were dropped, or fewer than `min_rows`
    remain."""
    dropped, read = sum(report["dropped"].values()), report["rows_read"]
    reasons = "\n".join(
        f"  {reason}: {count} (e.g. {report['examples'][reason][0]})"
        for reason, count in report["dropped"].items()
        if report["examples"].get(reason)
    )
    check_drop_budget(
        read,
        dropped,
        report["rows"],
        reasons,
        config,
        after="collect and tokenize",
        advice="Fix the data, raise tokenize.max_length, or raise data.max_bad_fraction.",
    )


def quality_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables for the Prefect UI."""
    lines = ["## Data quality", "", "| step | rows in | rows out |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rows_in']} | {s['rows_out']} |" for s in report["steps"]]
    lines += [
        "",
        f"Dropped {sum(report['dropped'].values())} of {report['rows_read']} rows read "
        f"({report['dropped_share']:.1%}); duplicate rate {report['duplicate_rate']:.1%}; "
        f"{report['truncated']} rows truncated; rows by role: {report['rows_by_role']}.",
        "",
    ]
    if report["dropped"]:
        lines += ["| reason | rows | example |", "|---|---|---|"]
        lines += [
            f"| {reason} | {count} | {_cell((report['examples'].get(reason) or [''])[0])} |"
            for reason, count in report["dropped"].items()
        ]
        lines.append("")
    lines += ["| tokens | mean | min | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for name, stats in report["tokens"].items():
        if stats.get("count"):
            lines.append(
                f"| {name} | {stats['mean']} | {stats['min']} | {stats['p50']} | {stats['p90']} | "
                f"{stats['p99']} | {stats['max']} |"
            )
    div = report["diversity"]
    lines += ["", "| vocabulary | words | distinct | type-token ratio |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {div[name]['words']} | {div[name]['distinct']} | {div[name]['type_token_ratio']} |"
        for name in ("question", "answer")
    ]
    lines += ["", f"Distinct token ids: {div['distinct_token_ids']}."]
    if report["top_answers"]:
        lines += ["", "| most repeated answers | count |", "|---|---|"]
        lines += [f"| {_cell(a['text'])} | {a['count']} |" for a in report["top_answers"]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def plot_token_lengths(columns: Mapping[str, list[int] | Counter], max_length: int | None, path: Path) -> None:
    """Save histograms of prompt and answer lengths in tokens (with the token budget marked) to a PNG.

    In: `prompt_tokens` and `answer_tokens`, each a list of lengths or a Counter of them (length -> rows)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, name, title in (
        (axes[0], "prompt_tokens", "prompt (question in its template)"),
        (axes[1], "answer_tokens", "answer"),
    ):
        counts = columns[name] if isinstance(columns[name], Counter) else Counter(columns[name])
        axis.hist(list(counts), weights=list(counts.values()), bins=40, color="#4C72B0")
        if max_length:
            axis.axvline(max_length, color="#C44E52", linestyle="--", label=f"max_length {max_length}")
            axis.legend()
        axis.set_title(title)
        axis.set_xlabel("tokens")
        axis.set_ylabel("rows")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


REPORT_COLUMNS = ("role", "question", "completion", "prompt_tokens", "answer_tokens", "input_ids")


@stage_task("validate")
def validate(collected: Path, tokenized: Path, config: DataConfig, out: Path) -> dict[str, Any]:
    """Write the data quality report (`out/quality.json`, `token_lengths.png`) and fail the run on too much bad
    data; returns the figures."""
    from prefect.artifacts import create_markdown_artifact

    collect_report = json.loads((collected / "report.json").read_text(encoding="utf-8"))
    tokenize_report = json.loads((tokenized / "report.json").read_text(encoding="utf-8"))
    report, lengths = tokens_quality(collect_report, tokenize_report, tokenized / "tokens.parquet")
    create_markdown_artifact(
        markdown=quality_markdown(report),
        key="data-quality",
        description="Rows dropped by reason, token lengths, duplicates, diversity",
    )
    check_quality(report, config)
    (out / "quality.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_token_lengths(lengths, report["max_length"], out / "token_lengths.png")
    return {
        "rows": report["rows"],
        "dropped": report["dropped"],
        "dropped_share": report["dropped_share"],
        "duplicate_rate": report["duplicate_rate"],
    }
