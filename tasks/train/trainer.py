"""The Hugging Face Trainer as the train stage customises it: rows, LoRA, arguments, length grouping, metering.

`MeteredTrainer` counts real and padded tokens, batches rows of similar length (`LengthGroupedSampler`) and
saves checkpoints under the model's own parameter names; `StepTimer` times each optimizer step;
`StoreCheckpoints` mirrors each saved checkpoint into the artifact store (`tasks.train.checkpoints`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from pipeline.config import TrainConfig
from pipeline.lora import adaptable_module_names, check_lora_targets, lora_targets
from pipeline.progress import DEFAULT_EVERY_SECONDS, Progress
from pipeline.store import ArtifactStore
from tasks.train.checkpoints import sync_checkpoints


def training_rows(path: Path, max_rows: int | None = None, seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of a split file as the Trainer wants them: input_ids and labels, unpadded.

    With `max_rows`, at most that many: a `seed`-chosen subset kept in file order (every row, unchanged, when
    there are no more). The eval loss during training runs on such a subset of the test split, so an evaluation
    every `eval_steps` costs the same however large the split is.
    """
    table = pq.read_table(path, columns=["input_ids", "labels"])
    if max_rows is not None and table.num_rows > max_rows:
        chosen = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(seed))[:max_rows]
        table = table.take(chosen.sort().values.numpy())
    return [
        {"input_ids": ids, "labels": labels}
        for ids, labels in zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels")))
    ]


def nested_share(rows: list, fraction: float, seed: int) -> list:
    """The first ceil(fraction x len(rows)) rows of a `seed`-shuffled order, kept in their original order.

    The same seed gives the same order, so a smaller share is a subset of a larger one
    (data-size sweeps compare nested sets). A fraction of 1 returns `rows` unchanged.
    """
    if fraction >= 1:
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in sorted(order[: max(1, math.ceil(fraction * len(rows)))])]


def model_structure(folder: str, trust_remote_code: bool) -> tuple[str, list[str]]:
    """(model_type, adaptable module names) of the model in `folder`, built on the meta device: no weights, no
    memory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config.model_type, adaptable_module_names(skeleton)


def apply_lora(model: PreTrainedModel, config: TrainConfig) -> PreTrainedModel:
    """Wrap `model` with fresh LoRA adapters on the configured (or the architecture's) modules; base weights frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(model.config.model_type, config.lora)
    check_lora_targets(targets, adaptable_module_names(model), model.config.model_type)
    peft_config = PeftLoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def training_arguments(config: TrainConfig, output_dir: str, device: str, precision: str) -> TrainingArguments:
    """TrainingArguments from the config: evaluation, checkpoints and best-model selection as configured.

    Loss is logged every `logging_steps` and printed (no progress bar: the output is
    read line by line by the task). Non-padding tokens are counted. On CPU several
    processes talk through gloo.
    """
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=config.best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        # Only inside a distributed launch (torchrun sets WORLD_SIZE); elsewhere a backend makes accelerate look for
        # peers.
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=config.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        report_to="none",
        **checkpointing_arguments(config.gradient_checkpointing),
    )


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for activation (gradient) checkpointing, under the name this transformers release uses."""
    if not enabled:
        return {}
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


@dataclass
class TokenMeter:
    """Tokens fed to training (real and padded) and the seconds of each optimizer step, in this process."""

    real: int = 0
    padded: int = 0
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_padded: list[int] = field(default_factory=list)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Row indices in a shuffled order where each run of `batch_size` rows has similar lengths.

    Rows are shuffled, cut into pools of `pool_batches` batches, sorted by length within
    a pool and cut into batches; the full batches are then shuffled (the one short batch
    stays last, so batch boundaries hold). Unlike the Trainer's own grouping, which sorts
    pools of at most a quarter of the data from long to short, every batch is grouped
    and the order stays random. The order depends only on the seed and the epoch
    (`set_epoch`), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.pool_batches = lengths, batch_size, seed, pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.pool_batches * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([index for batch in shuffled + short for index in batch])


class MeteredTrainer(Trainer):
    """The Hugging Face Trainer, counting real and padded tokens and grouping rows by length."""

    def __init__(self, *args: Any, meter: TokenMeter, group_by_length: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter, self.group_by_length = meter, group_by_length

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """Our length grouping when asked for (and useful: batches of more than one row), else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and self.args.per_device_train_batch_size > 1:
            lengths = [len(row["input_ids"]) for row in dataset]
            return LengthGroupedSampler(
                lengths, self.args.per_device_train_batch_size, seed=self.args.data_seed or self.args.seed
            )
        return super()._get_train_sampler(train_dataset)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Count the batch's tokens, then train on it exactly as the Trainer does."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.meter.padded += ids.numel()
        self.meter.real += int(mask.sum()) if mask is not None else ids.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save a checkpoint's weights under the model's own parameter names.

        transformers 5 writes checkpoints under the hub's original names (GPT-NeoX:
        `embed_out` for `lm_head`) but reloads them for resuming and for the best model
        with a plain non-strict `load_state_dict`, which silently skips renamed weights.
        Checkpoints are internal, so they keep the in-memory names; the exported `model/`
        is saved the standard way.
        """
        if isinstance(self.model, PreTrainedModel) and self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            return
        super()._save(output_dir, state_dict)


class EvalProgress(TrainerCallback):
    """Prints the progress of each evaluation (batches done of all, rate, time left) every few seconds.

    The Trainer's own progress bar is off (the task reads the process's output line by line); these lines reach
    the run's log the same way the loss does.
    """

    def __init__(self, every: float = DEFAULT_EVERY_SECONDS) -> None:
        self.every = every
        self.progress: Progress | None = None

    def on_prediction_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Count one evaluation batch."""
        if not state.is_world_process_zero:
            return
        if self.progress is None:
            loader = kwargs.get("eval_dataloader")
            total = len(loader) if loader is not None and hasattr(loader, "__len__") else None
            what = f"eval loss at step {state.global_step}"
            self.progress = Progress(what, total, unit="batches", log=lambda m: print(m, flush=True), every=self.every)
        self.progress.advance()

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the evaluation's progress with its final line."""
        if self.progress is not None:
            self.progress.finish()
        self.progress = None


class StepTimer(TrainerCallback):
    """Times each optimizer step (forward, backward, optimizer) apart from evaluation and checkpointing."""

    def __init__(self, meter: TokenMeter) -> None:
        self.meter = meter
        self._start = 0.0
        self._real = self._padded = 0

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clock for one optimizer step."""
        self._start, self._real, self._padded = time.perf_counter(), self.meter.real, self.meter.padded

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step's seconds and tokens."""
        self.meter.step_seconds.append(time.perf_counter() - self._start)
        self.meter.step_tokens.append(self.meter.real - self._real)
        self.meter.step_padded.append(self.meter.padded - self._padded)


class StoreCheckpoints(TrainerCallback):
    """After every save, mirror the Trainer's checkpoints into the store (main process only).

    The checkpoint saved at the very end is not uploaded: the finished model is committed
    moments later, and its checkpoints are deleted then.
    """

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Upload new checkpoints and drop rotated ones."""
        if state.is_world_process_zero and state.global_step < state.max_steps:
            sync_checkpoints(self.store, self.prefix, Path(args.output_dir))
