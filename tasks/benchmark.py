"""Benchmark stage: general-skill scores through lm-eval, to catch forgetting.

In: a model folder (Hugging Face layout), a list of local task names, and the ARC
data folder from `pipeline.assets.arc_data_dir()`. Out: a plain dict of scores
(accuracy, length-normalised accuracy, their standard errors) with the harness
version, task version, few-shot count and sample count recorded next to every score.

The built-in lm-eval `arc_easy`/`arc_challenge` tasks fetch `allenai/ai2_arc` from
the hub, which is out of reach here. `write_task_files` writes task YAMLs with the
same names, prompt, target, choices and metrics, reading local JSON Lines instead,
so the scores are comparable with published lm-eval ARC numbers. Nothing here
touches the artifact store or Prefect; the `@task` wrapper at the bottom does I/O.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

#: Task name -> (folder under `arc_data_dir()`, split the task is scored on).
LOCAL_TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc_easy", "test"),
    "arc_challenge": ("arc_challenge", "test"),
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
        raise UnknownBenchmarkTask(
            f"benchmark.tasks is empty, expected one or more of {sorted(LOCAL_TASKS)}"
        )
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise UnknownBenchmarkTask(
            f"unknown benchmark task(s) {unknown}, expected one or more of "
            f"{sorted(LOCAL_TASKS)} (local tasks; the hub is out of reach)"
        )
    return list(dict.fromkeys(tasks))


def _task_config(name: str, data_dir: Path, num_fewshot: int) -> dict[str, Any]:
    """One lm-eval task config equal to lm-eval's built-in ARC task but on local files."""
    folder, eval_split = LOCAL_TASKS[name]
    base = Path(data_dir).expanduser().resolve() / folder
    files = {split: base / f"{split}.jsonl" for split in _SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark task {name!r} needs {', '.join(_SPLITS)} JSON Lines under {base}, "
            f"missing {missing}"
        )
    prompt = "Question: {{question}}\nAnswer:"
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(p) for split, p in files.items()}},
        "output_type": "multiple_choice",
        "training_split": "train",
        "validation_split": "validation",
        "test_split": eval_split,
        "fewshot_split": "train",
        "num_fewshot": num_fewshot,
        "doc_to_text": prompt,
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "should_decontaminate": True,
        "doc_to_decontamination_query": prompt,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS
        ],
        "metadata": {"version": 1.0},
    }


def write_task_files(tasks: list[str], data_dir: Path, out_dir: Path, num_fewshot: int) -> Path:
    """Write one lm-eval task YAML per task into `out_dir` and return `out_dir`.

    `out_dir` becomes an lm-eval `include_path`: lm-eval indexes every YAML in it, so
    give each call its own folder. Task names stay `arc_easy`/`arc_challenge`, which
    override the built-in (hub-bound) tasks when the lm-eval CLI is given
    `--include_path out_dir`. Data file paths are absolute.
    """
    tasks = _check_tasks(tasks)
    if num_fewshot < 0:
        raise ValueError(f"benchmark.num_fewshot must be >= 0, found {num_fewshot}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        text = yaml.safe_dump(
            _task_config(name, Path(data_dir), num_fewshot), sort_keys=False, allow_unicode=True
        )
        (out_dir / f"{name}.yaml").write_text(text, encoding="utf-8")
    return out_dir


