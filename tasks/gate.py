"""Stage 8, gate: compare model versions side by side, rank them by Elo, check the gates.

In: the evaluate artifacts of the base and the fine-tuned model, their benchmark
artifacts, the list of `Gate`s and, optionally, the evaluate artifacts of every model
version the run produced (base first, then each round), which the Elo ranks.
Out: `verdicts.json` (each gate: measured value, threshold, pass/fail),
`metrics.json` (every gate-able metric for both models), `side_by_side.parquet` and
`.csv` (question, target, both answers, both similarities, both categories: the
whole test set, for manual inspection), `elo.json`, `comparison.png` (bar plot) and
`report.md` (aggregate metrics, the plot, benchmark figures, the five worst answers
per error category, the Elo table, the verdicts). The report, the first rows of the
side-by-side table and the Elo table go to the Prefect UI as artifacts. The flow,
not this stage, decides what a failed gate does to the run.

Elo: every pair of versions plays one game per test question both answered (same
question text); the judge (by default: the answer closer to the target in embedding
similarity wins, within 0.02 it is a draw) returns 1, 0.5 or 0 for the first
version. Questions are taken in sorted order and pairs in list order, so the
ratings are deterministic. Any callable with the same signature (e.g. an LLM
judge) can replace the default.
"""

from __future__ import annotations

import base64
import csv
import json
import operator
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import BENCHMARK_METRICS, EVAL_METRICS, EloConfig, Gate, StoreConfig, import_function
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task
from tasks.benchmark import format_benchmark_table
from tasks.evaluate import CATEGORIES, normalise_answer

VERSION = "3"
OPERATORS = {">=": operator.ge, "<=": operator.le}

ELO_START = 1000.0
ELO_K = 16.0
DRAW_MARGIN = EloConfig().draw_margin
"""Metric difference within which a metric judge calls a draw (e.g. embedding noise); `elo.draw_margin`."""

SIDE_BY_SIDE_ROWS = 20
"""Rows of the side-by-side table shown in the UI; the store keeps all of them."""
WORST_PER_CATEGORY = 5
PLOTTED_EVAL_METRICS = ("exact_match", "similarity_mean", "rouge_l", "token_f1", "refusal_rate", "ok_rate",
                        "too_short_rate", "repetition_rate", "off_topic_rate", "not_declined_rate")

Judge = Callable[[Mapping[str, Any], Mapping[str, Any]], float]
"""judge(row_a, row_b) -> 1.0 when version A's answer is better, 0.5 for a draw, 0.0 when B's is.
Rows carry question, target, answer and similarity (to the target)."""


class GateMetricMissing(KeyError):
    """A gate names a metric the evaluation did not measure (e.g. refusal_rate with no probes)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# --------------------------------------------------------------------------- metrics and gates


def flatten_metrics(eval_summary: Mapping[str, Any], benchmark_result: Mapping[str, Any]) -> dict[str, float]:
    """Metrics under the names gates use: eval.<EVAL_METRICS> and benchmark.<task>.<acc|acc_norm>."""
    metrics = {f"eval.{name}": float(eval_summary[name]) for name in EVAL_METRICS if eval_summary.get(name) is not None}
    for task, scores in benchmark_result.get("tasks", {}).items():
        for name in BENCHMARK_METRICS:
            if scores.get(name) is not None:
                metrics[f"benchmark.{task}.{name}"] = float(scores[name])
    return metrics


def check_gates(gates: Sequence[Gate], tuned: Mapping[str, float], base: Mapping[str, float]) -> list[dict]:
    """One verdict per gate: the measured value (a difference for relative gates), the threshold, pass or fail.

    Raises GateMetricMissing naming the metric and the measured ones when a gate's metric is absent.
    """
    verdicts = []
    for gate in gates:
        for side, metrics in (("fine-tuned", tuned), ("base", base)) if gate.relative_to_base else (("fine-tuned", tuned),):
            if gate.metric not in metrics:
                raise GateMetricMissing(
                    f"gate {gate.describe()!r}: {gate.metric} was not measured for the {side} model "
                    f"(measured: {', '.join(sorted(metrics))})"
                )
        measured = tuned[gate.metric] - base[gate.metric] if gate.relative_to_base else tuned[gate.metric]
        verdicts.append(
            {"gate": gate.describe(), "metric": gate.metric, "measured": round(measured, 6), "threshold": gate.value,
             "passed": bool(OPERATORS[gate.op](measured, gate.value))}
        )
    return verdicts


# --------------------------------------------------------------------------- side by side


def side_by_side(base_rows: Sequence[Mapping[str, Any]], tuned_rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per test question (fine-tuned order, matched to the base by row id): question, target, both answers,
    both similarities and both error categories."""
    base = {row["id"]: row for row in base_rows}
    rows = []
    for row in tuned_rows:
        other = base.get(row["id"], {})
        rows.append({
            "question": row["question"], "target": row["target"],
            "base_answer": other.get("answer"), "tuned_answer": row["answer"],
            "base_similarity": other.get("similarity"), "tuned_similarity": row["similarity"],
            "base_category": other.get("category"), "tuned_category": row["category"],
        })
    return rows


