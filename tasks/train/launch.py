"""Launching the training process(es) from the task: the command, its environment and its failures.

One process runs `python -m tasks.train job.json`; several run under `torchrun` or `accelerate launch`. The
store's credentials travel in the environment, never in the job file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.store import StoreSettings
from tasks.train.errors import ERROR_FILE, KNOWN_ERRORS, TrainingError, TrainingOutOfMemory
from tasks.train.job import TrainJob
from tasks.train.report import REPORT_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]


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
