"""The sweep flow: the fine-tuning flow over a grid of data shares, models, methods and learning rates.

In: a config file path and dotted overrides; the config's `sweep` section holds the grid
(`sweep.fractions`, `sweep.models`, `sweep.methods`, `sweep.learning_rates`; an empty list
keeps the config's own value). Out: a summary with one row per grid point (train rows,
train and eval loss, similarity, exact match, benchmark change, tokens seen, wall time),
stored under `sweeps/<key>/` (table.json, table.csv, learning_curve.png, manifest last; the
key hashes the table) and shown in the Prefect UI as a table and a markdown artifact with
the learning curve (the chosen metric against training rows, one line per
model/method/learning rate, the base model at 0 rows).

Each grid point is one run of `flows.finetune.finetune` as a subflow, with the point's
values as overrides (`train.train_fraction`, `model.name`, `train.method`,
`train.learning_rate`). Every stage is content-addressed, so what a point does not change
(collect, template, tokenize, validate, split, the base model's evaluation and benchmark)
comes back Cached from the first point that ran it. A point whose gates fail (or that
fails outright) is recorded and the sweep goes on; the sweep fails only when no point
produced figures.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.finetune import GatesFailed, finetune
from pipeline.config import PipelineConfig, load_config
from pipeline.refs import content_key
from pipeline.store import ArtifactStore, CorruptArtifact, open_store, sha256_bytes

VERSION = "1"
SWEEPS_PREFIX = "sweeps"
TABLE_JSON, TABLE_CSV, PLOT_FILE = "table.json", "table.csv", "learning_curve.png"
# Stages that only depend on the data and the base model: Cached after the first point of a model. The base
# model's benchmark runs as one stage per question slice ("benchmark (base, arc_easy 0-200)"): a prefix here.
SHARED_STAGES = ("collect", "template", "tokenize", "validate", "split", "evaluate (base)", "benchmark (base, ")


def is_shared_stage(label: str) -> bool:
    """Whether a stage label (as the flow's summary names it) is one of SHARED_STAGES or a slice of one."""
    return any(label == shared or (shared.endswith(", ") and label.startswith(shared)) for shared in SHARED_STAGES)


# train_loss: the mean over the run as the Trainer reports it (the last step's loss can come from a short final
# batch); training_seconds: the optimizer steps when the model was trained (also for a point whose train stage
# came back Cached); wall_seconds: the point's whole subflow in this sweep.
# similarity_low/high: the fine-tuned similarity's interval (bootstrap); benchmark_delta_low/high: the paired
# interval of fine-tuned - base on the same questions (benchmark_n of them), both at gates_confidence.
COLUMNS = (
    "point",
    "model",
    "method",
    "learning_rate",
    "fraction",
    "train_rows",
    "steps",
    "train_loss",
    "eval_loss",
    "similarity",
    "similarity_low",
    "similarity_high",
    "exact_match",
    "benchmark_delta",
    "benchmark_delta_low",
    "benchmark_delta_high",
    "benchmark_n",
    "tokens_seen",
    "training_seconds",
    "wall_seconds",
    "passed",
    "state",
)


class SweepFailed(RuntimeError):
    """No grid point produced figures; the message lists each point's error."""


@dataclass(frozen=True)
class GridPoint:
    """One combination of the grid: a share of the train split, a base model, a method and a learning rate."""

    fraction: float
    model: str
    method: str
    learning_rate: float

    @property
    def series(self) -> str:
        """The learning-curve line this point belongs to: model / method / learning rate."""
        return f"{self.model} / {self.method} / lr {self.learning_rate:g}"

    @property
    def label(self) -> str:
        """E.g. 'smollm2-135m-instruct / full / lr 5e-05 / 12.5%'."""
        return f"{self.series} / {self.fraction * 100:g}%"

    def overrides(self) -> list[str]:
        """Config overrides for this point (JSON values are valid YAML, so types survive)."""
        return [
            f"train.train_fraction={json.dumps(self.fraction)}",
            f"model.name={json.dumps(self.model)}",
            f"train.method={self.method}",
            f"train.learning_rate={json.dumps(self.learning_rate)}",
        ]


def grid_points(config: PipelineConfig) -> list[GridPoint]:
    """Every point of `config.sweep`'s grid, grouped by series with the fractions ascending (empty lists: the
    config's value)."""
    sweep = config.sweep
    models = sweep.models or [config.model.name]
    methods = sweep.methods or [config.train.method]
    rates = sweep.learning_rates or [config.train.learning_rate]
    return [
        GridPoint(fraction, model, method, rate)
        for model, method, rate, fraction in itertools.product(models, methods, rates, sweep.fractions)
    ]


# --------------------------------------------------------------------------- one point's figures


def read_verified_json(store: ArtifactStore, uri: str, name: str) -> dict[str, Any]:
    """One JSON file of a committed artifact, checked against its manifest's sha256 (without fetching the rest).

    Raises CorruptArtifact when the bytes do not match, ArtifactNotFound when missing.
    """
    manifest = store.read_manifest(uri) or {}
    data = store.get_bytes(f"{uri}/{name}")
    expected = manifest.get("files", {}).get(name, {}).get("sha256")
    if expected != sha256_bytes(data):
        raise CorruptArtifact(uri, name, str(expected), sha256_bytes(data))
    return json.loads(data)


def point_record(
    point: GridPoint, outcome: Any, seconds: float, benchmark_task: str, store: ArtifactStore
) -> dict[str, Any]:
    """A point's row (COLUMNS) plus what the sweep keeps beside it: base metrics, stage states, metric values.

    `outcome` is what the point's subflow returned: its summary, GatesFailed (carrying the
    summary) or another exception.
    """
    record: dict[str, Any] = {
        "point": point.label,
        "series": point.series,
        "model": point.model,
        "method": point.method,
        "learning_rate": point.learning_rate,
        "fraction": point.fraction,
        "overrides": point.overrides(),
        "wall_seconds": round(seconds, 1),
    }
    summary = outcome.summary if isinstance(outcome, GatesFailed) else outcome
    if not isinstance(summary, dict):
        return record | {
            "state": "Failed",
            "passed": False,
            "error": f"{type(outcome).__name__}: {outcome}",
            "stages": [],
        }
    train = next(e for e in reversed(summary["stages"]) if e["stage"] == "train")
    report = read_verified_json(store, train["uri"], "report.json")
    base, tuned = summary["metrics"]["base"], summary["metrics"]["fine_tuned"]
    intervals = summary["metrics"]["intervals"]
    delta_name = f"benchmark.{benchmark_task}.acc_norm"
    similarity = intervals.get("eval.similarity_mean", {}).get("value", {})
    delta = intervals.get(delta_name, {}).get("difference", {})
    return record | {
        "train_rows": report["train_rows"],
        "steps": report["steps"],
        "train_loss": report["mean_train_loss"],
        "final_train_loss": report["final_train_loss"],
        "eval_loss": report["test_loss"],
        "similarity": tuned.get("eval.similarity_mean"),
        "exact_match": tuned.get("eval.exact_match"),
        "similarity_low": similarity.get("low"),
        "similarity_high": similarity.get("high"),
        "benchmark_delta": tuned[delta_name] - base[delta_name] if delta_name in tuned and delta_name in base else None,
        "benchmark_delta_low": delta.get("low"),
        "benchmark_delta_high": delta.get("high"),
        "benchmark_n": delta.get("n"),
        "tokens_seen": report["non_padding_tokens"],
        "training_seconds": report["training_seconds"],
        "passed": bool(summary["passed"]),
        "state": "Completed" if summary["passed"] else "Gates failed",
        "train_uri": train["uri"],
        "model_uri": summary["model_uri"],
        "base": base,
        "fine_tuned": tuned,
        "intervals": intervals,
        "report": {k: report[k] for k in ("test_loss", "final_train_loss", "mean_train_loss")},
        "stages": [{"stage": e["stage"], "state": e["state"], "round": e["round"]} for e in summary["stages"]],
    }


def metric_interval(record: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """The fine-tuned value's interval for an eval./benchmark. metric, when the gate stage computed one."""
    value = record.get("intervals", {}).get(metric, {}).get("value")
    return (value["low"], value["high"]) if value else None


def metric_value(record: dict[str, Any], metric: str, side: str = "fine_tuned") -> float | None:
    """The sweep metric for a point's record: eval./benchmark. from the gate metrics, train. from the training
    report."""
    if metric.startswith("train."):
        return None if side == "base" else record.get("report", {}).get(metric.removeprefix("train."))
    return record.get(side, {}).get(metric)


# --------------------------------------------------------------------------- outputs


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records cut down to COLUMNS, floats rounded to 4 significant digits for reading (5e-05 stays 5e-05)."""
    return [{c: float(f"{r[c]:.4g}") if isinstance(r.get(c), float) else r.get(c) for c in COLUMNS} for r in records]


def table_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV text, COLUMNS in order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown (missing figures as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot_learning_curve(records: list[dict[str, Any]], metric: str) -> bytes:
    """PNG bytes: `metric` against training rows, one line per series with interval error bars, the base model at
    0 rows when it has the metric."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for series in dict.fromkeys(r["series"] for r in records):
        points = [r for r in records if r["series"] == series and metric_value(r, metric) is not None]
        if not points:
            continue
        xs, ys = [r["train_rows"] for r in points], [metric_value(r, metric) for r in points]
        base = metric_value(points[0], metric, side="base")
        if base is not None:
            xs, ys = [0, *xs], [base, *ys]
        line = axis.plot(xs, ys, "o-", label=series)[0]
        # Error bars where the gate stage gave an interval: a real gain is one whose bars clear the base's value.
        bars = [(x, y, metric_interval(r, metric)) for x, y, r in zip(xs[-len(points) :], ys[-len(points) :], points)]
        bars = [(x, y, i) for x, y, i in bars if i is not None]
        if bars:
            axis.errorbar(
                [b[0] for b in bars],
                [b[1] for b in bars],
                yerr=[[b[1] - b[2][0] for b in bars], [b[2][1] - b[1] for b in bars]],
                fmt="none",
                ecolor=line.get_color(),
                capsize=3,
            )
    axis.set_xlabel("training rows")
    axis.set_ylabel(metric)
    axis.set_title(
        f"{metric} against training data" + (" (0 rows: the base model)" if not metric.startswith("train.") else ""),
        fontsize=10,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(
        buffer, format="png", dpi=90, metadata={"Software": None}
    )  # no version stamp: same figures, same bytes
    plt.close(figure)
    return buffer.getvalue()


def store_sweep(
    store: ArtifactStore,
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    plot: bytes,
    config: PipelineConfig,
    config_path: str | None,
    overrides: list[str],
) -> str:
    """Commit table.json, table.csv and the plot under sweeps/<key>/ (key: hash of the records); returns the uri."""
    document = {
        "metric": config.sweep.metric,
        "config_path": config_path,
        "overrides": overrides,
        "sweep": config.sweep.model_dump(mode="json"),
        "rows": rows,
        "points": records,
    }
    key = content_key("sweep", VERSION, {"document": document})
    uri = f"{SWEEPS_PREFIX}/{key}"
    staging = Path(tempfile.mkdtemp(prefix="finetune-sweep-"))
    try:
        (staging / TABLE_JSON).write_text(json.dumps(document, indent=2), encoding="utf-8")
        (staging / TABLE_CSV).write_text(table_csv(rows), encoding="utf-8")
        (staging / PLOT_FILE).write_bytes(plot)
        inputs = {r["point"]: store.open_ref(r["train_uri"]).sha256 for r in records if r.get("train_uri")}
        store.commit(
            uri,
            staging,
            kind="sweep",
            inputs=inputs,
            config=config.sweep,
            meta={"points": len(records), "metric": config.sweep.metric},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return uri


def publish(rows: list[dict[str, Any]], plot: bytes, metric: str, location: str) -> None:
    """The sweep in the Prefect UI: the table, and a markdown report with the learning curve embedded as a data: URI."""
    create_table_artifact(table=rows, key="sweep-table", description="One row per grid point of the sweep")
    image = base64.b64encode(plot).decode("ascii")
    create_markdown_artifact(
        markdown=f"## Sweep\n\nStored at `{location}`.\n\n"
        f"![learning curve](data:image/png;base64,{image})\n\n{table_markdown(rows)}\n",
        key="sweep-learning-curve",
        description=f"{metric} against training rows",
    )


# --------------------------------------------------------------------------- the flow


@flow(name="sweep", log_prints=False)  # log_prints breaks `datasets` fingerprinting (docs/assets.md)
def sweep(config_path: str | None = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the fine-tuning flow for every point of the config's sweep grid; returns the sweep summary.

    Summary: `rows` (the table), `points` (each point's full record: stage states, base and
    fine-tuned metrics, overrides), `uri` (sweeps/<key> in the store), `store`, `metric`.
    Raises SweepFailed when no point produced figures.
    """
    log = get_run_logger()
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    store = open_store(config.store)
    # One round per point unless asked: a refined point would train on other data than its share says.
    shared = overrides + ([] if config.sweep.refine else ["refine.max_rounds=1"])
    records = []
    for number, point in enumerate(grid_points(config), start=1):
        log.info("sweep point %d: %s", number, point.label)
        started = time.perf_counter()
        run = finetune.with_options(flow_run_name=f"sweep point {number}: {point.label}")
        state = run(config_path=config_path, overrides=[*shared, *point.overrides()], return_state=True)
        outcome = state.result(raise_on_failure=False)
        records.append(point_record(point, outcome, time.perf_counter() - started, config.benchmark.tasks[0], store))
    if all("error" in r for r in records):
        raise SweepFailed(
            "no sweep point produced figures:\n" + "\n".join(f"{r['point']}: {r['error']}" for r in records)
        )
    rows = table_rows(records)
    plot = plot_learning_curve([r for r in records if "error" not in r], config.sweep.metric)
    uri = store_sweep(store, records, rows, plot, config, config_path, overrides)
    publish(rows, plot, config.sweep.metric, store.location(uri))
    log.info("sweep stored at %s", store.location(uri))
    return {
        "rows": rows,
        "points": records,
        "uri": uri,
        "store": config.store.uri,
        "metric": config.sweep.metric,
        "plot": f"{uri}/{PLOT_FILE}",
    }
