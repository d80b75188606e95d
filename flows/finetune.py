"""The fine-tuning flow: collect -> template -> tokenize -> split -> train -> evaluate -> benchmark -> gate.

In: a config file path and dotted overrides (the deployment parameters). Out: a
run summary (each stage's state, seconds and key figures, the gate verdicts, where
the model is). Every stage is a content-addressed, cached task (`pipeline.stage`),
so an unchanged rerun shows every stage `Cached`. The run fails when a gate fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from pipeline.config import PipelineConfig, load_config
from pipeline.refs import Ref
from pipeline.stage import result_storage_for
from tasks.benchmark import benchmark
from tasks.collect import collect
from tasks.evaluate import evaluate
from tasks.gate import gate
from tasks.split import split
from tasks.template import template
from tasks.tokenize import tokenize
from tasks.train import train


class GatesFailed(RuntimeError):
    """At least one gate failed; `summary` holds the whole run summary."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class StageLog:
    """Runs stage tasks and remembers, for the summary, each one's state, seconds and figures."""

    result_storage: Any
    entries: list[dict[str, Any]] = field(default_factory=list)

    def run(self, stage_task: Any, label: str, **parameters: Any) -> Ref:
        """Run one stage task (cached on its content key) and return its Ref; a failure raises."""
        started = time.perf_counter()
        state = stage_task.with_options(result_storage=self.result_storage)(**parameters, return_state=True)
        ref: Ref = state.result()
        self.entries.append({"stage": label, "state": state.name, "seconds": round(time.perf_counter() - started, 1),
                             "uri": ref.uri, "meta": ref.meta})
        return ref


@flow(name="finetune", log_prints=False)  # log_prints breaks `datasets` fingerprinting (ASSETS.md)
def finetune(config_path: str | None = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole pipeline once for the config at `config_path` with `overrides` applied."""
    cfg: PipelineConfig = load_config(config_path, overrides or [])
    log = StageLog(result_storage_for(cfg.store))
    store = cfg.store

    collected = log.run(collect, "collect", config=cfg.data, store=store)
    templated = log.run(template, "template", collected=collected, config=cfg.template, store=store)
    tokenized = log.run(tokenize, "tokenize", templated=templated, config=cfg.tokenize, model=cfg.model, store=store)
    split_data = log.run(split, "split", tokenized=tokenized, config=cfg.split, store=store)
    tuned = log.run(train, "train", split_data=split_data, config=cfg.train, model=cfg.model, store=store)
    base_eval = log.run(evaluate, "evaluate (base)", split_data=split_data, config=cfg.eval, model=cfg.model, tuned=None, store=store)
    tuned_eval = log.run(evaluate, "evaluate (fine-tuned)", split_data=split_data, config=cfg.eval, model=cfg.model, tuned=tuned, store=store)
    base_bench = log.run(benchmark, "benchmark (base)", config=cfg.benchmark, model=cfg.model, tuned=None, store=store)
    tuned_bench = log.run(benchmark, "benchmark (fine-tuned)", config=cfg.benchmark, model=cfg.model, tuned=tuned, store=store)
    verdict = log.run(gate, "gate", base_eval=base_eval, tuned_eval=tuned_eval, base_benchmark=base_bench,
                      tuned_benchmark=tuned_bench, gates=cfg.gates, store=store)

    summary = {"stages": log.entries, "passed": verdict.meta["passed"], "verdicts": verdict.meta["verdicts"],
               "metrics": {"base": verdict.meta["base"], "fine_tuned": verdict.meta["fine_tuned"]},
               "store": store.uri, "model_uri": f"{tuned.uri}/model", "gate_uri": verdict.uri}
    create_markdown_artifact(markdown=summary_table(summary), key="run-summary", description="Stages, figures and verdicts")
    if not summary["passed"]:
        failed = [v["gate"] for v in summary["verdicts"] if not v["passed"]]
        raise GatesFailed(f"gates failed: {'; '.join(failed)}", summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown table of the run: stage, ran or cached, seconds, key figures; then the verdicts."""
    lines = ["| stage | state | seconds | figures |", "|---|---|---|---|"]
    for entry in summary["stages"]:
        figures = ", ".join(f"{k}={_short(v)}" for k, v in entry["meta"].items() if k not in ("verdicts", "base", "fine_tuned"))
        lines.append(f"| {entry['stage']} | {entry['state']} | {entry['seconds']} | {figures} |")
    base, tuned = summary["metrics"]["base"], summary["metrics"]["fine_tuned"]
    lines += ["", "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {name} | {base[name]:.3f} | {tuned[name]:.3f} |" for name in sorted(tuned) if name in base
              and (name.startswith("benchmark") or name in ("eval.similarity_mean", "eval.exact_match"))]
    lines += ["", "| gate | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v['gate']} | {v['measured']:.3f} | {'pass' if v['passed'] else 'FAIL'} |" for v in summary["verdicts"]]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)
