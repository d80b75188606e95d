"""The fine-tuning flow: collect -> template -> tokenize -> validate -> split -> train -> evaluate
-> benchmark -> gate, looping back into data preparation while gates fail.

In: a config file path and dotted overrides (the deployment parameters). Out: a
run summary (each stage's state, seconds and key figures per round, the gate
verdicts, the round history, where the model is). Every stage is a
content-addressed, cached task (`pipeline.stage`), so an unchanged rerun shows
every stage `Cached`.

The loop: when a gate fails and `refine.max_rounds` allows another round, the
refine stage (tasks/refine.py) turns the failing gates into config overrides for
data preparation; the next round runs with them added. Stages whose inputs the
change does not touch (the base model's benchmark, say) come back `Cached`. A
passing round ends the run `Completed`, writes the model's card next to it in the
store (`cards/<train key>/README.md`, `pipeline/card.py`), moves the store's
`latest-passing` pointer to its model and emits the Prefect event
`finetune.model.promoted` (automations react to it); when rounds run out the run
fails with `GatesFailed`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.placed import check_placement, place_stage
from pipeline.assets import arc_data_dir
from pipeline.card import card_facts, render_card, write_card
from pipeline.config import PipelineConfig, PlacementConfig, StoreConfig, load_config
from pipeline.models import LATEST_PASSING
from pipeline.refs import Ref
from pipeline.stage import result_storage_for
from pipeline.store import open_store
from tasks.benchmark import benchmark, benchmark_looks, task_size
from tasks.collect import collect, source_fingerprints
from tasks.evaluate import evaluate, probe
from tasks.gate import gate, growth_kind
from tasks.refine import refine
from tasks.split import split
from tasks.template import template
from tasks.tokenize import tokenize
from tasks.train import train
from tasks.validate import validate


class GatesFailed(RuntimeError):
    """At least one gate failed in the last round; `summary` holds the whole run summary."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class StageLog:
    """Runs stage tasks and remembers, for the summary, each one's round, state, seconds and figures.

    A stage the config places on another work pool (`placement`, flows/placed.py) runs there as its own flow run,
    unless its artifact is already in the store: then it runs here and comes back Cached, starting nothing.
    """

    result_storage: Any
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    round: int = 1
    entries: list[dict[str, Any]] = field(default_factory=list)

    def run(self, stage_task: Any, label: str, **parameters: Any) -> Ref:
        """Run one stage task (cached on its content key) and return its Ref; a failure raises."""
        started = time.perf_counter()
        place = self.placement.of(stage_task.name)
        placed = place_stage(stage_task, label, place, parameters) if place is not None else None
        if placed is not None:
            ref, state_name = placed.ref, placed.state
        else:
            state = stage_task.with_options(result_storage=self.result_storage)(**parameters, return_state=True)
            ref, state_name = state.result(), state.name
        entry = {
            "round": self.round,
            "stage": label,
            "state": state_name,
            "seconds": round(time.perf_counter() - started, 1),
            "uri": ref.uri,
            "sha256": ref.sha256,
            "meta": ref.meta,
        }
        if placed is not None:
            entry["placed"] = placed.summary()
        self.entries.append(entry)
        return ref


@dataclass
class Round:
    """One pass of collect..gate: its gate Ref, its fine-tuned model and its fine-tuned evaluation."""

    number: int
    overrides: list[str]
    gate: Ref
    tuned: Ref
    tuned_eval: Ref

    @property
    def passed(self) -> bool:
        return bool(self.gate.meta["passed"])


