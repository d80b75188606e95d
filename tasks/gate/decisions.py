"""Deciding a gate on its interval: the estimate, the verdict, the power figures and the round's status.

Relative gates pair the two models item by item (paired score interval and McNemar for 0/1 outcomes, a paired
bootstrap otherwise); absolute gates take a Wilson interval or a bootstrap of the mean. `round_status` says
pass, fail or grow (`to_grow`: which samples, benchmark questions or moderation probes); `finalise_decisions`
settles what stays inconclusive by `gates_on_inconclusive`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pipeline import stats
from pipeline.config import BENCHMARK_METRICS, Gate
from tasks.gate.items import ModelItems, gateable_metrics, is_binary, item_values

POWER = 0.8
"""Power at which the report states each gate's minimum detectable effect."""


class GateMetricMissing(KeyError):
    """A gate names a metric the evaluation did not measure (e.g. refusal_rate with no probes)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


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


PROBE_METRICS = ("eval.refusal_rate", "eval.false_refusal_rate")
"""Gates read off the moderation probes (a category suffix included): more probes can be drawn for them."""


def growth_kind(metric: str) -> str | None:
    """What more items a gate on `metric` can get: 'benchmark' (more questions), 'probes' (more probes), or None
    (the test answers: the split is fixed for the round)."""
    if metric.startswith("benchmark."):
        return "benchmark"
    if any(metric == name or metric.startswith(f"{name}.") for name in PROBE_METRICS):
        return "probes"
    return None


def decide_gate(gate: Gate, tuned: ModelItems, base: ModelItems, confidence: float, looks: int) -> dict[str, Any]:
    """One gate's evidence: estimate, interval, n, method, p-value, verdict, power figures.

    Gates whose sample can grow (benchmark questions, moderation probes: `growth_kind`) split alpha over the
    `looks`; gates on the fixed test answers have one look. `decision` is the verdict for now ('pending' while
    inconclusive; `finalise_decisions` settles it).
    """
    gate_looks = looks if growth_kind(gate.metric) else 1
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
    """`fail` when a gate failed; `grow` when a gate whose sample can grow (`growth_kind`) is inconclusive, a
    larger look remains and its answer can still matter; else `pass` when every decision is pass (call
    `finalise_decisions` first).

    A gate on the test answers cannot grow (the split is fixed for the round): when one is inconclusive and
    inconclusive counts as fail, the round fails whatever more questions or probes say, so none are scored.
    """
    if any(v["verdict"] == "fail" for v in verdicts):
        return "fail"
    undecided = [v for v in verdicts if v["verdict"] == "inconclusive"]
    settled_by_policy = on_inconclusive == "fail" and any(not growth_kind(v["metric"]) for v in undecided)
    if can_grow and not settled_by_policy and to_grow(verdicts):
        return "grow"
    return "pass" if all(v["decision"] == "pass" for v in verdicts) else "fail"


def to_grow(verdicts: Sequence[dict[str, Any]]) -> list[str]:
    """The samples the next look should add to ('benchmark', 'probes'): those of the inconclusive gates only."""
    return sorted({kind for v in verdicts if v["verdict"] == "inconclusive" and (kind := growth_kind(v["metric"]))})


def finalise_decisions(
    verdicts: list[dict[str, Any]], on_inconclusive: Literal["fail", "pass"], can_grow: bool = False
) -> None:
    """Settle every inconclusive gate that can get no more items by `gates_on_inconclusive`; marks who decided.

    A gate that could still look at more items (`can_grow` and a `growth_kind`) stays undecided ('pending') when
    the round ends on other gates: it never asked for a data change, so refine leaves it alone.
    """
    for verdict in verdicts:
        if verdict["verdict"] == "inconclusive" and not (can_grow and growth_kind(verdict["metric"])):
            verdict.update(
                decision=on_inconclusive, decided_by="gates_on_inconclusive", passed=on_inconclusive == "pass"
            )
