"""Stage 5, train: full fine-tuning or LoRA with the Hugging Face Trainer, resumable, on one or more processes.

In: the split artifact (`train.parquet`, `test.parquet`), `TrainConfig` and the base
model. Out, in the store under `train/<key>/`:

* `model/`: Hugging Face folder (safetensors, config, generation config, tokenizer),
  loadable with `AutoModelForCausalLM.from_pretrained`; with LoRA the adapter merged
  into the base weights (unless `train.lora.merge` is false);
* `adapter/` (LoRA only): the adapter alone, naming its base model spec, so several
  adapters per base model can be kept and loaded with peft;
* `report.json` (parameters, memory, FLOPs per step, non-padding tokens/s, padding
  share, wall time, peak memory, losses), `loss.png` (train and eval loss) and
  `train_config.json` (the resolved train and model sections);

plus a readable alias `aliases/<dataset>_<steps>_steps_<UTC time>.json` pointing at the
artifact (outside its content key), and a markdown report with the loss curve embedded
in the Prefect UI.

Training runs in its own process(es), `python -m tasks.train <job.json>`, started by
the task (or by `torchrun` / `accelerate launch` when `train.num_processes > 1`). That
keeps DataLoader workers away from Prefect's task runner (they crash at an epoch's end
inside a Prefect 3.8 task), frees all training memory when it ends, and makes a killed
run an ordinary event: checkpoints are committed to the store every `save_steps`
(`checkpoints/<train key>/checkpoint-<step>/`, manifest last) and a rerun resumes from
the latest one (weights, optimizer, scheduler, RNG states, data position) instead of
starting over. Batches are padded per batch and grouped by length, so little compute
goes to padding.

Modules: `errors` (why training stopped), `trainer` (the Trainer customised: rows, LoRA, arguments, length grouping,
metering, checkpoint upload), `checkpoints` (checkpoints in the store), `report` (the report, the loss plot and the
UI's markdown), `job` (what a training process is asked to do), `process` (inside a training process: `fine_tune`
and `main`), `launch` (starting the process(es)) and `stage` (the `train` task); `__main__` makes `python -m
tasks.train` run `main`. This module re-exports their public names, each imported on first use (PEP 562): a training
process has no use for `stage` and the Prefect it imports (about 2 s of CPU per training started), and a flow
process has no use for torch and transformers until a stage body trains or evaluates.
"""

from __future__ import annotations

from pipeline.lazy_exports import lazy_exports

# The submodule that defines each re-exported name.
EXPORTS: dict[str, tuple[str, ...]] = {
    "checkpoints": (
        "CHECKPOINT_DIR_PREFIX",
        "CHECKPOINTS_PREFIX",
        "checkpoint_prefix",
        "checkpoint_step",
        "restore_checkpoints",
        "stored_checkpoints",
        "sync_checkpoints",
    ),
    "errors": (
        "ERROR_FILE",
        "EXIT_KNOWN_ERROR",
        "KNOWN_ERRORS",
        "TrainingError",
        "TrainingOutOfMemory",
        "is_out_of_memory",
        "out_of_memory_error",
    ),
    "launch": (
        "REPO_ROOT",
        "job_store",
        "launch_command",
        "run_training",
        "training_env",
        "training_failure",
    ),
    "job": ("TrainJob",),
    "process": (
        "export_model",
        "final_eval_loss",
        "fine_tune",
        "main",
        "peak_memory",
        "reset_peak_memory",
    ),
    "report": (
        "LOSS_PLOT_FILE",
        "REPORT_FILE",
        "build_report",
        "plot_loss",
        "report_markdown",
    ),
    "stage": (
        "check_before_launch",
        "keep_trained_model",
        "train",
    ),
    "trainer": (
        "EvalProgress",
        "LengthGroupedSampler",
        "MeteredTrainer",
        "StepTimer",
        "StoreCheckpoints",
        "TokenMeter",
        "apply_lora",
        "checkpointing_arguments",
        "model_structure",
        "nested_share",
        "training_arguments",
        "training_rows",
    ),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, EXPORTS, globals())