def _pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _task_scores(results: dict[str, Any], name: str, limit: int | None) -> dict[str, Any]:
    """Pull one task's figures out of lm-eval's result dict (keys like 'acc,none')."""
    res = results["results"][name]
    out: dict[str, Any] = {}
    for metric in METRICS:
        out[metric] = float(res[f"{metric},none"])
        stderr = res.get(f"{metric}_stderr,none")
        out[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    n_samples = results.get("n-samples", {}).get(name, {})
    out["task_version"] = results.get("versions", {}).get(name)
    out["num_fewshot"] = results.get("n-shot", {}).get(name)
    out["limit"] = limit
    out["n_samples"] = n_samples.get("effective")
    return out


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
) -> dict[str, Any]:
    """Score the model in `model_dir` on local ARC tasks with lm-eval.

    The model is loaded here (fp32; a model passed to HFLM as an object ignores
    HFLM's own `device`, so it is moved first). Seeds are lm-eval's CLI defaults, so
    `lm_eval --model hf --model_args pretrained=<model_dir>,dtype=float32
    --include_path <task dir>` with the same limit and batch size gives the same
    scores. Returns `{"lm_eval_version", "model", "tasks": {name: {acc, acc_stderr,
    acc_norm, acc_norm_stderr, task_version, num_fewshot, limit, n_samples}}}`.
    """
    tasks = _check_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"benchmark.limit must be a positive integer or None, found {limit}")
    if batch_size <= 0:
        raise ValueError(f"benchmark.batch_size must be > 0, found {batch_size}")

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _pick_device(device)
    with tempfile.TemporaryDirectory(prefix="lmeval_tasks_") as tmp:
        # Task files first: a missing data file fails before the model loads.
        task_dir = write_task_files(tasks, Path(data_dir), Path(tmp), num_fewshot)

        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        model.to(device).eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)

        task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=_BOOTSTRAP_ITERS,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not the rank-0 process?)")

    return {
        "lm_eval_version": lm_eval.__version__,
        "model": str(model_dir),
        "tasks": {name: _task_scores(results, name, limit) for name in tasks},
    }


def format_benchmark_table(base: dict[str, Any], tuned: dict[str, Any]) -> str:
    """Markdown table comparing two `run_benchmark` results, one row per task and metric.

    Values show three decimals with the standard error; delta is fine-tuned minus base.
    A task present on one side only shows `n/a` on the other.
    """
    base_tasks = base.get("tasks", {})
    tuned_tasks = tuned.get("tasks", {})
    names = list(dict.fromkeys([*base_tasks, *tuned_tasks]))

    def cell(scores: dict[str, Any] | None, metric: str) -> str:
        if not scores or scores.get(metric) is None:
            return "n/a"
        stderr = scores.get(f"{metric}_stderr")
        return f"{scores[metric]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")

    lines = [
        "| task | metric | base | fine-tuned | delta |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in names:
        b, t = base_tasks.get(name), tuned_tasks.get(name)
        for metric in METRICS:
            if b and t and b.get(metric) is not None and t.get(metric) is not None:
                delta = f"{t[metric] - b[metric]:+.3f}"
            else:
                delta = "n/a"
            lines.append(f"| {name} | {metric} | {cell(b, metric)} | {cell(t, metric)} | {delta} |")
    return "\n".join(lines) + "\n"


# --- Prefect task below ---

import json  # noqa: E402  (the Prefect wrapper's imports stay with it)

from pipeline.config import BenchmarkConfig, ModelConfig, StoreConfig  # noqa: E402
from pipeline.refs import Ref  # noqa: E402
from pipeline.stage import begin_stage, stage_task  # noqa: E402

VERSION = "1"


@stage_task("benchmark", version=VERSION)
def benchmark(config: BenchmarkConfig, model: ModelConfig, tuned: Ref | None, store: StoreConfig) -> Ref:
    """Score the fine-tuned model (or the base model when `tuned` is None) on the configured lm-eval tasks."""
    from pipeline.assets import arc_data_dir
    from pipeline.models import model_folder

    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    folder = model_folder(tuned if tuned is not None else model, stage.store)
    result = run_benchmark(folder, list(config.tasks), limit=config.limit, num_fewshot=config.num_fewshot,
                           batch_size=config.batch_size, data_dir=arc_data_dir(), trust_remote_code=model.trust_remote_code)
    result["model"] = "fine-tuned" if tuned is not None else model.name  # a name, not this machine's cache path
    (stage.dir / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    scores = {f"{task}.{metric}": result["tasks"][task][metric] for task in result["tasks"] for metric in METRICS}
    return stage.commit(meta=scores)
