"""Stage 8, gate: decide every gate on paired evidence, compare versions side by side, rank them.

In: the evaluate artifacts of the base and the fine-tuned model (per-answer rows and
per-probe rows), the benchmark slices scored so far for each (per-question outcomes,
`tasks/benchmark/`), the probe slices later looks added (`tasks.evaluate.probe`), the list of
`Gate`s, the confidence, which look of a growing sample this is and how many looks there can
be, and, optionally, the evaluate artifacts of every model version the run produced (base
first, then each round).

Each gate is decided on an interval (`pipeline/stats.py`), never on a point estimate:

- relative gates (`relative_to_base`) pair the two models item by item: a paired score
  interval plus the exact McNemar p-value for 0/1 outcomes (exact match, ARC acc, declined),
  a seeded paired bootstrap of the mean difference for continuous ones (similarity, ROUGE-L);
- absolute gates: a Wilson interval for a rate, a bootstrap of the mean otherwise.

`pass` when the whole interval is on the passing side of the threshold, `fail` when it is
all on the failing side, `inconclusive` otherwise. Benchmark gates and the probe gates
(`eval.refusal_rate[.<category>]`, `eval.false_refusal_rate`) can look again at a larger
nested sample (more ARC questions; twice the probes per category, new questions never
trained on), so each look gets an equal share of alpha (Bonferroni over the planned looks);
gates on the test answers have one look (the split is fixed for the round). The run passes
only when every gate passes, an intersection-union test, so the run-level chance of
passing a model that misses any one gate stays below each gate's own alpha without a
correction across gates. The stage's `status`: `fail` when any gate fails, `grow` when a
growable gate is inconclusive and a larger look remains (`grow` names which samples), else every still-inconclusive
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

Modules: `items` (the per-item values behind each gate-able metric, `ModelItems`), `decisions` (deciding a gate on
its interval, the comparisons, the round's status), `ranking` (judges and the Bradley-Terry ranking of versions),
`plots` (the gate intervals and the base vs fine-tuned bars), `report` (side-by-side rows, worst answers, the
markdown report and the Prefect UI artifacts) and `stage` (reading the evaluate and benchmark artifacts, the `gate`
task). This module re-exports their public names.
"""

from __future__ import annotations

from tasks.gate.decisions import (
    COMPARED_METRICS,
    POWER,
    GateMetricMissing,
    comparisons,
    decide_gate,
    finalise_decisions,
    gate_estimate,
    growth_kind,
    round_status,
    to_grow,
)
from tasks.gate.items import CONTINUOUS_ANSWER_METRICS, ModelItems, gateable_metrics, is_binary, item_values
from tasks.gate.plots import PLOTTED_EVAL_METRICS, plot_comparison, plot_intervals
from tasks.gate.ranking import (
    RANKING_RESAMPLES,
    Judge,
    make_judge,
    metric_judge,
    rank_versions,
    similarity_judge,
    version_labels,
)
from tasks.gate.report import (
    SIDE_BY_SIDE_ROWS,
    WORST_PER_CATEGORY,
    publish,
    report_markdown,
    side_by_side,
    verdict_lines,
    worst_answers,
)
from tasks.gate.stage import gate, publish_cached, read_items

__all__ = [
    "COMPARED_METRICS",
    "CONTINUOUS_ANSWER_METRICS",
    "PLOTTED_EVAL_METRICS",
    "POWER",
    "RANKING_RESAMPLES",
    "SIDE_BY_SIDE_ROWS",
    "WORST_PER_CATEGORY",
    "GateMetricMissing",
    "Judge",
    "ModelItems",
    "comparisons",
    "decide_gate",
    "finalise_decisions",
    "gate",
    "gate_estimate",
    "gateable_metrics",
    "growth_kind",
    "is_binary",
    "item_values",
    "make_judge",
    "metric_judge",
    "plot_comparison",
    "plot_intervals",
    "publish",
    "publish_cached",
    "rank_versions",
    "read_items",
    "report_markdown",
    "round_status",
    "side_by_side",
    "similarity_judge",
    "to_grow",
    "verdict_lines",
    "version_labels",
    "worst_answers",
]
