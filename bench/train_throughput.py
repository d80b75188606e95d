"""Benchmark: training throughput of the train stage against the seeds' Hugging Face Trainer recipe.

On the default model (SmolLM2-135M-Instruct) and the default run's training rows, the
same `--examples` rows (seeded sample) are trained on three ways, each in its own
process so that its peak memory is its own:

* the seeds: `transformers.Trainer` with the DeepLearning.AI/Lamini "Finetuning LLMs"
  course's exact arguments (batch size 1, gradient accumulation 4, Adafactor, lr 1e-5,
  one warm-up step, evaluation/checkpoint every 120 steps, best model at the end, one
  checkpoint kept); with one row per batch each example is padded to its own length;
* this stage, full fine-tuning, with `configs/default.yaml`'s train section (batch 8
  grouped by length, AdamW), through the stage's own launcher (`python -m tasks.train`);
* this stage with LoRA (the same section, `method: lora`), without and with gradient
  checkpointing: at batch 8 on a 135M model, activations and logits weigh more than
  the weights' gradients and optimizer state that LoRA saves, so checkpointing is what
  brings LoRA's peak well below full fine-tuning's.

Printed per run: non-padding tokens per second over the optimizer steps (the first step
is left out as warm-up; evaluation and checkpointing are outside the timed steps),
padding share, model FLOPs utilisation (6 x matmul parameters x non-padding tokens per
second, against an fp32 matmul peak measured at the start of this script) and peak
memory while training (the process's peak RSS from the start of `trainer.train()`, after
the model is loaded; on a GPU, torch's peak allocation), and the machine's load average,
since other work on a shared machine slows every figure. Then the targets:
stage/seeds tokens/s >= 2, padding < 10 %, LoRA/full peak memory <= 0.6.

The rows come from the default run's split artifact (`./artifacts/split/<key>/train.parquet`,
the newest one whose rows decode to the pipeline's prompt with the default tokenizer),
or from `--split FOLDER`. Run from the repository root, after `make run`:

    .venv/bin/python bench/train_throughput.py [--examples 128] [--split artifacts/split/<key>]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pyarrow.parquet as pq
import torch

from pipeline.assets import resolve_model
from pipeline.config import TrainConfig, load_config
from pipeline.models import load_tokenizer
from tasks.train import TrainJob, run_training

DEFAULT_MODEL = "smollm2-135m-instruct"
TARGET_SPEEDUP, TARGET_PADDING, TARGET_MEMORY = 2.0, 0.10, 0.6
EVAL_ROWS = 8  # the seeds' recipe evaluates at its last step; a small test set keeps that short
GIB = 1024**3


# --------------------------------------------------------------------------- data


def find_default_split(artifacts: Path, folder: str) -> Path:
    """The newest split artifact in `artifacts` whose first row decodes to the pipeline's prompt with the model's
    tokenizer."""
    tokenizer = load_tokenizer(folder)
    candidates = sorted(artifacts.glob("split/*/train.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        first = pq.read_table(path, columns=["input_ids"]).slice(0, 1).column("input_ids").to_pylist()
        if first and max(first[0]) < len(tokenizer) and tokenizer.decode(first[0]).startswith("### Question:"):
            return path.parent
    raise SystemExit(
        f"no split artifact for {DEFAULT_MODEL} under {artifacts}/split: run `make run` first, or pass --split"
    )


def sample_split(split: Path, examples: int, out: Path) -> Path:
    """A split folder with `examples` seeded-sampled train rows and the first EVAL_ROWS test rows."""
    train = pq.read_table(split / "train.parquet", columns=["input_ids", "labels"])
    rows = sorted(random.Random(0).sample(range(train.num_rows), examples))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.take(rows), out / "train.parquet")
    test = pq.read_table(split / "test.parquet", columns=["input_ids", "labels"])
    pq.write_table(test.slice(0, EVAL_ROWS), out / "test.parquet")
    return out


# --------------------------------------------------------------------------- measurements


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 matmul FLOP/s of this machine now (same threads as training), over `repeats` runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and caches
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def matmul_parameters(folder: str) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding, plus a tied output projection."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # the shapes are all that is needed
        model = AutoModelForCausalLM.from_config(config)
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is counted once here
    return total - embedding.numel() + (output.numel() if output is embedding else 0)


def throughput(step_tokens: list[int], step_seconds: list[float]) -> float:
    """Non-padding tokens per second over the optimizer steps after the first (warm-up)."""
    return sum(step_tokens[1:]) / sum(step_seconds[1:])


# --------------------------------------------------------------------------- the runs


def seeds_arguments(output_dir: str, max_steps: int):
    """The seeds' TrainingArguments, as the course wrote them (CPU here)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        learning_rate=1.0e-5,
        num_train_epochs=1,
        max_steps=max_steps,
        per_device_train_batch_size=1,
        output_dir=output_dir,
        disable_tqdm=True,
        eval_steps=120,
        save_steps=120,
        warmup_steps=1,
        per_device_eval_batch_size=1,
        eval_strategy="steps",
        logging_strategy="steps",
        logging_steps=1,
        optim="adafactor",
        gradient_accumulation_steps=4,
        load_best_model_at_end=True,
        save_total_limit=1,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def seeds_run(job_path: Path) -> None:
    """Child process: train with the seeds' recipe; print one JSON line with the measurements."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from pipeline.models import IGNORE_INDEX
    from tasks.train import MeteredTrainer, StepTimer, TokenMeter, peak_memory, reset_peak_memory, training_rows

    job = json.loads(job_path.read_text())
    tokenizer = load_tokenizer(job["folder"])
    model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32)
    meter = TokenMeter()
    # The plain Trainer; MeteredTrainer only counts tokens (grouping off: the seeds shuffle at random).
    trainer = MeteredTrainer(
        model=model,
        args=seeds_arguments(job["output_dir"], job["max_steps"]),
        train_dataset=training_rows(Path(job["split"]) / "train.parquet"),
        eval_dataset=training_rows(Path(job["split"]) / "test.parquet"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[StepTimer(meter)],
        meter=meter,
        group_by_length=False,
    )
    since_reset = reset_peak_memory()  # measured as the stage does: training only, not loading
    trainer.train()
    peak, kind = peak_memory(since_reset)
    print(
        json.dumps(
            {
                "step_tokens": meter.step_tokens,
                "step_seconds": meter.step_seconds,
                "real": meter.real,
                "padded": meter.padded,
                "peak_memory_bytes": peak,
                "peak_memory_kind": kind,
            }
        )
    )


def run_seeds(folder: str, split: Path, examples: int, work: Path) -> dict:
    """The seeds' run in its own process; out: its measurements."""
    job = work / "seeds.json"
    job.write_text(
        json.dumps(
            {"folder": folder, "split": str(split), "output_dir": str(work / "seeds"), "max_steps": examples // 4}
        )
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--seeds-job", str(job)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"seeds' run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"], result["load"] = time.perf_counter() - started, os.getloadavg()[1]
    return result


def run_stage(folder: str, split: Path, config: TrainConfig, work: Path, name: str) -> dict:
    """This stage's training (its own launcher and process) with `config`; out: its measurements."""
    job = TrainJob(
        base_folder=folder,
        base_spec=DEFAULT_MODEL,
        split_dir=str(split),
        out_dir=str(work / name / "out"),
        work_dir=str(work / name / "work"),
        config=config,
    )
    Path(job.out_dir).mkdir(parents=True)
    started = time.perf_counter()
    report = run_training(job, log=lambda line: None)
    return {
        "step_tokens": report["step_tokens"],
        "step_seconds": report["step_seconds"],
        "real": report["non_padding_tokens"],
        "padded": report["padded_tokens"],
        "peak_memory_bytes": report["peak_memory_bytes"],
        "peak_memory_kind": report["peak_memory_kind"],
        "wall": time.perf_counter() - started,
        "load": os.getloadavg()[1],
    }


def stage_config(examples: int, method: str, gradient_checkpointing: bool = False) -> TrainConfig:
    """configs/default.yaml's train section, sized to `examples` rows, without mid-run evaluation."""
    train = load_config("configs/default.yaml").train
    steps = examples // (train.batch_size * train.gradient_accumulation_steps)
    return train.model_copy(
        update={
            "max_steps": steps,
            "eval_steps": steps,
            "save_steps": steps,
            "best_model_at_end": False,
            "method": method,
            "gradient_checkpointing": gradient_checkpointing,
        }
    )


# --------------------------------------------------------------------------- report


def main() -> None:
    """Measure, print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 128 rows time 15 steps of the stage: with 32 (3 steps) one slow step moved the ratio by 10%.
    parser.add_argument("--examples", type=int, default=128, help="rows trained on by each run (a multiple of 8)")
    parser.add_argument("--split", type=Path, help="a split artifact folder (default: the default run's)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="the store to look for it in")
    parser.add_argument("--seeds-job", type=Path, help=argparse.SUPPRESS)  # internal: the seeds' child process
    args = parser.parse_args()
    if args.seeds_job:
        seeds_run(args.seeds_job)
        return

    folder = resolve_model(DEFAULT_MODEL)
    split = args.split or find_default_split(args.artifacts, folder)
    peak = matmul_peak_flops()
    per_token = 6 * matmul_parameters(folder)
    print(f"model {DEFAULT_MODEL}, {args.examples} examples from {split}, {torch.get_num_threads()} threads")
    print(
        f"fp32 matmul peak measured here: {peak / 1e9:.1f} GFLOP/s; "
        f"model FLOPs per token (6 x matmul params): {per_token / 1e9:.2f} G"
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        rows = sample_split(split, args.examples, work / "split")
        runs = {
            "seeds (HF Trainer, bs 1 x acc 4, adafactor)": run_seeds(folder, rows, args.examples, work),
            "stage, full (default.yaml: bs 8 grouped, fused adamw)": run_stage(
                folder, rows, stage_config(args.examples, "full"), work, "full"
            ),
            "stage, LoRA (default.yaml + method lora)": run_stage(
                folder, rows, stage_config(args.examples, "lora"), work, "lora"
            ),
            "stage, LoRA + gradient checkpointing": run_stage(
                folder, rows, stage_config(args.examples, "lora", gradient_checkpointing=True), work, "lora-gc"
            ),
        }
    print(
        "\n| run | steps timed | non-padding tokens/s | padding | MFU | peak memory | wall | load avg |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for name, r in runs.items():
        r["tps"], r["padding"] = throughput(r["step_tokens"], r["step_seconds"]), 1 - r["real"] / r["padded"]
        print(
            f"| {name} | {len(r['step_seconds']) - 1} | {r['tps']:.1f} | {r['padding']:.1%} "
            f"| {r['tps'] * per_token / peak:.1%} "
            f"| {r['peak_memory_bytes'] / GIB:.2f} GiB | {r['wall']:.0f} s | {r['load']:.1f} |"
        )
    seeds, full, lora, lora_gc = runs.values()
    speedup, memory = full["tps"] / seeds["tps"], lora["peak_memory_bytes"] / full["peak_memory_bytes"]
    memory_gc = lora_gc["peak_memory_bytes"] / full["peak_memory_bytes"]
    print(
        f"\npeak memory is the {full['peak_memory_kind']} of each training process; load avg is the machine's "
        f"5-minute load average after the run ({os.cpu_count()} CPUs): other work on the machine slows every figure"
    )
    print(
        f"tokens/s, stage full / seeds: {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x) "
        f"{'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'}"
    )
    print(f"tokens/s, stage LoRA / seeds: {lora['tps'] / seeds['tps']:.2f}x")
    print(
        f"padding share, stage full: {full['padding']:.1%} (target < {TARGET_PADDING:.0%}) "
        f"{'PASS' if full['padding'] < TARGET_PADDING else 'FAIL'}"
    )
    print(
        f"peak memory, LoRA / full: {memory:.2f} (target <= {TARGET_MEMORY:g}) "
        f"{'PASS' if memory <= TARGET_MEMORY else 'FAIL'}"
    )
    print(
        f"peak memory, LoRA + gradient checkpointing / full: {memory_gc:.2f} "
        f"(target <= {TARGET_MEMORY:g}) {'PASS' if memory_gc <= TARGET_MEMORY else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
