"""Time on this machine: train a model for a few steps through the pipeline's own training code and measure it.

`finetune plan --probe` runs it after the memory plan (pipeline/planner/): the measured peak memory
against the estimate, non-padding tokens per second and the time one epoch would take. It lives above
the stages because it runs one (`fine_tune` in tasks/train/process.py) in a child process,
`python -m finetune.probe <probe.json>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.planner import PlannerError, TrainingSetup, load_model_config

PROBE_MALLOC_MMAP_THRESHOLD = "131072"
"""glibc setting for probe processes: large blocks come from mmap and go back to the system when freed."""


@dataclass(frozen=True)
class ProbeResult:
    """What a short training run on this machine measured."""

    peak_bytes: int
    peak_kind: str
    tokens_per_second: float
    step_seconds: list[float]
    parameters: int
    trainable_parameters: int


def pipeline_optimizer(optimizer: str) -> str:
    """The Trainer's name (train.optim) for a planner optimizer; PlannerError for ones the pipeline does not run."""
    names = {"adamw": "adamw_torch", "adafactor": "adafactor", "sgd": "sgd"}
    if optimizer not in names:
        raise PlannerError(f"probe: the pipeline trains with {sorted(names)}, found optimizer {optimizer!r}")
    return names[optimizer]


def pipeline_dtypes(precision: str) -> tuple[str, str]:
    """(model.dtype, train.dtype) of the pipeline for a planner precision: float32 weights without or with bf16
    autocast ('float32', 'mixed'), or 16-bit weights ('bfloat16', 'float16', autocast following them)."""
    if precision == "mixed":
        return "float32", "bfloat16"
    return precision, "auto" if precision != "float32" else "float32"


def probe_training(model: str, setup: TrainingSetup, steps: int = 3, timeout: float = 1800.0) -> ProbeResult:
    """Train `model` (a spec) for `steps` steps of `setup` on this machine; out: measured peak memory and tokens/s.

    Runs the pipeline's own training (`fine_tune` in tasks/train/process.py) in a child process on
    fixed-length random rows, so every batch is `batch_size` x `seq_len` tokens. The
    peak is CUDA's peak allocation on a GPU; on a CPU it is the process's peak resident
    set during training minus its resident set before the model was loaded (Python,
    torch and transformers themselves), with glibc told to hand large freed blocks back
    (MALLOC_MMAP_THRESHOLD_), so the figure is the memory training held at its peak
    rather than what the allocator kept around. Tokens/s leaves out the first step
    (warm-up). Raises PlannerError when the probe fails.
    """
    from pipeline.config import TrainConfig

    targets = list(setup.lora_targets) if setup.lora_targets else None
    weights, autocast = pipeline_dtypes(setup.precision)
    config = TrainConfig(
        method=setup.method,
        max_steps=steps,
        batch_size=setup.batch_size,
        gradient_accumulation_steps=1,
        optim=pipeline_optimizer(setup.optimizer),
        dtype=autocast,
        warmup_steps=0,
        eval_steps=10**6,
        save_steps=10**6,
        best_model_at_end=False,
        group_by_length=False,
        gradient_checkpointing=setup.gradient_checkpointing,
        logging_steps=1,
        lora={"r": setup.lora_r, "target_modules": targets},
    )
    with tempfile.TemporaryDirectory(prefix="finetune-probe-") as work:
        job = {
            "model": model,
            "seq_len": setup.seq_len,
            "work": work,
            "weights": weights,
            "config": config.model_dump(mode="json"),
        }
        job_path = Path(work) / "probe.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=PROBE_MALLOC_MMAP_THRESHOLD)
        repository = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, env.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, "-m", "finetune.probe", str(job_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        result_path = Path(work) / "result.json"
        if done.returncode != 0 or not result_path.is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise PlannerError(f"probe: training {model!r} failed (exit {done.returncode}):\n{tail}")
        return ProbeResult(**json.loads(result_path.read_text(encoding="utf-8")))


def epoch_seconds(rows: int, tokens_per_row: float, tokens_per_second: float) -> float:
    """Seconds for one pass over `rows` rows of `tokens_per_row` non-padding tokens at a measured throughput."""
    return rows * tokens_per_row / tokens_per_second


def available_memory() -> int | None:
    """Bytes this machine can still give a new process (MemAvailable on Linux), None where unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _resident_bytes() -> int:
    """This process's resident set now (Linux), 0 where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_probe(job_path: Path) -> None:
    """The probe's child process: write random fixed-length rows, train through tasks.train, write result.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.assets import resolve_model
    from pipeline.config import TrainConfig
    from tasks.train import TrainJob, fine_tune

    job = json.loads(job_path.read_text(encoding="utf-8"))
    work, config = Path(job["work"]), TrainConfig.model_validate(job["config"])
    folder = resolve_model(job["model"])
    vocab = load_model_config(folder).vocab_size
    generator = torch.Generator().manual_seed(0)
    split = work / "split"
    split.mkdir()
    for name, rows in (("train", config.batch_size * (config.max_steps or 1)), ("test", config.batch_size)):
        ids = torch.randint(0, vocab, (rows, job["seq_len"]), generator=generator).tolist()
        pq.write_table(pa.table({"input_ids": ids, "labels": ids}), split / f"{name}.parquet")
    baseline = _resident_bytes()  # libraries loaded, model not yet
    report = fine_tune(
        TrainJob(
            base_folder=folder,
            base_spec=job["model"],
            weights=job["weights"],
            split_dir=str(split),
            out_dir=str(work / "out"),
            work_dir=str(work / "train"),
            config=config,
            save_model=False,  # only the figures count: writing the weights would cost seconds (0.5 GB at 135M)
        )
    )
    on_gpu = report["peak_memory_kind"].startswith("CUDA")
    seconds = report["step_seconds"][1:] or report["step_seconds"]
    tokens = report["step_tokens"][1:] or report["step_tokens"]
    kind = report["peak_memory_kind"] + ("" if on_gpu else " minus the resident set before loading the model")
    result = {
        "peak_bytes": report["peak_memory_bytes"] - (0 if on_gpu else baseline),
        "peak_kind": kind,
        "tokens_per_second": sum(tokens) / sum(seconds),
        "step_seconds": report["step_seconds"],
        "parameters": report["parameters"],
        "trainable_parameters": report["trainable_parameters"],
    }
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    _run_probe(Path(sys.argv[1]))
