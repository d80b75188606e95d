"""Stage 8, gate: decide every gate on paired evidence, compare versions side by side, rank them.

In: the evaluate artifacts of the base and the fine-tuned model (per-answer rows and
per-probe rows), the benchmark slices scored so far for each (per-question outcomes,
`tasks/benchmark.py`), the list of `Gate`s, the confidence, which look of a growing
benchmark sample this is and how many looks there can be, and, optionally, the evaluate
artifacts of every model version the run produced (base first, then each round).

Each gate is decided on an interval (`pipeline/stats.py`), never on a point estimate:

- relative gates (`relative_to_base`) pair the two models item by item: a paired score
  interval plus the exact McNemar p-value for 0/1 outcomes (exact match, ARC acc, declined),
  a seeded paired bootstrap of the mean difference for continuous ones (similarity, ROUGE-L);
- absolute gates: a Wilson interval for a rate, a bootstrap of the mean otherwise.

`pass` when the whole interval is on the passing side of the threshold, `fail` when it is
all on the failing side, `inconclusive` otherwise. Benchmark gates can look again at a
larger nested sample, so each look gets an equal share of alpha (Bonferroni over the
planned looks); evaluation gates have one look (their test set is fixed). The run passes
only when every gate passes, an intersection-union test, so the run-level chance of
passing a model that misses any one gate stays below each gate's own alpha without a
correction across gates. The stage's `status`: `fail` when any gate fails, `grow` when a
benchmark gate is inconclusive and a larger look remains, else every still-inconclusive
gate is decided by `gates_on_inconclusive` (the report says so) and the status is `pass`
or `fail`.

Out: `verdicts.json` (each gate: estimate, interval, n, method, McNemar p, minimum
detectable effect at 80% power, items that would decide it, verdict, decision),
`metrics.json` (every gate-able point figure for both models), `intervals.png` (each
gate's interval against its threshold), `side_by_side.parquet`/`.csv`, `ranking.json`
(Bradley-Terry over all pairwise games on the Elo scale with bootstrap intervals:
order-independent, unlike sequential Elo), `comparison.png` and `report.md`. The report,
the first side-by-side rows and the ranking go to the Prefect UI. The flow, not this
stage, decides what the status does to the run.
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import stats
from pipeline.answers import CATEGORIES, normalise_answer
from pipeline.config import (
    BENCHMARK_METRICS,
    EVAL_METRICS,
    OFFTOPIC_PROBE_CATEGORIES,
    EloConfig,
    Gate,
    import_function,
)
from pipeline.refs import Ref
from pipeline.stage import StageRun, stage_task

SIDE_BY_SIDE_ROWS = 20
"""Rows of the side-by-side table shown in the UI; the store keeps all of them."""
WORST_PER_CATEGORY = 5
PLOTTED_EVAL_METRICS = (
    "exact_match",
    "similarity_mean",
    "rouge_l",
    "token_f1",
    "refusal_rate",
    "ok_rate",
    "too_short_rate",
    "repetition_rate",
    "off_topic_rate",
    "not_declined_rate",
)
POWER = 0.8
"""Power at which the report states each gate's minimum detectable effect."""
RANKING_RESAMPLES = 1000

Judge = Callable[[Mapping[str, Any], Mapping[str, Any]], float]
"""judge(row_a, row_b) -> 1.0 when version A's answer is better, 0.5 for a draw, 0.0 when B's is.
Rows carry question, target, answer and similarity (to the target)."""


class GateMetricMissing(KeyError):
    """A gate names a metric the evaluation did not measure (e.g. refusal_rate with no probes)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# --------------------------------------------------------------------------- per-item values


@dataclass
class ModelItems:
    """One model version's per-item outcomes: test answers by row id, probes by question, benchmark questions by id."""

    answers: dict[str, dict[str, Any]]
    probes: dict[str, dict[str, Any]]
    benchmark: dict[str, dict[int, dict[str, Any]]]

    @property
    def points(self) -> dict[str, float]:
        """Every gate-able metric as a point figure (a mean over the items), under the names gates use."""
        points: dict[str, float] = {}
        for metric in gateable_metrics(self):
            values = list(item_values(metric, self).values())
            if values:
                points[metric] = sum(values) / len(values)
        return points


