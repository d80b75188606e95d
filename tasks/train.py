"""Stage 5, train: full fine-tuning or LoRA with the Hugging Face Trainer, resumable, on one or more processes.

In: the split artifact (`train.parquet`, `test.parquet`), `TrainConfig` and the base
model. Out, in the store under `train/<key>/`:

* `model/`: Hugging Face folder (safetensors, config, generation config, tokenizer),
  loadable with `AutoModelForCausalLM.from_pretrained`; with LoRA the adapter merged
  into the base weights (unless `train.lora.merge` is false). The tokenizer carries the
  run's prompt template as its chat template and the generation config stops at the EOS
  training appended (`carry_template`), in `adapter/` too;
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
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from pipeline.assets import model_load_kwargs, resolve_model
from pipeline.config import ModelConfig, StoreConfig, TemplateConfig, TrainConfig
from pipeline.lora import LoraTargetError, adaptable_module_names, check_lora_targets, lora_targets
from pipeline.models import (
    ADAPTER_SUBDIR,
    IGNORE_INDEX,
    MODEL_SUBDIR,
    UnsupportedPrecision,
    alias_name,
    load_tokenizer,
    pick_device,
    training_precision,
    write_alias,
)
from pipeline.prompts import chat_template_for
from pipeline.refs import Ref
from pipeline.stage import StageRun, run_logger, stage_task
from pipeline.store import ArtifactStore, StoreSettings, open_store

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_PREFIX = "checkpoints"
CHECKPOINT_DIR_PREFIX = "checkpoint-"  # what the Trainer names its checkpoint folders
REPORT_FILE = "report.json"
LOSS_PLOT_FILE = "loss.png"
ERROR_FILE = "error.json"
EXIT_KNOWN_ERROR = 3


# --------------------------------------------------------------------------- errors


class TrainingError(RuntimeError):
    """Training did not finish; the message says why and ends with the training process's last lines."""


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory; the message suggests LoRA, a smaller batch, gradient checkpointing."""


# Errors the training process reports by name (in error.json) so the task re-raises the same type.
KNOWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (TrainingOutOfMemory, LoraTargetError, UnsupportedPrecision, TrainingError)
}


def out_of_memory_error(config: TrainConfig, device: str, cause: BaseException) -> TrainingOutOfMemory:
    """The TrainingOutOfMemory for a run with `config` on `device`, with what to change."""
    hints = []
    if config.method == "full":
        hints.append(
            "train.method=lora (only small adapters train: no gradients or optimizer state for the base weights)"
        )
    if config.batch_size > 1:
        hints.append(
            f"a smaller train.batch_size (now {config.batch_size}) with a larger train.gradient_accumulation_steps "
            f"(now {config.gradient_accumulation_steps}): the same examples per optimizer step in less memory"
        )
    if not config.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true (recomputes activations: less memory, about 30% slower)")
    if device == "cuda" and config.dtype in ("auto", "float32"):
        hints.append("train.dtype=bfloat16")
    tried = "; ".join(hints) or "a smaller model, or a device with more memory"
    return TrainingOutOfMemory(f"out of memory on {device} while training ({config.method}): {cause}. Try: {tried}.")


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for the RuntimeErrors other backends raise when memory runs out."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


# --------------------------------------------------------------------------- data


def training_rows(path: Path) -> list[dict[str, list[int]]]:
    """Rows of a split file as the Trainer wants them: input_ids and labels, unpadded."""
    table = pq.read_table(path, columns=["input_ids", "labels"])
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


# --------------------------------------------------------------------------- LoRA


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


# --------------------------------------------------------------------------- training arguments


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


# --------------------------------------------------------------------------- metering


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


# --------------------------------------------------------------------------- checkpoints in the store


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder name ('checkpoint-40' -> 40)."""
    return int(name.removeprefix(CHECKPOINT_DIR_PREFIX))


def stored_checkpoints(store: ArtifactStore, prefix: str) -> list[str]:
    """Names of the committed checkpoints under `prefix`, oldest step first (uncommitted ones do not count)."""
    names = {path[len(prefix) + 1 :].split("/", 1)[0] for path in store.list(prefix)}
    names = {
        n for n in names if n.startswith(CHECKPOINT_DIR_PREFIX) and n.removeprefix(CHECKPOINT_DIR_PREFIX).isdigit()
    }
    return sorted((n for n in names if store.has_artifact(f"{prefix}/{n}")), key=checkpoint_step)


