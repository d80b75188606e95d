"""What runs inside a training process: training as its job (`tasks.train.job`) says, the export and the peak memory.

`main` is the entry point of `python -m tasks.train <job.json>` (tasks/train/__main__.py, also the torchrun
and `accelerate launch` target); `fine_tune` is the core.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, PreTrainedModel, Trainer, set_seed

from pipeline.assets import model_load_kwargs
from pipeline.config import TemplateConfig, TrainConfig
from pipeline.models import (
    ADAPTER_SUBDIR,
    IGNORE_INDEX,
    MODEL_SUBDIR,
    four_bit_config,
    load_tokenizer,
    pick_device,
    training_precision,
    weight_dtype,
)
from pipeline.prompts import chat_template_for
from pipeline.store import open_store
from tasks.train.checkpoints import checkpoint_step, restore_checkpoints
from tasks.train.errors import ERROR_FILE, EXIT_KNOWN_ERROR, KNOWN_ERRORS, is_out_of_memory, out_of_memory_error
from tasks.train.job import TrainJob
from tasks.train.report import LOSS_PLOT_FILE, REPORT_FILE, build_report, plot_loss
from tasks.train.trainer import (
    EvalProgress,
    MeteredTrainer,
    StepTimer,
    StoreCheckpoints,
    TokenMeter,
    apply_lora,
    nested_share,
    training_arguments,
    training_rows,
)


def fine_tune(job: TrainJob) -> dict | None:
    """Train as `job` says; runs inside each training process.

    Out: the report (also written with the loss plot, and the model and adapter unless `job.save_model` is
    off, to `job.out_dir`) on the main process, None on the others. Raises TrainingOutOfMemory with advice
    when memory runs out, LoraTargetError for LoRA targets the model lacks.
    """
    config, out_dir = job.config, Path(job.out_dir)
    device = pick_device()
    precision = training_precision(config.dtype, device, job.weights)
    args = training_arguments(config, str(Path(job.work_dir) / "checkpoints"), device, precision)
    set_seed(config.seed)  # before LoRA's random initialisation
    tokenizer = load_tokenizer(job.base_folder, trust_remote_code=job.trust_remote_code)
    model = load_base_model(job)
    model_bytes = model.get_memory_footprint()
    if config.method in ("lora", "qlora"):
        # peft keeps the adapters in float32 over 16-bit or 4-bit base weights (autocast_adapter_dtype), so the
        # optimizer updates float32 values; autocast (`precision`) runs their matmuls in 16-bit.
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
        eval_dataset=training_rows(Path(job.split_dir) / "test.parquet", config.eval_max_rows, config.seed),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[StepTimer(meter), EvalProgress()]
        + ([StoreCheckpoints(store, job.checkpoint_prefix)] if store else []),
        meter=meter,
        group_by_length=config.group_by_length,
    )
    peak_was_reset = reset_peak_memory()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one too
        if is_out_of_memory(exc):
            raise out_of_memory_error(config, device, exc, job.weights) from exc
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
    report["weights_dtype"] = job.weights
    out_dir.mkdir(parents=True, exist_ok=True)
    if job.save_model:
        carry_template(trainer.model, tokenizer, job.template)
        export_model(trainer.model, tokenizer, job, out_dir)  # after the report: merging unloads LoRA
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_loss(report["loss_history"], report["eval_history"], report["best_step"], out_dir / LOSS_PLOT_FILE)
    return report


def load_base_model(job: TrainJob) -> PreTrainedModel:
    """The base model as training needs it: weights in `job.weights` (model.dtype), or with train.method=qlora
    4-bit NF4 linear layers (bitsandbytes) computing in that dtype, placed on this process's GPU.

    16-bit weights are loaded as such, never upcast: the point is half the memory. With full fine-tuning the
    gradients and AdamW's moments follow the weights' dtype (torch allocates them like the parameters).
    """
    kwargs = model_load_kwargs(job.trust_remote_code)
    if job.config.method == "qlora":
        # 4-bit layers run only on the GPU that holds them: the whole model goes to this process's GPU (LOCAL_RANK
        # under torchrun), as the Trainer expects of a quantized model.
        kwargs |= {"quantization_config": four_bit_config(job.weights), "device_map": {"": local_gpu()}}
    model = AutoModelForCausalLM.from_pretrained(job.base_folder, dtype=weight_dtype(job.weights), **kwargs)
    if job.config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings to float32 for stable training, as QLoRA does; activation checkpointing is left to
        # the Trainer's arguments (train.gradient_checkpointing, non-reentrant).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def local_gpu() -> int:
    """This process's GPU index: LOCAL_RANK under torchrun or accelerate launch, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


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


def export_model(model: PreTrainedModel, tokenizer: Any, job: TrainJob, out_dir: Path) -> None:
    """Save the trained model: `model/` (full weights in model.dtype), and with LoRA or QLoRA `adapter/` too
    (merged into `model/` unless merge is off). Each folder holds the tokenizer (with its chat template) and the
    generation config.

    The adapter names `job.base_spec` (an alias or hub id) as its base, not this machine's cache folder. A QLoRA
    adapter is merged into the base loaded again in model.dtype, not into the 4-bit weights it trained over
    (merging into NF4 would round the update away again and save a model that needs bitsandbytes to load).
    """
    config, base_spec = job.config, job.base_spec
    if config.method in ("lora", "qlora"):
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
        model = merged_over_full_base(model, job, out_dir / ADAPTER_SUBDIR) if config.method == "qlora" else model
        model = model.merge_and_unload()
    model.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)


def merged_over_full_base(trained: Any, job: TrainJob, adapter_dir: Path) -> Any:
    """The saved QLoRA adapter on the base model loaded again unquantized in model.dtype, on the CPU (a peft model,
    ready to merge; the GPU still holds the 4-bit training copy). The generation config the run set travels along."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(
        job.base_folder, dtype=weight_dtype(job.weights), **model_load_kwargs(job.trust_remote_code)
    )
    base.generation_config = trained.generation_config
    return PeftModel.from_pretrained(base, adapter_dir)


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
