"""Running lm-eval on the local tasks: the model loaded as lm-eval scores it, the scores and per-question rows.

`run_benchmark` scores a model folder (full, hub id or LoRA adapter) with lm-eval's defaults on `LOCAL_TASKS`,
on the first `limit` documents or on exactly `doc_ids`; `item_rows` turns lm-eval's logged samples into one row
per question, so two model versions pair up question by question.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.progress import Progress
from tasks.benchmark.task_files import LOCAL_TASKS, METRICS, _check_tasks, write_task_files

if TYPE_CHECKING:  # transformers loads only when a benchmark runs
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


#: Any positive value makes lm-eval report standard errors. For `mean` metrics
#: (acc, acc_norm) the stderr is closed-form, so this count costs nothing.
_BOOTSTRAP_ITERS = 1000


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


def reporting_lm(base: type) -> type:
    """`base` (lm-eval's HFLM) with its scoring progress in the run's log.

    lm-eval's own progress bar writes to stderr, which the Prefect run log does not show; this class logs
    '<done>/<requests> requests' every few seconds, counting the sequences of every forward pass (requests that
    share a context may share a pass, so the count can end below the total).
    """

    class ReportingLM(base):  # type: ignore[valid-type,misc]
        _progress: Progress | None = None

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            self._progress = Progress("benchmark log-likelihoods", len(requests), unit="requests")
            try:
                return super().loglikelihood(requests, disable_tqdm)
            finally:
                self._progress.finish()
                self._progress = None

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            logits = super()._model_call(inps, attn_mask, labels)
            if self._progress is not None:
                self._progress.advance(int(inps.shape[0]))
            return logits

    return ReportingLM


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
        lm = reporting_lm(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
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