def sync_checkpoints(store: ArtifactStore, prefix: str, output_dir: Path) -> None:
    """Make the store hold exactly the checkpoints the Trainer keeps locally (the latest and the best).

    New ones are committed first (manifest last), then the ones the Trainer rotated out
    are deleted, so a kill at any moment leaves at least the previous checkpoint.
    """
    local = sorted((p.name for p in output_dir.glob(f"{CHECKPOINT_DIR_PREFIX}*") if p.is_dir()), key=checkpoint_step)
    stored = stored_checkpoints(store, prefix)
    for name in local:
        if name not in stored:
            store.commit(
                f"{prefix}/{name}",
                output_dir / name,
                kind="checkpoint",
                inputs={},
                config={},
                meta={"step": checkpoint_step(name)},
            )
    for name in stored:
        if name not in local:
            store.delete(f"{prefix}/{name}")


def restore_checkpoints(store: ArtifactStore, prefix: str, output_dir: Path) -> Path | None:
    """Copy the store's checkpoints into `output_dir`; out: the latest one to resume from, or None.

    Every file is verified against its manifest on the way. The Trainer state records
    the best checkpoint's folder by absolute path, which was the killed run's folder, so
    it is pointed at the restored copy.
    """
    latest = None
    for name in stored_checkpoints(store, prefix):  # oldest first: folder mtimes keep the step order
        target = output_dir / name
        if not target.is_dir():
            source = store.fetch(store.open_ref(f"{prefix}/{name}"))
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("manifest.json", ".verified"))
        _repoint_best_checkpoint(target / "trainer_state.json", output_dir)
        latest = target
    return latest


def _repoint_best_checkpoint(state_file: Path, output_dir: Path) -> None:
    """Rewrite `best_model_checkpoint` in a Trainer state file to the same checkpoint under `output_dir`."""
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    best = state.get("best_model_checkpoint")
    if best:
        state["best_model_checkpoint"] = str(output_dir / Path(best).name)
        state_file.write_text(json.dumps(state, indent=2), encoding="utf-8")


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


# --------------------------------------------------------------------------- the job and its core


class TrainJob(BaseModel):
    """Everything a training process needs, written to job.json by the task.

    Store credentials are never part of it: they reach the process in its environment.
    """

    model_config = ConfigDict(frozen=True)

    base_folder: str
    base_spec: str
    trust_remote_code: bool = False
    split_dir: str
    out_dir: str
    work_dir: str
    config: TrainConfig
    template: TemplateConfig = TemplateConfig()
    store: StoreSettings | None = None
    checkpoint_prefix: str | None = None


