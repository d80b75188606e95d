"""The gate stage body: read both models' items, decide every gate, rank the versions, write and publish it all.

`read_items` reads a version's per-item outcomes from its evaluate and benchmark artifacts; `gate` is the stage
task (name "gate"), whose cached output is published to the UI again (`publish_cached`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EloConfig, Gate
from pipeline.refs import Ref
from pipeline.stage import StageRun, stage_task
from tasks.gate.decisions import comparisons, decide_gate, finalise_decisions, round_status, to_grow
from tasks.gate.items import ModelItems
from tasks.gate.plots import PLOTTED_EVAL_METRICS, plot_comparison, plot_intervals
from tasks.gate.ranking import make_judge, rank_versions, version_labels
from tasks.gate.report import publish, report_markdown, side_by_side, worst_answers


def read_items(eval_dir: Path, benchmark_dirs: Sequence[Path], probe_dirs: Sequence[Path] = ()) -> ModelItems:
    """A model version's per-item outcomes from its evaluate artifact, its benchmark slices and the probe slices
    later looks added (probe stage artifacts)."""
    answers = {str(row["id"]): row for row in _answers(eval_dir)}
    probes = {}
    for folder in (eval_dir, *probe_dirs):
        if (folder / "probes.parquet").is_file():
            probes.update({str(p["question"]): p for p in pq.read_table(folder / "probes.parquet").to_pylist()})
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
    base_probes: list[Path] | None = None,
    tuned_probes: list[Path] | None = None,
) -> dict[str, Any]:
    """Decide every gate on the items scored so far (look `look` of `looks`: the benchmark slices and the probe
    slices later looks added), rank every version in `evaluations` (default: base, fine-tuned) under `labels`
    with the judge `elo` names; write the gate artifact into `out` and return its figures: `status` (pass, fail
    or grow), `grow` (which samples the next look adds to), `passed`, the verdicts."""
    base = read_items(base_eval, base_benchmarks, base_probes or [])
    tuned = read_items(tuned_eval, tuned_benchmarks, tuned_probes or [])
    verdicts = [decide_gate(g, tuned, base, confidence, looks) for g in gates]
    can_grow = look < looks
    if round_status(verdicts, can_grow, on_inconclusive) != "grow":
        finalise_decisions(verdicts, on_inconclusive, can_grow)
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
        "grow": to_grow(verdicts) if status == "grow" else [],
        "probes_n": len(tuned.probes),
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
