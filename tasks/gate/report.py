"""The gate's tables and report: side-by-side rows, worst answers per category, the markdown report, the UI.

`report_markdown` writes the evaluation report (gates with intervals, metrics, plots, categories, worst answers,
ranking); `publish` puts the report, the first side-by-side rows and the ranking into the Prefect UI.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.answers import CATEGORIES

SIDE_BY_SIDE_ROWS = 20
"""Rows of the side-by-side table shown in the UI; the store keeps all of them."""
WORST_PER_CATEGORY = 5


def side_by_side(base_rows: Sequence[Mapping[str, Any]], tuned_rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per test question (fine-tuned order, matched to the base by row id): question, target, both answers,
    both similarities and both error categories."""
    base = {row["id"]: row for row in base_rows}
    rows = []
    for row in tuned_rows:
        other = base.get(row["id"], {})
        rows.append(
            {
                "question": row["question"],
                "target": row["target"],
                "base_answer": other.get("answer"),
                "tuned_answer": row["answer"],
                "base_similarity": other.get("similarity"),
                "tuned_similarity": row["similarity"],
                "base_category": other.get("category"),
                "tuned_category": row["category"],
            }
        )
    return rows


def worst_answers(
    rows: Sequence[Mapping[str, Any]], per_category: int = WORST_PER_CATEGORY
) -> dict[str, list[Mapping[str, Any]]]:
    """For each error category (not `ok`), its `per_category` answers least similar to their targets."""
    worst = {}
    for category in CATEGORIES:
        if category == "ok":
            continue
        members = sorted((r for r in rows if r["category"] == category), key=lambda r: (r["similarity"], r["question"]))
        if members:
            worst[category] = members[:per_category]
    return worst


def _cell(value: Any) -> str:
    """A markdown table cell: floats to 3 decimals, None as n/a, text without pipes or newlines."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:200]


def _png(png: bytes | None, alt: str) -> list[str]:
    return [f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})", ""] if png else []


def verdict_lines(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: gate, estimate with interval, n, method, McNemar p, MDE, verdict (and who decided)."""
    lines = [
        "| gate | estimate | interval | n | method | McNemar p | MDE (80% power) | verdict |",
        "|---|---:|---|---:|---|---:|---:|---|",
    ]
    for v in verdicts:
        outcome = (
            v["verdict"]
            if v["decided_by"] == "interval"
            else f"inconclusive -> **{v['decision']}** (gates_on_inconclusive)"
        )
        if v["decision"] == "pending":
            outcome = f"inconclusive (about {v['items_to_decide'] or '?'} items would decide)"
        lines.append(
            f"| `{v['gate']}` | {v['estimate']:+.3f} | [{v['low']:+.3f}, {v['high']:+.3f}] at "
            f"{v['confidence']:.1%} | {v['n']} | {v['method']} | {_cell(v.get('p_value'))} | "
            f"{_cell(v.get('mde'))} | {outcome} |"
        )
    return lines


def report_markdown(
    verdicts: Sequence[dict],
    status: str,
    look: int,
    looks: int,
    tuned: Mapping[str, float],
    base: Mapping[str, float],
    worst: Mapping[str, Sequence[Mapping]],
    ranking: Sequence[dict],
    pngs: Mapping[str, bytes],
    counts: Mapping[str, Mapping[str, int]],
    judged_by: str,
    confidence: float = 0.95,
) -> str:
    """The evaluation report: status, gates with intervals, metrics, plots, categories, worst answers, ranking."""
    lines = [
        "# Evaluation report",
        "",
        f"Status: **{status}** (benchmark look {look} of {looks})",
        "",
        "## Gates",
        "",
        *verdict_lines(verdicts),
        "",
        *_png(pngs.get("intervals"), "gate intervals against thresholds"),
        "## Base vs fine-tuned (point figures; the gates above carry the intervals)",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {base[name]:.3f} | {tuned[name]:.3f} | {tuned[name] - base[name]:+.3f} |"
        for name in sorted(tuned)
        if name in base
    ]
    lines += [
        "",
        *_png(pngs.get("comparison"), "base vs fine-tuned"),
        "## Error categories (test answers)",
        "",
        "| category | base | fine-tuned |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {counts['base'].get(c, 0)} | {counts['fine_tuned'].get(c, 0)} |" for c in CATEGORIES]
    lines += ["", f"## Worst fine-tuned answers per category (up to {WORST_PER_CATEGORY}, least similar first)", ""]
    for category, rows in worst.items():
        lines += [f"### {category}", "", "| question | target | answer | similarity |", "|---|---|---|---:|"]
        lines += [
            f"| {_cell(r['question'])} | {_cell(r['target'])} | {_cell(r['answer'])} | {r['similarity']:.3f} |"
            for r in rows
        ]
        lines.append("")
    if not worst:
        lines += ["No fine-tuned answer fell into an error category.", ""]
    lines += [
        f"## Ranking (Bradley-Terry over all pairwise games, Elo scale, judged by {judged_by})",
        "",
        f"| rank | version | rating | {confidence:.0%} interval | games | wins | draws | losses | mean similarity |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['rank']} | {r['label']} | {r['rating']:.1f} | [{r['low']:.1f}, {r['high']:.1f}] | {r['games']} | "
        f"{r['wins']} | {r['draws']} | {r['losses']} | {_cell(r['mean_similarity'])} |"
        for r in ranking
    ]
    return "\n".join(lines) + "\n"


def publish(folder: Path) -> None:
    """Put a gate output's report, first side-by-side rows and ranking into the Prefect UI."""
    create_markdown_artifact(
        markdown=(folder / "report.md").read_text(encoding="utf-8"),
        key="evaluation-report",
        description="Gates with intervals, metrics, plots, worst answers, ranking",
    )
    rows = pq.read_table(folder / "side_by_side.parquet").slice(0, SIDE_BY_SIDE_ROWS).to_pylist()
    create_table_artifact(
        table=rows,
        key="side-by-side",
        description=f"First {SIDE_BY_SIDE_ROWS} test questions: base vs fine-tuned (all in side_by_side.csv)",
    )
    ranking = json.loads((folder / "ranking.json").read_text(encoding="utf-8"))
    create_table_artifact(
        table=ranking,
        key="model-ranking",
        description="Model versions ranked by Bradley-Terry over pairwise answers (Elo scale)",
    )
