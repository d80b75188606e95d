"""Stage 5, train: full fine-tuning with the Hugging Face Trainer.

In: the split artifact (`train.parquet`, `test.parquet`), `TrainConfig` and the
base model. Out: `model/` in Hugging Face layout (safetensors, config,
generation config, tokenizer), `report.json` (parameters, losses, throughput) and
`loss.png`, a loss curve. Batches are padded per batch (dynamic padding), so no
compute goes to padding beyond the longest row of each batch.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from prefect.artifacts import create_markdown_artifact
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

from pipeline.config import ModelConfig, StoreConfig, TrainConfig
from pipeline.models import MODEL_SUBDIR, load_model, load_tokenizer, model_folder, pick_device
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task
from tasks.tokenize import IGNORE_INDEX

VERSION = "1"


def training_rows(path: Path) -> list[dict[str, list[int]]]:
    """Rows of a split file as the Trainer wants them: input_ids and labels, unpadded."""
    table = pq.read_table(path, columns=["input_ids", "labels"])
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels")))]


def training_arguments(config: TrainConfig, output_dir: str, device: str) -> TrainingArguments:
    """TrainingArguments from the config: no checkpoints, loss logged every step, no worker processes.

    `dataloader_num_workers=0` because forked DataLoader workers crash inside a
    Prefect 3.8 task at the end of an epoch (ASSETS.md).
    """
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
    )


def count_trainable_tokens(rows: list[dict[str, list[int]]]) -> int:
    """Label tokens that carry loss (not -100)."""
    return sum(sum(1 for label in row["labels"] if label != IGNORE_INDEX) for row in rows)


def plot_loss(history: list[dict], eval_loss: float | None, path: Path) -> None:
    """Save the training-loss curve (and the final test loss as a point) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history if "loss" in entry]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, label="train loss")
    if eval_loss is not None and steps:
        axis.scatter([steps[-1]], [eval_loss], color="tab:orange", zorder=3, label="test loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def fine_tune(base_folder: str, split_dir: Path, config: TrainConfig, model_config: ModelConfig, out_dir: Path) -> dict:
    """Fine-tune the model in `base_folder` on `split_dir/train.parquet`, save it to `out_dir/model`.

    Out: the training report (also written to `out_dir/report.json`).
    """
    set_seed(config.seed)
    device = pick_device()
    tokenizer = load_tokenizer(base_folder, trust_remote_code=model_config.trust_remote_code)
    model = load_model(base_folder, device=device, trust_remote_code=model_config.trust_remote_code)
    train_rows = training_rows(split_dir / "train.parquet")
    test_rows = training_rows(split_dir / "test.parquet")
    with tempfile.TemporaryDirectory(prefix="finetune-trainer-") as scratch:
        trainer = Trainer(
            model=model,
            args=training_arguments(config, scratch, device),
            train_dataset=train_rows,
            eval_dataset=test_rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        )
        started = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - started
        eval_loss = trainer.evaluate()["eval_loss"]
    model.save_pretrained(out_dir / MODEL_SUBDIR, safe_serialization=True)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    steps_done = result.global_step
    rows_seen = steps_done * config.batch_size * config.gradient_accumulation_steps
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    mean_tokens = count_trainable_tokens(train_rows) / max(len(train_rows), 1)
    report = {
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": steps_done,
        "train_rows": len(train_rows),
        "examples_seen": rows_seen,
        "first_loss": history[0]["loss"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": result.training_loss,
        "test_loss": eval_loss,
        "wall_seconds": round(wall, 2),
        "approx_label_tokens_per_second": round(rows_seen * mean_tokens / wall, 1) if wall else None,
        "loss_history": [{"step": entry["step"], "loss": entry["loss"]} for entry in history],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_loss(history, eval_loss, out_dir / "loss.png")
    return report


def report_markdown(report: dict) -> str:
    """A short markdown summary of a training report for the Prefect UI."""
    rows = [
        ("device", report["device"]),
        ("parameters (trainable)", f"{report['parameters']:,} ({report['trainable_parameters']:,})"),
        ("steps / examples seen", f"{report['steps']} / {report['examples_seen']}"),
        ("train loss first -> last", f"{report['first_loss']:.3f} -> {report['final_train_loss']:.3f}"),
        ("test loss", f"{report['test_loss']:.3f}"),
        ("wall time", f"{report['wall_seconds']} s"),
        ("label tokens / s", report["approx_label_tokens_per_second"]),
    ]
    return "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@stage_task("train", version=VERSION)
def train(split_data: Ref, config: TrainConfig, model: ModelConfig, store: StoreConfig) -> Ref:
    """Fine-tune the base model on the train split; returns the model artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    report = fine_tune(model_folder(model, stage.store), stage.fetch(split_data), config, model, stage.dir)
    create_markdown_artifact(markdown=report_markdown(report), key="training-report", description="Training report")
    keep = ("steps", "first_loss", "final_train_loss", "test_loss", "wall_seconds")
    return stage.commit(meta={k: report[k] for k in keep})
