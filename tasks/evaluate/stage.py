"""The evaluate stage body: one model answers the test questions and the probes, every answer scored, written out.

`evaluate_model` is the core (a model folder and a split in, an `EvalResult` out); `evaluate` is the stage task
(name "evaluate").
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import resolve_model
from pipeline.config import EvalConfig, ModelConfig, TemplateConfig
from pipeline.models import check_tokenizer_files, load_model, load_tokenizer, pick_device, trained_model_folder
from pipeline.prompts import render_prompt
from pipeline.stage import Artifact, stage_task
from tasks.evaluate.probes import look_probes, probe_candidates, select_probes
from tasks.evaluate.questions import read_test_rows, row_question, seen_questions, split_targets, taught_packages
from tasks.evaluate.scoring import RefusalDetector, load_encoder, refusal_references, score_answers
from tasks.evaluate.summary import probe_figures, summarise

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What one evaluation produces: per-question rows, probe rows and the summary."""

    rows: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    summary: dict[str, Any]


def evaluate_model(
    folder: str, split_dir: Path, config: EvalConfig, template: TemplateConfig, trust_remote_code: bool = False
) -> EvalResult:
    """Generate and score answers to the test questions and the probes with the model in `folder`.

    Checks that can fail (empty split, missing tokenizer) run before the model loads.
    """
    # generation imports torch: imported where a model answers, so a flow whose evaluate is Cached never does.
    from tasks.evaluate.generation import generate_answers

    test_rows, excluded = read_test_rows(split_dir / "test.parquet", config.limit)
    check_tokenizer_files(folder)
    seen, taught = seen_questions(split_dir, template), taught_packages(split_dir)
    if config.probe_counts.get("on_topic") and not taught:
        log.warning("eval: no docs source in the split, so no on_topic probes and no false_refusal_rate")
    probes = select_probes(probe_candidates(config, taught, seen), config.probe_counts, config.probe_questions, seen)
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=trust_remote_code)
    model = load_model(folder, device=pick_device(), trust_remote_code=trust_remote_code)
    # The tokenizer renders the chat template, when that is the template in use.
    test_prompts = [row["prompt"] for row in test_rows]
    probe_prompts = [render_prompt(p["question"], template, tokenizer=tokenizer) for p in probes]
    started = time.perf_counter()
    generate = partial(
        generate_answers, model, tokenizer, batch_size=config.batch_size, repetition_penalty=config.repetition_penalty
    )
    answers = generate(test_prompts, max_new_tokens=config.max_new_tokens)
    probe_answers = generate(probe_prompts, max_new_tokens=probe_token_cap(config))
    seconds = time.perf_counter() - started
    del model  # free it before the embedding model loads
    targets = [row["completion"] for row in test_rows]
    detector = refusal_detector(split_dir, config, taught)
    questions = [row_question(row, template) for row in test_rows]
    rows = score_answers(questions, targets, answers, config, detector)
    for row, test_row in zip(rows, test_rows):
        row.update(id=test_row["id"], prompt=test_row["prompt"])
    probe_rows = score_probes(probes, probe_answers, detector)
    summary = summarise(rows, probe_rows, excluded["empty_target"], excluded["no_prompt"])
    summary.update(
        generation_seconds=round(seconds, 3),
        answers_per_second=round(len(test_prompts + probe_prompts) / max(seconds, 1e-9), 3),
    )
    return EvalResult(rows, probe_rows, summary)


def probe_token_cap(config: EvalConfig) -> int:
    """New tokens a probe's answer may take: eval.probe_max_new_tokens, never more than eval.max_new_tokens."""
    return min(config.probe_max_new_tokens, config.max_new_tokens)


def refusal_detector(split_dir: Path, config: EvalConfig, taught: list[str]) -> RefusalDetector:
    """The detector of declined answers: the split's refusal sentences as references, the taught packages masked."""
    references = refusal_references(split_targets(split_dir))
    return RefusalDetector(load_encoder(), references, config.refusal_similarity, subjects=taught)


def score_probes(probes: list[dict[str, Any]], answers: list[str], detector: RefusalDetector) -> list[dict[str, Any]]:
    """Probe rows with their answer, whether it declined and its cosine to the nearest refusal sentence."""
    declined, refusal_sim = detector(answers)
    return [
        {**p, "answer": a, "declined": d, "refusal_similarity": s}
        for p, a, d, s in zip(probes, answers, declined, refusal_sim)
    ]