def run_round(cfg: PipelineConfig, log: StageLog, earlier_evals: list[Ref], overrides: list[str]) -> Round:
    """Run every stage once for `cfg`; `earlier_evals` (earlier rounds' fine-tuned evaluations) join the Elo."""
    store = cfg.store
    collected = log.run(
        collect, "collect", config=cfg.data, fingerprints=source_fingerprints(cfg.data, store), store=store
    )
    templated = log.run(template, "template", collected=collected, config=cfg.template, model=cfg.model, store=store)
    tokenized = log.run(tokenize, "tokenize", templated=templated, config=cfg.tokenize, model=cfg.model, store=store)
    log.run(validate, "validate", collected=collected, tokenized=tokenized, config=cfg.data, store=store)
    split_data = log.run(split, "split", tokenized=tokenized, config=cfg.split, store=store)
    tuned = log.run(
        train, "train", split_data=split_data, config=cfg.train, model=cfg.model, template=cfg.template, store=store
    )
    base_eval = log.run(
        evaluate,
        "evaluate (base)",
        split_data=split_data,
        config=cfg.eval,
        model=cfg.model,
        tuned=None,
        template=cfg.template,
        store=store,
    )
    tuned_eval = log.run(
        evaluate,
        "evaluate (fine-tuned)",
        split_data=split_data,
        config=cfg.eval,
        model=cfg.model,
        tuned=tuned,
        template=cfg.template,
        store=store,
    )
    versions = [base_eval, *earlier_evals, tuned_eval]
    labels = ["base", *(f"round {n}" for n in range(1, len(versions)))]
    # Look k adds the benchmark slices of look k (more ARC questions) and doubles the probes per category, each
    # only for the kind of sample an inconclusive gate asked for; earlier items come back from the store.
    looks = benchmark_looks(cfg.benchmark, {task: task_size(task, arc_data_dir()) for task in cfg.benchmark.tasks})
    looks = looks or [[]]
    base_benches: list[Ref] = []
    tuned_benches: list[Ref] = []
    base_probes: list[Ref] = []
    tuned_probes: list[Ref] = []
    probes_relative = any(g.relative_to_base and growth_kind(g.metric) == "probes" for g in cfg.gates)
    grow = ["benchmark"]  # look 1 scores the first benchmark slice; its probes are the evaluate stage's
    for look, slices in enumerate(looks, start=1):
        for sample in slices if "benchmark" in grow else []:
            where = f"{sample.task} {sample.start}-{sample.end}"
            base_benches.append(
                log.run(
                    benchmark, f"benchmark (base, {where})", sample=sample, model=cfg.model, tuned=None, store=store
                )
            )
            tuned_benches.append(
                log.run(
                    benchmark,
                    f"benchmark (fine-tuned, {where})",
                    sample=sample,
                    model=cfg.model,
                    tuned=tuned,
                    store=store,
                )
            )
        if "probes" in grow:
            probe_stage = partial(
                log.run, probe, split_data=split_data, config=cfg.eval, model=cfg.model, template=cfg.template
            )
            tuned_probes.append(probe_stage(f"probe (fine-tuned, look {look})", tuned=tuned, look=look, store=store))
            if probes_relative:  # the base model's answers are only needed to pair a relative probe gate
                base_probes.append(probe_stage(f"probe (base, look {look})", tuned=None, look=look, store=store))
        verdict = log.run(
            gate,
            f"gate (look {look})",
            base_eval=base_eval,
            tuned_eval=tuned_eval,
            base_benchmarks=base_benches,
            tuned_benchmarks=tuned_benches,
            base_probes=base_probes,
            tuned_probes=tuned_probes,
            gates=cfg.gates,
            confidence=cfg.gates_confidence,
            on_inconclusive=cfg.gates_on_inconclusive,
            look=look,
            looks=len(looks),
            store=store,
            evaluations=versions,
            labels=labels,
            elo=cfg.elo,
        )
        if verdict.meta["status"] != "grow":
            break
        grow = verdict.meta["grow"]
    return Round(number=log.round, overrides=overrides, gate=verdict, tuned=tuned, tuned_eval=tuned_eval)