CONTINUOUS_ANSWER_METRICS = {
    "similarity_mean": "similarity",
    "rouge_l": "rouge_l",
    "token_f1": "token_f1",
    "length_ratio_mean": "length_ratio",
    "repetition_mean": "repetition",
}
"""Evaluation metrics that are means of a continuous per-answer value (column of answers.parquet)."""


def _answer_flag(name: str) -> Callable[[Mapping[str, Any]], bool] | None:
    """The per-answer 0/1 outcome behind a rate metric of the test answers, or None when `name` is not one."""
    if name == "exact_match":
        return lambda row: bool(row["exact_match"])
    if name == "empty_rate":
        return lambda row: bool(row["empty"])
    if name == "repetition_rate":
        return lambda row: "repetitive" in str(row["categories"]).split(",")
    category = name.removesuffix("_rate")
    if name.endswith("_rate") and category in CATEGORIES:
        return lambda row: row["category"] == category
    return None


def item_values(metric: str, items: ModelItems) -> dict[Any, float]:
    """The per-item values behind `metric` for one model, keyed so two models pair up on the same items.

    eval.<answer metric>: test rows by id; eval.refusal_rate[.<category>]: off-topic probes (declined = 1)
    by question; eval.false_refusal_rate: on-topic probes; benchmark.<task>.<acc|acc_norm>: questions by id.
    """
    parts = metric.split(".")
    if parts[0] == "benchmark":
        return {doc_id: float(row[parts[2]]) for doc_id, row in items.benchmark.get(parts[1], {}).items()}
    name = parts[1]
    if name == "refusal_rate":
        wanted = parts[2:] or list(OFFTOPIC_PROBE_CATEGORIES)
        return {q: float(p["declined"]) for q, p in items.probes.items() if p.get("category") in wanted}
    if name == "false_refusal_rate":
        return {q: float(p["declined"]) for q, p in items.probes.items() if p.get("expected") == "answer"}
    if name in CONTINUOUS_ANSWER_METRICS:
        column = CONTINUOUS_ANSWER_METRICS[name]
        return {key: float(row[column]) for key, row in items.answers.items()}
    flag = _answer_flag(name)
    if flag is None:
        return {}
    return {key: float(flag(row)) for key, row in items.answers.items()}


def is_binary(metric: str) -> bool:
    """Whether a metric's per-item values are 0/1 outcomes (a rate), not continuous values."""
    name = metric.split(".")[1]
    return metric.startswith("benchmark.") or name not in CONTINUOUS_ANSWER_METRICS


def gateable_metrics(items: ModelItems) -> list[str]:
    """The metric names this model's items can answer, for the metrics table."""
    names = [f"eval.{name}" for name in EVAL_METRICS]
    names += [f"eval.refusal_rate.{c}" for c in OFFTOPIC_PROBE_CATEGORIES]
    names += [f"benchmark.{task}.{m}" for task in items.benchmark for m in BENCHMARK_METRICS]
    return [name for name in names if item_values(name, items)]


# --------------------------------------------------------------------------- deciding a gate