def worst_answers(rows: Sequence[Mapping[str, Any]], per_category: int = WORST_PER_CATEGORY) -> dict[str, list[Mapping[str, Any]]]:
    """For each error category (not `ok`), its `per_category` answers least similar to their targets."""
    worst = {}
    for category in CATEGORIES:
        if category == "ok":
            continue
        members = sorted((r for r in rows if r["category"] == category), key=lambda r: (r["similarity"], r["question"]))
        if members:
            worst[category] = members[:per_category]
    return worst


# --------------------------------------------------------------------------- Elo


def metric_judge(metric: str = "similarity", margin: float = DRAW_MARGIN) -> Judge:
    """A judge by one per-answer metric: 1.0 when `a` beats `b` on it by more than `margin`, 0.0 the reverse, else 0.5."""

    def judge(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
        diff = float(a[metric]) - float(b[metric])
        return 0.5 if abs(diff) <= margin else (1.0 if diff > 0 else 0.0)

    return judge


similarity_judge: Judge = metric_judge("similarity")
"""The default judge: the answer closer to the target in embedding space wins."""


def make_judge(config: EloConfig) -> Judge:
    """The judge `config.judge` names: a per-answer metric, or a 'package.module:function' (imported here)."""
    if ":" not in config.judge:
        return metric_judge(config.judge, config.draw_margin)
    return import_function(config.judge)


def _expected(rating_a: float, rating_b: float) -> float:
    """Elo's expected score of A against B."""
    return 1.0 / (1.0 + 10 ** ((rating_b - rating_a) / 400.0))


def elo_tournament(
    versions: Sequence[Sequence[Mapping[str, Any]]],
    labels: Sequence[str],
    judge: Judge = similarity_judge,
    k: float = ELO_K,
    start: float = ELO_START,
) -> list[dict[str, Any]]:
    """Elo ratings of model versions from pairwise games on the questions each pair answered.

    In: one list of answer rows per version (question, target, answer, similarity),
    their labels, a judge. Out: one row per version, best first (ties keep list
    order): rank, label, rating, games, wins, draws, losses, mean similarity.
    Deterministic: questions in sorted order, pairs in list order.
    """
    if len(versions) != len(labels):
        raise ValueError(f"elo: expected one label per version, found {len(labels)} labels for {len(versions)} versions")
    by_question = [{normalise_answer(row["question"]): row for row in rows} for rows in versions]
    ratings = [start] * len(versions)
    record = [{"wins": 0, "draws": 0, "losses": 0} for _ in versions]
    for question in sorted(set().union(*by_question)) if by_question else []:
        for i, j in combinations(range(len(versions)), 2):
            if question not in by_question[i] or question not in by_question[j]:
                continue
            score = judge(by_question[i][question], by_question[j][question])
            expected = _expected(ratings[i], ratings[j])
            ratings[i] += k * (score - expected)
            ratings[j] -= k * (score - expected)
            for side, points in ((i, score), (j, 1.0 - score)):
                record[side]["wins" if points == 1.0 else "losses" if points == 0.0 else "draws"] += 1
    table = []
    for index, (label, rows) in enumerate(zip(labels, versions)):
        sims = [float(r["similarity"]) for r in rows]
        table.append({"label": label, "rating": round(ratings[index], 1), "games": sum(record[index].values()),
                      **record[index], "mean_similarity": round(sum(sims) / len(sims), 4) if sims else None,
                      "_order": index})
    table.sort(key=lambda row: (-row["rating"], row["_order"]))
    return [{"rank": rank, **{key: value for key, value in row.items() if key != "_order"}} for rank, row in enumerate(table, 1)]


def version_labels(metas: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label per evaluated version: its model name ('tiny-neox', 'fine-tuned'), repeats numbered '#2', '#3'."""
    seen: dict[str, int] = {}
    labels = []
    for index, meta in enumerate(metas):
        name = str(meta.get("model", f"model {index}"))
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


# --------------------------------------------------------------------------- report


def plot_comparison(metrics: Mapping[str, Mapping[str, float]], names: Sequence[str], path: Path) -> None:
    """Grouped bar plot of `names` for each model label in `metrics`, saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    shown = [n for n in names if all(n in m for m in metrics.values())]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(shown) + 2), 4), dpi=100)
    for offset, (label, values) in enumerate(metrics.items()):
        xs = [i + offset * width for i in range(len(shown))]
        ax.bar(xs, [values[n] for n in shown], width, label=label)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(shown))])
    ax.set_xticklabels([n.removeprefix("eval.").removeprefix("benchmark.") for n in shown], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, *(v[n] for v in metrics.values() for n in shown)) if shown else 0.0, 1.0)
    ax.set_title("Base vs fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp in the file
    plt.close(fig)


def _cell(value: Any) -> str:
    """A markdown table cell: floats to 3 decimals, None as n/a, text without pipes or newlines."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:200]


def metrics_table(tuned: Mapping[str, float], base: Mapping[str, float]) -> list[str]:
    """Markdown rows: every metric both sides have, base, fine-tuned and the change."""
    lines = ["| metric | base | fine-tuned | change |", "|---|---:|---:|---:|"]
    for name in sorted(tuned):
        if name in base:
            lines.append(f"| {name} | {base[name]:.3f} | {tuned[name]:.3f} | {tuned[name] - base[name]:+.3f} |")
    return lines


def report_markdown(
    tuned: Mapping[str, float], base: Mapping[str, float], verdicts: Sequence[dict], worst: Mapping[str, Sequence[Mapping]],
    elo: Sequence[dict], benchmark_table: str, plot_png: bytes | None, counts: Mapping[str, Mapping[str, int]],
    judged_by: str = "similarity",
) -> str:
    """The evaluation report: gates, metrics, plot, benchmark figures, categories, worst answers, Elo (judged by `judged_by`)."""
    lines = ["# Evaluation report", "", "## Gates", "", "| gate | measured | verdict |", "|---|---:|---|"]
    lines += [f"| `{v['gate']}` | {v['measured']:.3f} | {'pass' if v['passed'] else '**FAIL**'} |" for v in verdicts]
    lines += ["", "## Base vs fine-tuned", "", *metrics_table(tuned, base), ""]
    if plot_png:
        lines += [f"![base vs fine-tuned](data:image/png;base64,{base64.b64encode(plot_png).decode('ascii')})", ""]
    lines += ["## Benchmarks (lm-eval)", "", benchmark_table, "## Error categories (test answers)", "",
              "| category | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {c} | {counts['base'].get(c, 0)} | {counts['fine_tuned'].get(c, 0)} |" for c in CATEGORIES]
    lines += ["", f"## Worst fine-tuned answers per category (up to {WORST_PER_CATEGORY}, least similar first)", ""]
    for category, rows in worst.items():
        lines += [f"### {category}", "", "| question | target | answer | similarity |", "|---|---|---|---:|"]
        lines += [f"| {_cell(r['question'])} | {_cell(r['target'])} | {_cell(r['answer'])} | {r['similarity']:.3f} |" for r in rows]
        lines.append("")
    if not worst:
        lines += ["No fine-tuned answer fell into an error category.", ""]
    lines += [f"## Elo (pairwise, judged by {judged_by})", "",
              "| rank | version | rating | games | wins | draws | losses | mean similarity |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['rank']} | {r['label']} | {r['rating']:.1f} | {r['games']} | {r['wins']} | {r['draws']} | {r['losses']} | "
              f"{_cell(r['mean_similarity'])} |" for r in elo]
    return "\n".join(lines) + "\n"


def publish(folder: Path) -> None:
    """Put a gate output's report, first side-by-side rows and Elo table into the Prefect UI."""
    create_markdown_artifact(markdown=(folder / "report.md").read_text(encoding="utf-8"), key="evaluation-report",
                             description="Gates, metrics, plot, benchmarks, worst answers, Elo")
    rows = pq.read_table(folder / "side_by_side.parquet").slice(0, SIDE_BY_SIDE_ROWS).to_pylist()
    create_table_artifact(table=rows, key="side-by-side",
                          description=f"First {SIDE_BY_SIDE_ROWS} test questions: base vs fine-tuned (all in side_by_side.csv)")
    elo = json.loads((folder / "elo.json").read_text(encoding="utf-8"))
    create_table_artifact(table=elo, key="elo-ratings", description="Model versions ranked by Elo over pairwise answers")


# --------------------------------------------------------------------------- the stage


@stage_task("gate", version=VERSION)
def gate(base_eval: Ref, tuned_eval: Ref, base_benchmark: Ref, tuned_benchmark: Ref, gates: list[Gate], store: StoreConfig,
         evaluations: list[Ref] | None = None, labels: list[str] | None = None, elo: EloConfig | None = None) -> Ref:
    """Compare base and fine-tuned, rank every version in `evaluations` (default: base, fine-tuned) by Elo
    under `labels` (default: their model names) with the judge `elo` names (default: similarity), check every
    gate; returns the gate artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        publish(stage.fetch(stage.ref))
        return stage.ref
    base_dir, tuned_dir = stage.fetch(base_eval), stage.fetch(tuned_eval)
    base_bench, tuned_bench = (_read_json(stage.fetch(r) / "results.json") for r in (base_benchmark, tuned_benchmark))
    base_summary, tuned_summary = _read_json(base_dir / "summary.json"), _read_json(tuned_dir / "summary.json")
    base, tuned = flatten_metrics(base_summary, base_bench), flatten_metrics(tuned_summary, tuned_bench)
    verdicts = check_gates(gates, tuned, base)
    base_rows, tuned_rows = _answers(base_dir), _answers(tuned_dir)
    rows = side_by_side(base_rows, tuned_rows)

    versions = evaluations if evaluations else [base_eval, tuned_eval]
    version_rows = [_answers(stage.fetch(ref)) for ref in versions]
    elo_config = elo or EloConfig()
    ratings = elo_tournament(version_rows, labels or version_labels([ref.meta for ref in versions]), make_judge(elo_config))

    plot_comparison({"base": base, "fine-tuned": tuned},
                    [f"eval.{n}" for n in PLOTTED_EVAL_METRICS] + sorted(n for n in tuned if n.startswith("benchmark.")),
                    stage.dir / "comparison.png")
    counts = {"base": base_summary.get("categories", {}), "fine_tuned": tuned_summary.get("categories", {})}
    report = report_markdown(tuned, base, verdicts, worst_answers(tuned_rows), ratings,
                             format_benchmark_table(base_bench, tuned_bench), (stage.dir / "comparison.png").read_bytes(), counts,
                             judged_by=elo_config.judge)
    passed = all(v["passed"] for v in verdicts)
    _write_json(stage.dir / "verdicts.json", {"passed": passed, "verdicts": verdicts})
    _write_json(stage.dir / "metrics.json", {"base": base, "fine_tuned": tuned})
    _write_json(stage.dir / "elo.json", ratings)
    pq.write_table(pa.Table.from_pylist(rows), stage.dir / "side_by_side.parquet")
    _write_csv(stage.dir / "side_by_side.csv", rows)
    (stage.dir / "report.md").write_text(report, encoding="utf-8")
    publish(stage.dir)
    return stage.commit(meta={"passed": passed, "verdicts": verdicts, "base": base, "fine_tuned": tuned,
                              "elo": {row["label"]: row["rating"] for row in ratings}})


def _answers(folder: Path) -> list[dict[str, Any]]:
    """The per-question rows of an evaluate artifact."""
    return pq.read_table(folder / "answers.parquet").to_pylist()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["question"])
        writer.writeheader()
        writer.writerows(rows)