def fine_tune(job: TrainJob) -> dict | None:
    """Train as `job` says; runs inside each training process.

    Out: the report (also written with the model, adapter and loss plot to `job.out_dir`)
    on the main process, None on the others. Raises TrainingOutOfMemory with advice
    when memory runs out, LoraTargetError for LoRA targets the model lacks.
    """
    config, out_dir = job.config, Path(job.out_dir)
    device = pick_device()
    precision = training_precision(config.dtype, device)
    args = training_arguments(config, str(Path(job.work_dir) / "checkpoints"), device, precision)
    set_seed(config.seed)  # before LoRA's random initialisation
    tokenizer = load_tokenizer(job.base_folder, trust_remote_code=job.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        job.base_folder, dtype=torch.float32, **model_load_kwargs(job.trust_remote_code)
    )
    model_bytes = model.get_memory_footprint()
    if config.method == "lora":
        model = apply_lora(model, config)
    store = open_store(job.store) if job.store is not None and job.checkpoint_prefix else None
    resume = None
    if store is not None:
        with args.main_process_first(desc="restore checkpoints from the store"):
            resume = restore_checkpoints(store, job.checkpoint_prefix, Path(args.output_dir))
    meter = TokenMeter()
    trainer = MeteredTrainer(
        model=model,
        args=args,
        train_dataset=nested_share(
            training_rows(Path(job.split_dir) / "train.parquet"), config.train_fraction, config.seed
        ),
        eval_dataset=training_rows(Path(job.split_dir) / "test.parquet"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[StepTimer(meter)] + ([StoreCheckpoints(store, job.checkpoint_prefix)] if store else []),
        meter=meter,
        group_by_length=config.group_by_length,
    )
    peak_was_reset = reset_peak_memory()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one too
        if is_out_of_memory(exc):
            raise out_of_memory_error(config, device, exc) from exc
        raise
    wall = time.perf_counter() - started
    peak = peak_memory(peak_was_reset)
    test_loss = final_eval_loss(trainer, config)
    real, padded = _summed_over_processes(meter.real, meter.padded)
    if not trainer.is_world_process_zero():
        return None
    report = build_report(
        trainer,
        config,
        meter,
        real=real,
        padded=padded,
        wall=wall,
        peak=peak,
        test_loss=test_loss,
        model_bytes=model_bytes,
        device=device,
        precision=precision,
        resumed_from=checkpoint_step(resume.name) if resume else None,
        mean_train_loss=result.training_loss,
    )
    carry_template(trainer.model, tokenizer, job.template)
    export_model(trainer.model, tokenizer, config, job.base_spec, out_dir)  # after the report: merging unloads LoRA
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_loss(report["loss_history"], report["eval_history"], report["best_step"], out_dir / LOSS_PLOT_FILE)
    return report


def final_eval_loss(trainer: Trainer, config: TrainConfig) -> float:
    """Test loss of the model being exported: the best checkpoint's, the last step's, or evaluated now."""
    state = trainer.state
    if config.best_model_at_end and state.best_metric is not None:
        return float(state.best_metric)
    evals = [entry for entry in state.log_history if "eval_loss" in entry]
    if evals and evals[-1]["step"] == state.global_step:
        return float(evals[-1]["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def _summed_over_processes(*counts: int) -> tuple[int, ...]:
    """`counts` summed over every training process (unchanged in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    total = torch.tensor(counts, dtype=torch.int64)
    torch.distributed.all_reduce(total)
    return tuple(int(value) for value in total.tolist())


def carry_template(model: PreTrainedModel, tokenizer: Any, template: TemplateConfig) -> None:
    """Make the saved model prompt itself as it was trained: the run's template and stop token travel with it.

    The tokenizer gets the chat template that renders a user message exactly as training rendered a question
    (`pipeline.prompts.chat_template_for`; `chat` keeps the tokenizer's own, with the system prompt), so
    `apply_chat_template`, `transformers serve`, vLLM and other chat front ends build the trained prompt. The
    generation config stops at the EOS token training appended after every answer (and pads with the
    tokenizer's pad token), whatever the base model's config named.
    """
    chat_template = chat_template_for(template, tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id


def export_model(model: PreTrainedModel, tokenizer: Any, config: TrainConfig, base_spec: str, out_dir: Path) -> None:
    """Save the trained model: `model/` (full weights), and with LoRA `adapter/` too (merged into `model/` unless
    merge is off). Each folder holds the tokenizer (with its chat template) and the generation config.

    The adapter names `base_spec` (an alias or hub id) as its base, not this machine's cache folder.
    """
    if config.method == "lora":
        model.save_pretrained(out_dir / ADAPTER_SUBDIR)
        tokenizer.save_pretrained(out_dir / ADAPTER_SUBDIR)
        model.generation_config.save_pretrained(out_dir / ADAPTER_SUBDIR)  # peft saves the adapter weights only
        # Written after saving: peft reads the base's files while saving, and the spec is no folder here.
        adapter_config = out_dir / ADAPTER_SUBDIR / "adapter_config.json"
        adapter_config.write_text(
            json.dumps(
                {**json.loads(adapter_config.read_text(encoding="utf-8")), "base_model_name_or_path": base_spec},
                indent=2,
            ),
            encoding="utf-8",
        )
        if not config.lora.merge:
            return
        model = model.merge_and_unload()
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)


def reset_peak_memory() -> bool:
    """Start measuring peak memory from now, so model loading and export do not count.

    Out: True when the counter was reset (CUDA's peak allocation, or on Linux the
    process's peak resident set through /proc/self/clear_refs), False when the peak
    will count from the process's start.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # 5: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory(since_reset: bool = True) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, else the process's peak resident set (VmHWM)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "CUDA peak allocated while training"
    status = Path("/proc/self/status")
    if since_reset and status.is_file():
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS while training"
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(kib) * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def build_report(
    trainer: Trainer,
    config: TrainConfig,
    meter: TokenMeter,
    *,
    real: int,
    padded: int,
    wall: float,
    peak: tuple[int, str],
    test_loss: float,
    model_bytes: int,
    device: str,
    precision: str,
    resumed_from: int | None,
    mean_train_loss: float,
) -> dict[str, Any]:
    """The training report: sizes, throughput, memory and losses (JSON-ready)."""
    state, model = trainer.state, trainer.model
    history = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    evals = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    seconds = sum(meter.step_seconds)
    steps = state.global_step
    return {
        "method": config.method,
        "device": device,
        "precision": precision,
        "processes": trainer.args.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_memory_bytes": model_bytes,
        "lora": config.lora.model_dump(mode="json") if config.method == "lora" else None,
        "steps": steps,
        "epochs": round(state.epoch or 0.0, 3),
        "train_rows": len(trainer.train_dataset),
        "examples_seen": steps * config.batch_size * config.gradient_accumulation_steps * trainer.args.world_size,
        "resumed_from_step": resumed_from,
        "flops_per_optimizer_step": state.total_flos / steps if steps else None,
        "non_padding_tokens": real,
        "padded_tokens": padded,
        "padding_share": round(1 - real / padded, 4) if padded else 0.0,
        "tokens_per_second": round(real / seconds, 1) if seconds else None,
        "training_seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),
        "peak_memory_bytes": peak[0],
        "peak_memory_kind": peak[1],
        "first_loss": history[0]["loss"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": mean_train_loss,
        "test_loss": test_loss,
        "best_step": state.best_global_step or None,
        "loss_history": history,
        "eval_history": evals,
        "step_seconds": [round(s, 4) for s in meter.step_seconds],
        "step_tokens": meter.step_tokens,
        "step_padded_tokens": meter.step_padded,
    }


def plot_loss(history: list[dict], evals: list[dict], best_step: int | None, path: Path) -> None:
    """Save the train-loss curve with the eval losses (and the exported step) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([e["step"] for e in history], [e["loss"] for e in history], label="train loss")
    if evals:
        axis.plot(
            [e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:orange", label="eval loss"
        )
    if best_step:
        axis.axvline(best_step, color="tab:green", linestyle=":", label=f"exported (step {best_step})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a training process: `python -m tasks.train <job.json>` (also the torchrun target).

    Out: the exit code; known errors are written to `<work_dir>/error.json` by name and
    message, so the task can raise the same error.
    """
    argv = sys.argv[1:] if argv is None else argv
    job = TrainJob.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        fine_tune(job)
    except tuple(KNOWN_ERRORS.values()) as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
        (Path(job.work_dir) / ERROR_FILE).write_text(json.dumps(error), encoding="utf-8")
        print(f"{error['type']}: {error['message']}", file=sys.stderr, flush=True)
        return EXIT_KNOWN_ERROR
    return 0


# --------------------------------------------------------------------------- launching


def launch_command(config: TrainConfig, job_path: Path) -> list[str]:
    """The command that runs the training process(es) for `job_path`.

    One process: `python -m tasks.train job.json`. Several: torchrun with that module as
    its target, or `accelerate launch` (always when an accelerate config file is given,
    e.g. for FSDP or DeepSpeed; its process count wins unless train.num_processes > 1).
    """
    entry = ["tasks.train", str(job_path)]
    if config.accelerate_config or (config.launcher == "accelerate" and config.num_processes > 1):
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if config.accelerate_config:
            command += ["--config_file", str(Path(config.accelerate_config).expanduser().resolve())]
        if config.num_processes > 1:
            command += ["--num_processes", str(config.num_processes)]
            if not config.accelerate_config:
                # accelerate's torchrun-based launcher; without it, and without a GPU, it starts one process only.
                command += ["--multi_gpu"]
        return [*command, "--module", *entry]
    if config.num_processes > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(config.num_processes),
            "-m",
            *entry,
        ]
    return [sys.executable, "-m", *entry]


def training_env(store: StoreSettings | None) -> dict[str, str]:
    """The training process's environment: this one, the repository importable, store credentials if configured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if store is not None and store.access_key_id is not None and store.secret_access_key is not None:
        env["AWS_ACCESS_KEY_ID"] = store.access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = store.secret_access_key.get_secret_value()
    return env


def job_store(store: StoreSettings) -> StoreSettings:
    """The store settings a training process gets: every setting (retries too) but the secrets, a local folder
    made absolute.

    The job file is written to disk, so the keys travel in the process's environment instead (`training_env`).
    """
    uri = store.uri if "://" in store.uri else str(Path(store.uri).expanduser().resolve())
    return store.model_copy(update={"uri": uri, "access_key_id": None, "secret_access_key": None})


def run_training(job: TrainJob, store: StoreSettings | None = None, log: Callable[[str], None] = print) -> dict:
    """Run `job` in its own process(es), passing each output line to `log`; out: the report.

    In: the job and the full store settings (for credentials). Raises the error the
    training process reported (TrainingOutOfMemory, LoraTargetError, ...), or
    TrainingError with the exit status and the last output lines.
    """
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / ERROR_FILE).unlink(missing_ok=True)
    job_path = work / "job.json"
    job_path.write_text(job.model_dump_json(indent=2), encoding="utf-8")
    tail: deque[str] = deque(maxlen=30)
    process = subprocess.Popen(
        launch_command(job.config, job_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=training_env(store),
        cwd=str(REPO_ROOT),
    )
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            if line.strip():  # progress bars leave blank lines behind
                tail.append(line.rstrip())
                log(line.rstrip())
        code = process.wait()
    finally:
        if process.poll() is None:  # the task was cancelled: do not leave training behind
            process.kill()
            process.wait()
    if code != 0:
        raise training_failure(work / ERROR_FILE, code, list(tail), job.config)
    return json.loads((Path(job.out_dir) / REPORT_FILE).read_text(encoding="utf-8"))


def training_failure(error_file: Path, code: int, tail: list[str], config: TrainConfig) -> Exception:
    """The exception for a training process that exited with `code`."""
    if error_file.is_file():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        return KNOWN_ERRORS.get(error["type"], TrainingError)(error["message"])
    last = "\n".join(tail[-15:])
    if code in (-9, 137):  # SIGKILL: on Linux usually the kernel's out-of-memory killer
        return TrainingOutOfMemory(
            f"the training process was killed (SIGKILL), most likely out of memory. Try train.method=lora, a smaller "
            f"train.batch_size (now {config.batch_size}) with more gradient_accumulation_steps, or "
            f"train.gradient_checkpointing=true.\nLast output:\n{last}"
        )
    return TrainingError(f"the training process exited with status {code}. Last output:\n{last}")


# --------------------------------------------------------------------------- the Prefect task


def report_markdown(report: dict, plot_png: bytes | None, alias: str, uri: str) -> str:
    """Markdown for the Prefect UI: the report's figures and the loss curve embedded as a data: URI.

    The UI renders markdown images with a plain <img src>, so the plot shows without
    any file server.
    """
    gib = 1024**3
    rows = [
        ("model", f"`{alias}` (`{uri}`)"),
        (
            "method / device / precision",
            f"{report['method']} / {report['device']} x{report['processes']} / {report['precision']}",
        ),
        ("parameters (trainable)", f"{report['parameters']:,} ({report['trainable_parameters']:,})"),
        ("model memory", f"{report['model_memory_bytes'] / gib:.2f} GiB"),
        (
            "steps / examples seen",
            f"{report['steps']} / {report['examples_seen']}"
            + (f" (resumed at step {report['resumed_from_step']})" if report.get("resumed_from_step") else ""),
        ),
        (
            "FLOPs per optimizer step",
            f"{report['flops_per_optimizer_step']:.3g}" if report["flops_per_optimizer_step"] else "-",
        ),
        ("non-padding tokens / s", report["tokens_per_second"]),
        ("padding share", f"{report['padding_share']:.1%}"),
        ("wall time (training steps)", f"{report['wall_seconds']} s ({report['training_seconds']} s)"),
        ("peak memory", f"{report['peak_memory_bytes'] / gib:.2f} GiB ({report['peak_memory_kind']})"),
        ("train loss first -> last", f"{report['first_loss']:.3f} -> {report['final_train_loss']:.3f}"),
        (
            "eval loss (exported model)",
            f"{report['test_loss']:.3f}" + (f" at step {report['best_step']}" if report.get("best_step") else ""),
        ),
    ]
    text = "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if plot_png:
        text += f"\n\n![loss curve](data:image/png;base64,{base64.b64encode(plot_png).decode('ascii')})\n"
    return text


def check_before_launch(base_folder: str, config: TrainConfig, trust_remote_code: bool) -> None:
    """Fail before any training time is spent: precision the device lacks, LoRA targets the model lacks."""
    training_precision(config.dtype, pick_device())
    if config.method == "lora":
        model_type, names = model_structure(base_folder, trust_remote_code)
        check_lora_targets(lora_targets(model_type, config.lora), names, model_type)


def checkpoint_prefix(key: str) -> str:
    """Where the checkpoints of the train run with content key `key` live in the store."""
    return f"{CHECKPOINTS_PREFIX}/{key}"


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
    check_before_launch(base_folder, config, model.trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="finetune-train-") as work:
        job = TrainJob(
            base_folder=base_folder,
            base_spec=model.name,
            trust_remote_code=model.trust_remote_code,
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


if __name__ == "__main__":
    sys.exit(main())
