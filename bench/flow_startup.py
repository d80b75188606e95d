"""Benchmark: what a process pays to import the fine-tuning flow, in CPU seconds, against importing it eagerly.

Every process that runs the flow imports `flows.finetune` first: `finetune run` and the Python API, each flow run a
served deployment or a worker starts, a placed stage's flow run, `prefect deploy` (it loads the entrypoint). The
stages import torch, transformers, peft, datasets and sentence-transformers only where a body trains, answers or
scores (`pipeline.lazy_exports`, local imports), so a run whose stages all come back Cached, and every process
that only orchestrates, never loads them.

The baseline, measured in the same run, is the same import followed by the two modules the flow used to load with it
at the top of its stages (the training process's module and the evaluate stage's generation, which bring in torch,
transformers, peft, datasets and accelerate): what every such process paid before. Each is run `--repeat` times in a
fresh interpreter and the least CPU time (user + system, of the child) counts, as `timeit` does: noise only ever
adds time.

Run from the repository root:

    .venv/bin/python bench/flow_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAZY = "import flows.finetune"
EAGER = LAZY + "; import tasks.train.process, tasks.evaluate.generation"


def child_cpu_seconds(code: str) -> float:
    """CPU seconds (user + system) a fresh interpreter spends running `code` in the repository root."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best_of(code: str, repeat: int) -> float:
    """The least CPU time of `repeat` runs of `code`."""
    return min(child_cpu_seconds(code) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    child_cpu_seconds(EAGER)  # warm the file cache, so neither side pays for the first read from disk
    lazy, eager = best_of(LAZY, args.repeat), best_of(EAGER, args.repeat)
    load = os.getloadavg()
    print(f"import flows.finetune:                          {lazy:5.2f} CPU s (best of {args.repeat})")
    print(f"baseline, with the ML libraries loaded eagerly: {eager:5.2f} CPU s (best of {args.repeat})")
    print(f"ratio baseline / lazy: {eager / lazy:.1f}x; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
