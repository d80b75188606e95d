"""The train stage body: checks before launch, the training process, the report in the UI, the model's alias.

`train` is the stage task (name "train"); after its commit `keep_trained_model` writes the readable alias and
drops the run's checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.assets import resolve_model
from pipeline.config import ModelConfig, StoreConfig, TemplateConfig, TrainConfig
from pipeline.lora import check_lora_targets, lora_targets
from pipeline.models import alias_name, check_training_device, pick_device, write_alias
from pipeline.refs import Ref
from pipeline.stage import StageRun, run_logger, stage_task
from tasks.train.checkpoints import checkpoint_prefix
from tasks.train.job import TrainJob
from tasks.train.launch import job_store, run_training
from tasks.train.report import LOSS_PLOT_FILE, REPORT_FILE, report_markdown


def check_before_launch(base_folder: str, config: TrainConfig, model: ModelConfig) -> None:
    """Fail before any training time is spent: a dtype or requirement (QLoRA: CUDA, bitsandbytes) this machine
    lacks, LoRA targets the model lacks."""
    check_training_device(model, config, pick_device())
    if config.method in ("lora", "qlora"):
        from tasks.train.trainer import model_structure  # torch and transformers: only when LoRA is checked

        model_type, names = model_structure(base_folder, model.trust_remote_code)
        check_lora_targets(lora_targets(model_type, config.lora), names, model_type)


def keep_trained_model(ref: Ref, stage: StageRun) -> None:
    """After the commit: a readable alias for the model, and its checkpoints dropped (the model supersedes them)."""
    write_alias(stage.store, ref.meta["alias"], ref)
    stage.store.delete(checkpoint_prefix(stage.key))
    run_logger().info("trained model %s -> %s", ref.meta["alias"], ref.uri)


@stage_task("train", on_commit=keep_trained_model)
def train(
    split_data: Path,
    config: TrainConfig,
    model: ModelConfig,
    template: TemplateConfig,
    store: StoreConfig,
    out: Path,
    stage: StageRun | None = None,
) -> dict[str, Any]:
    """Fine-tune the base model on the train split in a training process, into `out`; returns the figures.

    `template` is the run's prompt template: the saved model carries it as its chat template (`carry_template`).
    `store` gives the training process its credentials; `stage` (the task passes it) keeps checkpoints in
    the store under the stage's key, so a killed run resumes, and shows the report in the Prefect UI.
    Without it training starts from scratch and writes nothing but `out`.
    """
    log = run_logger()
    base_folder = resolve_model(model.name)
    check_before_launch(base_folder, config, model)
    with tempfile.TemporaryDirectory(prefix="finetune-train-") as work:
        job = TrainJob(
            base_folder=base_folder,
            base_spec=model.name,
            trust_remote_code=model.trust_remote_code,
            weights=model.dtype,
            split_dir=str(split_data),
            out_dir=str(out),
            work_dir=work,
            config=config,
            template=template,
            store=job_store(store) if stage is not None else None,
            checkpoint_prefix=checkpoint_prefix(stage.key) if stage is not None else None,
        )
        report = run_training(job, store, log.info)
    alias = alias_name(config.dataset_name or "data", report["steps"], datetime.now(UTC))
    report["alias"] = alias
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    resolved = {
        "train": config.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "template": template.model_dump(mode="json"),
    }
    (out / "train_config.json").write_text(json.dumps(resolved, indent=2), encoding="utf-8")
    if stage is not None:
        from prefect.artifacts import create_markdown_artifact

        # stage.uri is where the model is about to be committed (the Ref's uri).
        markdown = report_markdown(report, (out / LOSS_PLOT_FILE).read_bytes(), alias, stage.uri)
        create_markdown_artifact(markdown=markdown, key="training-report", description=f"Training report of {alias}")
    keep = (
        "method",
        "steps",
        "first_loss",
        "final_train_loss",
        "test_loss",
        "tokens_per_second",
        "wall_seconds",
        "alias",
    )
    return {k: report[k] for k in keep}
