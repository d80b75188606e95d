"""Stage 8, gate: check the run's metrics against the configured thresholds.

In: the evaluate and benchmark artifacts of the base and the fine-tuned model, and
the list of `Gate`s. Out: `verdicts.json` (each gate with measured value,
threshold and pass/fail), `metrics.json` (every metric for both models) and
`side_by_side.csv` (question, target, base answer, fine-tuned answer and their
similarities) for manual inspection. The same figures go to the Prefect UI. The
flow, not this stage, decides what a failed gate does to the run.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import Gate, StoreConfig
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task

VERSION = "1"
OPERATORS = {">=": operator.ge, "<=": operator.le}


def flatten_metrics(eval_summary: dict, benchmark_result: dict) -> dict[str, float]:
    """Metrics under the names gates use: eval.<metric> and benchmark.<task>.<metric>."""
    metrics = {f"eval.{k}": float(v) for k, v in eval_summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for task, scores in benchmark_result.get("tasks", {}).items():
        for name in ("acc", "acc_norm"):
            if scores.get(name) is not None:
                metrics[f"benchmark.{task}.{name}"] = float(scores[name])
    return metrics


def check_gates(gates: list[Gate], tuned: dict[str, float], base: dict[str, float]) -> list[dict]:
    """One verdict per gate: the measured value (a difference for relative gates), the threshold, pass or fail."""
    verdicts = []
    for gate in gates:
        measured = tuned[gate.metric] - base[gate.metric] if gate.relative_to_base else tuned[gate.metric]
        verdicts.append(
            {"gate": gate.describe(), "metric": gate.metric, "measured": round(measured, 6), "threshold": gate.value,
             "passed": bool(OPERATORS[gate.op](measured, gate.value))}
        )
    return verdicts


def side_by_side(base_answers: Path, tuned_answers: Path) -> list[dict]:
    """Rows of question, target, both answers and both similarities, matched by row id."""
    base = {row["id"]: row for row in pq.read_table(base_answers).to_pylist()}
    rows = []
    for row in pq.read_table(tuned_answers).to_pylist():
        other = base.get(row["id"], {})
        question = row["prompt"].split("### Question:\n", 1)[-1].split("\n\n### Answer:", 1)[0]
        rows.append({
            "question": question, "target": row["target"], "base_answer": other.get("answer", ""),
            "tuned_answer": row["answer"], "base_similarity": other.get("similarity"), "tuned_similarity": row["similarity"],
        })
    return rows


def summary_markdown(tuned: dict[str, float], base: dict[str, float], verdicts: list[dict]) -> str:
    """Markdown: every metric base vs fine-tuned, then each gate's verdict."""
    lines = ["## Base vs fine-tuned", "", "| metric | base | fine-tuned | change |", "|---|---|---|---|"]
    for name in sorted(tuned):
        if name in base:
            lines.append(f"| {name} | {base[name]:.3f} | {tuned[name]:.3f} | {tuned[name] - base[name]:+.3f} |")
    lines += ["", "## Gates", "", "| gate | measured | verdict |", "|---|---|---|"]
    lines += [f"| `{v['gate']}` | {v['measured']:.3f} | {'pass' if v['passed'] else '**FAIL**'} |" for v in verdicts]
    return "\n".join(lines)


@stage_task("gate", version=VERSION)
def gate(base_eval: Ref, tuned_eval: Ref, base_benchmark: Ref, tuned_benchmark: Ref, gates: list[Gate], store: StoreConfig) -> Ref:
    """Compare base and fine-tuned metrics, check every gate; returns the verdicts artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    base_eval_dir, tuned_eval_dir = stage.fetch(base_eval), stage.fetch(tuned_eval)
    base = flatten_metrics(_read_json(base_eval_dir / "summary.json"), _read_json(stage.fetch(base_benchmark) / "results.json"))
    tuned = flatten_metrics(_read_json(tuned_eval_dir / "summary.json"), _read_json(stage.fetch(tuned_benchmark) / "results.json"))
    verdicts = check_gates(gates, tuned, base)
    rows = side_by_side(base_eval_dir / "answers.parquet", tuned_eval_dir / "answers.parquet")
    passed = all(v["passed"] for v in verdicts)
    (stage.dir / "verdicts.json").write_text(json.dumps({"passed": passed, "verdicts": verdicts}, indent=2), encoding="utf-8")
    (stage.dir / "metrics.json").write_text(json.dumps({"base": base, "fine_tuned": tuned}, indent=2), encoding="utf-8")
    _write_csv(stage.dir / "side_by_side.csv", rows)
    create_markdown_artifact(markdown=summary_markdown(tuned, base, verdicts), key="metrics-and-gates", description="Base vs fine-tuned, and gate verdicts")
    create_table_artifact(table=rows[:20], key="side-by-side", description="First 20 test questions: base vs fine-tuned answers")
    return stage.commit(meta={"passed": passed, "verdicts": verdicts, "base": base, "fine_tuned": tuned})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["question"])
        writer.writeheader()
        writer.writerows(rows)