def gate_estimate(gate: Gate, tuned: ModelItems, base: ModelItems, confidence: float) -> tuple[stats.Estimate, str]:
    """The interval a gate is decided on, and the power-calculation kind it belongs to.

    Relative gates pair the models on the items both have; absolute gates take the fine-tuned model alone.
    Raises GateMetricMissing naming the metric and the measured ones when a model has no items for it.
    """
    tuned_values = item_values(gate.metric, tuned)
    base_values = item_values(gate.metric, base) if gate.relative_to_base else tuned_values
    for side, values, items in (("fine-tuned", tuned_values, tuned), ("base", base_values, base)):
        if not values:
            raise GateMetricMissing(
                f"gate {gate.describe()!r}: {gate.metric} was not measured for the {side} model "
                f"(measured: {', '.join(gateable_metrics(items))})"
            )
    binary = is_binary(gate.metric)
    if gate.relative_to_base:
        keys = sorted(set(tuned_values) & set(base_values), key=str)
        if not keys:
            raise GateMetricMissing(f"gate {gate.describe()!r}: the two models share no items for {gate.metric}")
        pair = ([tuned_values[k] for k in keys], [base_values[k] for k in keys])
        if binary:
            return stats.paired_binary_difference(*pair, confidence=confidence), "paired_binary"
        return stats.paired_mean_difference(*pair, confidence=confidence), "paired_mean"
    values = list(tuned_values.values())
    if binary:
        return stats.wilson_interval(round(sum(values)), len(values), confidence), "rate"
    # A mean's bootstrap is the paired bootstrap against zero: one implementation of the resampling.
    estimate = stats.paired_mean_difference(values, [0.0] * len(values), confidence=confidence)
    return estimate, "paired_mean"


def decide_gate(gate: Gate, tuned: ModelItems, base: ModelItems, confidence: float, looks: int) -> dict[str, Any]:
    """One gate's evidence: estimate, interval, n, method, p-value, verdict, power figures.

    Benchmark gates split alpha over the `looks` of a growing sample; evaluation gates have one look.
    `decision` is the verdict for now ('pending' while inconclusive; `finalise_decisions` settles it).
    """
    gate_looks = looks if gate.metric.startswith("benchmark.") else 1
    level = stats.per_look_confidence(confidence, gate_looks)
    estimate, kind = gate_estimate(gate, tuned, base, level)
    outcome = stats.verdict(estimate, gate.op, gate.value)
    tuned_values, base_values = item_values(gate.metric, tuned), item_values(gate.metric, base)
    if gate.relative_to_base:  # the two means over the shared items, so their difference is the estimate
        shared = set(tuned_values) & set(base_values)
        tuned_values = {k: v for k, v in tuned_values.items() if k in shared}
        base_values = {k: v for k, v in base_values.items() if k in shared}
    return {
        "gate": gate.describe(),
        "metric": gate.metric,
        "op": gate.op,
        "threshold": gate.value,
        "relative_to_base": gate.relative_to_base,
        **estimate.as_dict(),
        "measured": round(estimate.estimate, 6),
        "looks": gate_looks,
        "tuned_value": round(sum(tuned_values.values()) / len(tuned_values), 6),
        "base_value": round(sum(base_values.values()) / len(base_values), 6) if base_values else None,
        "mde": round(stats.minimum_detectable_effect(kind, estimate.n, estimate.spread, level, POWER), 6)
        if estimate.n > 0
        else None,
        "items_to_decide": stats.items_to_decide(estimate, kind, gate.value) if outcome == "inconclusive" else None,
        "verdict": outcome,
        "decision": outcome if outcome != "inconclusive" else "pending",
        "decided_by": "interval",
        "passed": outcome == "pass",
    }


COMPARED_METRICS = ("eval.similarity_mean", "eval.exact_match", "eval.refusal_rate", "eval.false_refusal_rate")
"""Figures every gate output carries with intervals, gated or not (the sweep's error bars come from here)."""


def comparisons(tuned: ModelItems, base: ModelItems, confidence: float) -> dict[str, dict[str, dict[str, Any]]]:
    """For the key metrics both models have: the fine-tuned value's interval and the paired difference's interval.

    Out: {metric: {"value": Estimate dict, "difference": Estimate dict}}; benchmark metrics for every task scored.
    """
    names = [
        *COMPARED_METRICS,
        *(f"benchmark.{task}.{m}" for task in sorted(tuned.benchmark) for m in BENCHMARK_METRICS),
    ]
    out = {}
    for name in names:
        if not item_values(name, tuned) or not item_values(name, base):
            continue
        value, _ = gate_estimate(Gate(metric=name, op=">=", value=0.0), tuned, base, confidence)
        difference, _ = gate_estimate(
            Gate(metric=name, op=">=", value=0.0, relative_to_base=True), tuned, base, confidence
        )
        out[name] = {"value": value.as_dict(), "difference": difference.as_dict()}
    return out