@flow(name="finetune", log_prints=False)  # log_prints breaks `datasets` fingerprinting (docs/assets.md)
def finetune(config_path: str | None = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline for the config at `config_path` with `overrides`, looping while gates fail.

    Returns the run summary; raises `GatesFailed` (run state Failed) when the last round fails a gate.
    """
    overrides = list(overrides or [])
    cfg: PipelineConfig = load_config(config_path, overrides)
    if cfg.placement.placed:
        check_placement(cfg.placement)  # deployments, pools and limits exist: before any work
    log = StageLog(result_storage_for(cfg.store), cfg.placement)
    rounds: list[Round] = []
    history: list[dict[str, Any]] = []
    refinements: list[str] = []
    for number in range(1, cfg.refine.max_rounds + 1):
        log.round = number
        round_cfg = load_config(config_path, [*overrides, *refinements]) if refinements else cfg
        current = run_round(round_cfg, log, [r.tuned_eval for r in rounds], list(refinements))
        rounds.append(current)
        history.append(round_record(current))
        if current.passed or number == cfg.refine.max_rounds:
            break
        plan = log.run(refine, "refine", verdicts=current.gate, data=round_cfg.data, config=cfg.refine, store=cfg.store)
        history[-1]["changes_next"] = plan.meta["changes"]
        if not plan.meta["changes"]:
            break  # nothing in the table applies any more: another round would repeat this one
        refinements += [o for change in plan.meta["changes"] for o in change["overrides"]]
        publish_history(history)

    final = rounds[-1]
    summary = {
        "stages": log.entries,
        "rounds": history,
        "passed": final.passed,
        "verdicts": final.gate.meta["verdicts"],
        "metrics": {
            "base": final.gate.meta["base"],
            "fine_tuned": final.gate.meta["fine_tuned"],
            "intervals": final.gate.meta["intervals"],
        },
        "ranking": final.gate.meta["ranking"],
        "store": cfg.store.uri,
        "model_uri": f"{final.tuned.uri}/model",
        "gate_uri": final.gate.uri,
        "refinements": refinements,
    }
    publish_history(history)
    create_markdown_artifact(
        markdown=summary_table(summary), key="run-summary", description="Stages, figures and verdicts"
    )
    if not final.passed:
        failed = [v["gate"] for v in summary["verdicts"] if not v["passed"]]
        raise GatesFailed(f"gates failed after {len(rounds)} round(s): {'; '.join(failed)}", summary)
    card = publish_model_card(cfg, log, final, config_path, [*overrides, *refinements])
    summary["card"] = card
    summary["latest_passing"] = mark_latest_passing(cfg.store, final, config_path, [*overrides, *refinements], card)
    announce_promotion(cfg.store, final, card)
    return summary


def round_record(current: Round) -> dict[str, Any]:
    """A round-history row: the round's config changes so far, its gate metrics and verdicts."""
    return {
        "round": current.number,
        "overrides": current.overrides,
        "passed": current.passed,
        "verdicts": current.gate.meta["verdicts"],
        "metrics": current.gate.meta["fine_tuned"],
        "model_uri": f"{current.tuned.uri}/model",
        "gate_uri": current.gate.uri,
        "changes_next": [],
    }


def publish_history(history: list[dict[str, Any]]) -> None:
    """The round-history table in the Prefect UI: round, changes made before it, gate figures, verdicts, next
    changes."""
    rows = []
    for record in history:
        rows.append(
            {
                "round": record["round"],
                "data changes applied": "; ".join(record["overrides"]) or "(config as given)",
                "gates": "; ".join(f"{v['gate']}: {verdict_text(v)}" for v in record["verdicts"]),
                "passed": record["passed"],
                "next": "; ".join(f"{c['change']} ({c['why']})" for c in record["changes_next"]) or "-",
                "model": record["model_uri"],
            }
        )
    create_table_artifact(
        table=rows, key="round-history", description="Each round of the gate loop: changes, figures, verdicts"
    )


def publish_model_card(
    cfg: PipelineConfig, log: StageLog, passing: Round, config_path: str | None, overrides: list[str]
) -> str:
    """Write the passing model's card next to it in the store (`cards/<train key>/README.md`, `card.json`) and
    show it in the Prefect UI; returns the card's store path.

    Every figure comes from the passing round's artifacts (`pipeline.card`); the model artifact itself stays as it
    was committed.
    """
    store = open_store(cfg.store)
    facts = card_facts(
        store,
        [entry for entry in log.entries if entry["round"] == passing.number],
        cfg,
        config_path=config_path,
        overrides=overrides,
        flow_run_id=str(flow_run.get_id() or ""),
        round_number=passing.number,
    )
    path = write_card(store, facts)
    create_markdown_artifact(
        markdown=render_card(facts), key="model-card", description=f"Model card of {facts['alias']}"
    )
    return path


def mark_latest_passing(
    store_config: StoreConfig, passing: Round, config_path: str | None, overrides: list[str], card: str | None = None
) -> str:
    """Point the store's `latest-passing` pointer at `passing`'s model; returns the pointer's location.

    The pointer is one small JSON object written in a single put, so readers see the
    old pointer or the new one, never a mixture.
    """
    pointer = {
        "model_uri": f"{passing.tuned.uri}/model",
        "train_uri": passing.tuned.uri,
        "train_sha256": passing.tuned.sha256,
        "gate_uri": passing.gate.uri,
        "round": passing.number,
        "config_path": config_path,
        "overrides": overrides,
        "flow_run_id": str(flow_run.get_id() or ""),
        "card": card,
        "marked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store = open_store(store_config)
    store.put_bytes(LATEST_PASSING, json.dumps(pointer, indent=2).encode("utf-8"))
    return store.location(LATEST_PASSING)


PROMOTED_EVENT = "finetune.model.promoted"
"""The Prefect event a passing run emits once `latest-passing` points at its model (deployments/ reacts to it)."""
GATE_FIGURES = ("gate", "metric", "estimate", "low", "high", "n", "confidence", "method", "verdict", "passed")


def announce_promotion(store_config: StoreConfig, passing: Round, card: str | None) -> None:
    """Emit `finetune.model.promoted`: resource = the model's location (a folder or s3:// uri), payload = its alias,
    where it is (store, uris, sha256, card) and the gate figures (estimate, interval, n, verdict per gate).

    Automations react to it (deployments/: a smoke test of the promoted model). The store's credentials are never
    part of it. Outside a Prefect API (events switched off) nothing is sent.
    """
    from prefect.events import emit_event

    store = open_store(store_config)
    root = store.uri if "://" in store.uri else str(Path(store.uri).resolve())
    model_uri = f"{passing.tuned.uri}/model"
    alias = str(passing.tuned.meta.get("alias", ""))
    emit_event(
        event=PROMOTED_EVENT,
        resource={
            "prefect.resource.id": store.location(model_uri),
            "prefect.resource.name": alias,
            "finetune.store": root,
            "finetune.model-uri": model_uri,
        },
        payload={
            "alias": alias,
            "store": root,
            "model_uri": model_uri,
            "train_uri": passing.tuned.uri,
            "train_sha256": passing.tuned.sha256,
            "gate_uri": passing.gate.uri,
            "card": card,
            "round": passing.number,
            "gates": [{k: v.get(k) for k in GATE_FIGURES} for v in passing.gate.meta["verdicts"]],
            "metrics": passing.gate.meta["fine_tuned"],
        },
    )


SUMMARY_EVAL_METRICS = ("eval.similarity_mean", "eval.exact_match", "eval.rouge_l", "eval.refusal_rate", "eval.ok_rate")


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown table of the run: round, stage, ran or cached, seconds, key figures; then metrics and verdicts."""
    lines = ["| round | stage | state | seconds | figures |", "|---|---|---|---|---|"]
    for entry in summary["stages"]:
        figures = ", ".join(
            f"{k}={_short(v)}"
            for k, v in entry["meta"].items()
            if k not in ("verdicts", "base", "fine_tuned", "ranking", "changes", "intervals")
        )
        if entry["stage"] == "refine":
            figures = ", ".join(c["change"] for c in entry["meta"]["changes"]) or "no change applies"
        state = entry["state"] + (f" on {entry['placed']['work_pool']}" if "placed" in entry else "")
        lines.append(f"| {entry['round']} | {entry['stage']} | {state} | {entry['seconds']} | {figures} |")
    base, tuned = summary["metrics"]["base"], summary["metrics"]["fine_tuned"]
    lines += ["", "| metric | base | fine-tuned (last round) |", "|---|---|---|"]
    lines += [
        f"| {name} | {base[name]:.3f} | {tuned[name]:.3f} |"
        for name in sorted(tuned)
        if name in base and (name.startswith("benchmark") or name in SUMMARY_EVAL_METRICS)
    ]
    lines += ["", "| gate | estimate [interval], n, verdict |", "|---|---|"]
    lines += [f"| {v['gate']} | {verdict_text(v)} |" for v in summary["verdicts"]]
    return "\n".join(lines)


def verdict_text(verdict: dict[str, Any]) -> str:
    """'pass', 'FAIL', or 'inconclusive -> FAIL (gates_on_inconclusive)' with the interval, for tables."""
    interval = f"{verdict['estimate']:+.3f} [{verdict['low']:+.3f}, {verdict['high']:+.3f}], n={verdict['n']}"
    decided = "pass" if verdict["passed"] else "FAIL"
    if verdict["decided_by"] != "interval":
        decided = f"inconclusive -> {decided} (gates_on_inconclusive)"
    elif verdict["verdict"] == "inconclusive":
        decided = "inconclusive"
    return f"{interval} {decided}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)