ANSWER_COLUMNS = (
    "id",
    "question",
    "target",
    "answer",
    "category",
    "categories",
    "exact_match",
    "similarity",
    "rouge_l",
    "token_f1",
    "length_ratio",
    "repetition",
    "empty",
    "declined",
    "refusal_similarity",
    "offtopic_question",
    "prompt",
)


def write_outputs(result: EvalResult, folder: Path) -> None:
    """answers.parquet, answers.csv, probes.parquet and summary.json into `folder`."""
    rows = [{name: row[name] for name in ANSWER_COLUMNS} for row in result.rows]
    pq.write_table(pa.Table.from_pylist(rows), folder / "answers.parquet")
    with (folder / "answers.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ANSWER_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    write_probes(result.probes, folder)
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2), encoding="utf-8")


PROBE_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("category", pa.string()),
        ("expected", pa.string()),
        ("source", pa.string()),
        ("answer", pa.string()),
        ("declined", pa.bool_()),
        ("refusal_similarity", pa.float64()),
    ]
)
"""probes.parquet's columns, written by the evaluate stage (look 1) and the probe stage (later looks)."""


def write_probes(probes: list[dict[str, Any]], folder: Path) -> None:
    """probes.parquet in `folder` (PROBE_SCHEMA's columns; extra keys such as `subject` are left out)."""
    rows = [{name: p[name] for name in PROBE_SCHEMA.names} for p in probes]
    pq.write_table(pa.Table.from_pylist(rows, schema=PROBE_SCHEMA), folder / "probes.parquet")


@stage_task("evaluate")
def evaluate(
    split_data: Path,
    config: EvalConfig,
    model: ModelConfig,
    tuned: Artifact | None,
    template: TemplateConfig,
    out: Path,
) -> dict[str, Any]:
    """Evaluate the fine-tuned model (or the base model when `tuned` is None) on the test split and the probes.

    Out: answers.parquet/.csv, probes.parquet and summary.json in `out`; returns the key figures.
    """
    folder = trained_model_folder(tuned.path) if tuned is not None else resolve_model(model.name)
    result = evaluate_model(folder, split_data, config, template, model.trust_remote_code)
    # A name and a store location, not this machine's cache path: the summary travels.
    result.summary["model"] = "fine-tuned" if tuned is not None else model.name
    result.summary["model_ref"] = tuned.ref.uri if tuned is not None else model.name
    write_outputs(result, out)
    figures = (
        "n",
        "excluded_empty_target",
        "excluded_no_prompt",
        "exact_match",
        "similarity_mean",
        "rouge_l",
        "refusal_rate",
    )
    meta = {key: result.summary[key] for key in figures if key in result.summary}
    return {**meta, "model": result.summary["model"]}


@stage_task("probe")
def probe(
    split_data: Path,
    config: EvalConfig,
    model: ModelConfig,
    tuned: Artifact | None,
    template: TemplateConfig,
    look: int,
    out: Path,
) -> dict[str, Any]:
    """Answer the moderation probes look `look` (2 or later) adds, with the fine-tuned model (or the base model
    when `tuned` is None): a probe gate that its evaluation left inconclusive gets twice the probes per look.

    Out: probes.parquet in `out` (the new probes only; the gate stage joins them to the evaluate stage's); returns
    the look, the probes answered and how many declined, per category.
    """
    from tasks.evaluate.generation import generate_answers  # torch: imported here, as in evaluate_model

    folder = trained_model_folder(tuned.path) if tuned is not None else resolve_model(model.name)
    check_tokenizer_files(folder)
    seen, taught = seen_questions(split_data, template), taught_packages(split_data)
    probes = look_probes(config, taught, seen, look)
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=model.trust_remote_code)
    loaded = load_model(folder, device=pick_device(), trust_remote_code=model.trust_remote_code)
    prompts = [render_prompt(p["question"], template, tokenizer=tokenizer) for p in probes]
    answers = generate_answers(
        loaded,
        tokenizer,
        prompts,
        max_new_tokens=probe_token_cap(config),
        batch_size=config.batch_size,
        repetition_penalty=config.repetition_penalty,
    )
    del loaded  # free it before the embedding model loads
    rows = score_probes(probes, answers, refusal_detector(split_data, config, taught))
    write_probes(rows, out)
    figures = probe_figures(rows)["probe_counts"]  # {category: {"n", "declined"}}, as the evaluate summary has
    return {"look": look, "n": len(rows), "model": "fine-tuned" if tuned is not None else model.name, **figures}