def round_status(
    verdicts: Sequence[dict[str, Any]], can_grow: bool, on_inconclusive: Literal["fail", "pass"] = "fail"
) -> Literal["pass", "fail", "grow"]:
    """`fail` when a gate failed; `grow` when a benchmark gate is inconclusive, a larger look remains and its
    answer can still matter; else `pass` when every decision is pass (call `finalise_decisions` first).

    An evaluation gate cannot grow (its test set is fixed): when one is inconclusive and inconclusive counts
    as fail, the round fails whatever more benchmark questions say, so none are scored.
    """
    if any(v["verdict"] == "fail" for v in verdicts):
        return "fail"
    undecided = [v for v in verdicts if v["verdict"] == "inconclusive"]
    settled_by_policy = on_inconclusive == "fail" and any(not v["metric"].startswith("benchmark.") for v in undecided)
    if can_grow and not settled_by_policy and any(v["metric"].startswith("benchmark.") for v in undecided):
        return "grow"
    return "pass" if all(v["decision"] == "pass" for v in verdicts) else "fail"


def finalise_decisions(verdicts: list[dict[str, Any]], on_inconclusive: Literal["fail", "pass"]) -> None:
    """Settle every inconclusive gate by `gates_on_inconclusive` (no more items can be added); marks who decided."""
    for verdict in verdicts:
        if verdict["verdict"] == "inconclusive":
            verdict.update(
                decision=on_inconclusive, decided_by="gates_on_inconclusive", passed=on_inconclusive == "pass"
            )


# --------------------------------------------------------------------------- side by side


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


# --------------------------------------------------------------------------- ranking


def metric_judge(metric: str = "similarity", margin: float = EloConfig().draw_margin) -> Judge:
    """A judge by one per-answer metric: 1.0 when `a` beats `b` on it by more than `margin`, 0.0 the reverse,
    else 0.5."""

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


def rank_versions(
    versions: Sequence[Sequence[Mapping[str, Any]]],
    labels: Sequence[str],
    judge: Judge = similarity_judge,
    confidence: float = 0.95,
    resamples: int = RANKING_RESAMPLES,
) -> list[dict[str, Any]]:
    """Bradley-Terry ratings (Elo scale) of model versions from every pairwise game, with bootstrap intervals.

    In: one list of answer rows per version (question, target, answer, similarity), their labels, a judge.
    Every pair of versions plays one game per question both answered. The fit uses all games at once, so
    the ratings do not depend on the order of questions or games (sequential Elo did). Out: one row per
    version, best first (ties keep list order): rank, label, rating, low, high, games, wins, draws, losses,
    mean similarity.
    """
    if len(versions) != len(labels):
        raise ValueError(
            f"ranking: expected one label per version, found {len(labels)} labels for {len(versions)} versions"
        )
    by_question = [{normalise_answer(row["question"]): row for row in rows} for rows in versions]
    games: list[tuple[str, int, int, float]] = []
    record = [{"wins": 0, "draws": 0, "losses": 0} for _ in versions]
    for i, j in combinations(range(len(versions)), 2):
        for question in sorted(set(by_question[i]) & set(by_question[j])):
            score = judge(by_question[i][question], by_question[j][question])
            games.append((question, i, j, score))
            for side, points in ((i, score), (j, 1.0 - score)):
                record[side]["wins" if points == 1.0 else "losses" if points == 0.0 else "draws"] += 1
    fitted = (
        stats.bradley_terry_ratings(games, len(versions), confidence, resamples)
        if games
        else [{"rating": 1000.0, "low": 1000.0, "high": 1000.0} for _ in versions]
    )
    table = []
    for index, (label, rows) in enumerate(zip(labels, versions)):
        sims = [float(r["similarity"]) for r in rows]
        table.append(
            {
                "label": label,
                **{k: round(v, 1) for k, v in fitted[index].items()},
                "games": sum(record[index].values()),
                **record[index],
                "mean_similarity": round(sum(sims) / len(sims), 4) if sims else None,
                "_order": index,
            }
        )
    table.sort(key=lambda row: (-row["rating"], row["_order"]))
    return [
        {"rank": rank, **{key: value for key, value in row.items() if key != "_order"}}
        for rank, row in enumerate(table, 1)
    ]


