"""The per-item values behind every gate-able metric, keyed so two model versions pair up on the same items.

`ModelItems` holds one version's test answers, probes and benchmark questions; `item_values` reads a metric's
values off them (`eval.<answer metric>`, `eval.refusal_rate[.<category>]`, `eval.false_refusal_rate`,
`benchmark.<task>.<acc|acc_norm>`), `is_binary` says whether they are 0/1 outcomes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.answers import CATEGORIES
from pipeline.config import BENCHMARK_METRICS, EVAL_METRICS, OFFTOPIC_PROBE_CATEGORIES


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
