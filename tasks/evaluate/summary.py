"""The evaluation summary: the scored rows and probes aggregated under the `EVAL_METRICS` names, plus counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.answers import CATEGORIES
from pipeline.config import HAND_PICKED_PROBES, OFFTOPIC_PROBE_CATEGORIES, PROBE_CATEGORIES
from tasks.evaluate.scoring import word_count


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_figures(probes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Refusal figures of the probe rows (`category`, `declined`; a row without a category is hand_picked).

    Out: `refusal_rate` (declined share of every off-topic probe), `refusal_rate.<category>` for each
    off-topic category asked, `false_refusal_rate` (declined share of the on_topic probes; None when
    none was asked) and `probe_counts` `{category: {"n", "declined"}}` for every category asked.
    """
    declined: dict[str, list[bool]] = {}
    for probe in probes:
        declined.setdefault(probe.get("category") or HAND_PICKED_PROBES, []).append(bool(probe["declined"]))
    order = [*PROBE_CATEGORIES, *OFFTOPIC_PROBE_CATEGORIES]
    categories = sorted(declined, key=lambda c: order.index(c) if c in order else len(order))
    offtopic = [d for category in categories if category != "on_topic" for d in declined[category]]
    return {
        "refusal_rate": _mean([float(d) for d in offtopic]),
        **{f"refusal_rate.{c}": _mean([float(d) for d in declined[c]]) for c in categories if c != "on_topic"},
        "false_refusal_rate": _mean([float(d) for d in declined.get("on_topic", [])]),
        "probe_counts": {c: {"n": len(declined[c]), "declined": sum(declined[c])} for c in categories},
    }


def summarise(
    rows: Sequence[dict[str, Any]],
    probes: Sequence[dict[str, Any]],
    excluded_empty_target: int,
    excluded_no_prompt: int = 0,
) -> dict[str, Any]:
    """Aggregates under the EVAL_METRICS names, plus counts. A rate with nothing to measure is left out.

    In: the scored test rows, the scored probe rows (`category`, `declined`), the excluded counts.
    Probe figures: see `probe_figures`; `false_refusal_rate_test` is the declined share of the
    on-topic test questions (what `false_refusal_rate` measured before the probe categories).
    """
    n = len(rows)
    counts = Counter(row["category"] for row in rows)
    ontopic = [row for row in rows if not row["offtopic_question"]]
    summary: dict[str, Any] = {
        "n": n,
        "excluded_empty_target": excluded_empty_target,
        "excluded_no_prompt": excluded_no_prompt,
        "offtopic_questions": n - len(ontopic),
        "probes": len(probes),
        "exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "similarity_mean": _mean([r["similarity"] for r in rows]),
        "rouge_l": _mean([r["rouge_l"] for r in rows]),
        "token_f1": _mean([r["token_f1"] for r in rows]),
        "length_ratio_mean": _mean([r["length_ratio"] for r in rows]),
        "repetition_mean": _mean([r["repetition"] for r in rows]),
        "repetition_rate": sum("repetitive" in r["categories"].split(",") for r in rows) / n,
        "empty_rate": sum(r["empty"] for r in rows) / n,
        **{f"{category}_rate": counts.get(category, 0) / n for category in CATEGORIES},
        **probe_figures(probes),
        "false_refusal_rate_test": _mean([float(r["declined"]) for r in ontopic]),
        "categories": {category: counts.get(category, 0) for category in CATEGORIES},
        "mean_answer_words": _mean([word_count(r["answer"]) for r in rows]),
    }
    return {key: value for key, value in summary.items() if value is not None}