def version_labels(metas: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label per evaluated version: its model name ('tiny-neox', 'fine-tuned'), repeats numbered '#2', '#3'."""
    seen: dict[str, int] = {}
    labels = []
    for index, meta in enumerate(metas):
        name = str(meta.get("model", f"model {index}"))
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


# --------------------------------------------------------------------------- plots and report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    return plt


def plot_intervals(verdicts: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One row per gate: its interval (a bar), estimate (a dot) and threshold (a red line), saved as PNG."""
    plt = _pyplot()
    colours = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:orange"}
    fig, axes = plt.subplots(len(verdicts), 1, figsize=(7, 1.1 * len(verdicts) + 0.6), dpi=100, squeeze=False)
    for ax, v in zip(axes[:, 0], verdicts):
        ax.hlines(0, v["low"], v["high"], colors=colours[v["verdict"]], linewidth=6)
        ax.plot([v["estimate"]], [0], "o", color="black")
        ax.axvline(v["threshold"], color="red", linestyle="--")
        span = max(v["high"], v["threshold"]) - min(v["low"], v["threshold"])
        pad = max(span * 0.15, 0.01)
        ax.set_xlim(min(v["low"], v["threshold"]) - pad, max(v["high"], v["threshold"]) + pad)
        ax.set_yticks([])
        ax.set_title(
            f"{v['gate']}: {v['verdict']} (n={v['n']}, {v['confidence']:.1%} interval)", fontsize=8, loc="left"
        )
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp in the file
    plt.close(fig)


def plot_comparison(metrics: Mapping[str, Mapping[str, float]], names: Sequence[str], path: Path) -> None:
    """Grouped bar plot of `names` for each model label in `metrics`, saved as PNG at `path`."""
    plt = _pyplot()
    shown = [n for n in names if all(n in m for m in metrics.values())]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(shown) + 2), 4), dpi=100)
    for offset, (label, values) in enumerate(metrics.items()):
        xs = [i + offset * width for i in range(len(shown))]
        ax.bar(xs, [values[n] for n in shown], width, label=label)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(shown))])
    ax.set_xticklabels(
        [n.removeprefix("eval.").removeprefix("benchmark.") for n in shown], rotation=35, ha="right", fontsize=8
    )
    ax.set_ylim(min(0.0, *(v[n] for v in metrics.values() for n in shown)) if shown else 0.0, 1.0)
    ax.set_title("Base vs fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


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


# --------------------------------------------------------------------------- the stage


def read_items(eval_dir: Path, benchmark_dirs: Sequence[Path]) -> ModelItems:
    """A model version's per-item outcomes from its evaluate artifact and its benchmark slices."""
    answers = {str(row["id"]): row for row in _answers(eval_dir)}
    probes_path = eval_dir / "probes.parquet"
    probes = {str(p["question"]): p for p in pq.read_table(probes_path).to_pylist()} if probes_path.is_file() else {}
    benchmark: dict[str, dict[int, dict[str, Any]]] = {}
    for folder in benchmark_dirs:
        task = _read_json(folder / "results.json")["sample"]["task"]
        for row in pq.read_table(folder / "items.parquet").to_pylist():
            benchmark.setdefault(task, {})[int(row["doc_id"])] = row
    return ModelItems(answers, probes, benchmark)


def publish_cached(ref: Ref, stage: StageRun) -> None:
    """A gate output found committed: put its report, side-by-side rows and ranking into this run's UI again."""
    publish(stage.fetch(ref))


@stage_task("gate", on_cached=publish_cached)
def gate(
    base_eval: Path,
    tuned_eval: Path,
    base_benchmarks: list[Path],
    tuned_benchmarks: list[Path],
    gates: list[Gate],
    confidence: float,
    on_inconclusive: Literal["fail", "pass"],
    look: int,
    looks: int,
    out: Path,
    evaluations: list[Path] | None = None,
    labels: list[str] | None = None,
    elo: EloConfig | None = None,
) -> dict[str, Any]:
    """Decide every gate on the items scored so far (benchmark look `look` of `looks`), rank every version in
    `evaluations` (default: base, fine-tuned) under `labels` with the judge `elo` names; write the gate
    artifact into `out` and return its figures: `status` (pass, fail or grow), `passed`, the verdicts."""
    base = read_items(base_eval, base_benchmarks)
    tuned = read_items(tuned_eval, tuned_benchmarks)
    verdicts = [decide_gate(g, tuned, base, confidence, looks) for g in gates]
    can_grow = look < looks
    if round_status(verdicts, can_grow, on_inconclusive) != "grow":
        finalise_decisions(verdicts, on_inconclusive)
    status = round_status(verdicts, can_grow, on_inconclusive)

    versions = evaluations if evaluations else [base_eval, tuned_eval]
    version_rows = [_answers(folder) for folder in versions]
    elo_config = elo or EloConfig()
    # Each evaluate artifact's summary names its model ("model"), as its Ref's meta does.
    summaries = [_read_json(folder / "summary.json") for folder in versions]
    ranking = rank_versions(version_rows, labels or version_labels(summaries), make_judge(elo_config), confidence)
    base_points, tuned_points = base.points, tuned.points
    compared = comparisons(tuned, base, confidence)
    if verdicts:
        plot_intervals(verdicts, out / "intervals.png")
    benchmark_names = sorted(n for n in tuned_points if n.startswith("benchmark."))
    plot_comparison(
        {"base": base_points, "fine-tuned": tuned_points},
        [f"eval.{n}" for n in PLOTTED_EVAL_METRICS] + benchmark_names,
        out / "comparison.png",
    )
    pngs = {
        name: (out / f"{name}.png").read_bytes()
        for name in ("intervals", "comparison")
        if (out / f"{name}.png").is_file()
    }
    base_summary, tuned_summary = _read_json(base_eval / "summary.json"), _read_json(tuned_eval / "summary.json")
    counts = {"base": base_summary.get("categories", {}), "fine_tuned": tuned_summary.get("categories", {})}
    worst = worst_answers(_answers(tuned_eval))
    report = report_markdown(
        verdicts,
        status,
        look,
        looks,
        tuned_points,
        base_points,
        worst,
        ranking,
        pngs,
        counts,
        judged_by=elo_config.judge,
        confidence=confidence,
    )
    passed = status == "pass"
    _write_json(
        out / "verdicts.json", {"status": status, "passed": passed, "look": look, "looks": looks, "verdicts": verdicts}
    )
    _write_json(out / "metrics.json", {"base": base_points, "fine_tuned": tuned_points, "intervals": compared})
    _write_json(out / "ranking.json", ranking)
    rows = side_by_side(_answers(base_eval), _answers(tuned_eval))
    pq.write_table(pa.Table.from_pylist(rows), out / "side_by_side.parquet")
    _write_csv(out / "side_by_side.csv", rows)
    (out / "report.md").write_text(report, encoding="utf-8")
    publish(out)
    benchmark_n = {task: len(values) for task, values in tuned.benchmark.items()}
    return {
        "status": status,
        "passed": passed,
        "look": look,
        "looks": looks,
        "benchmark_n": benchmark_n,
        "verdicts": verdicts,
        "base": base_points,
        "fine_tuned": tuned_points,
        "intervals": compared,
        "ranking": {r["label"]: r["rating"] for r in ranking},
    }


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
