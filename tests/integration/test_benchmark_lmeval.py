"""run_benchmark against the real lm-eval, and against lm-eval's own command line.

The agreement test is what makes our scores comparable with anyone's `lm_eval` run:
the same model folder, task files and limit must give exactly the same accuracies.
The command line indexes lm-eval's ~14,000 built-in tasks (no flag turns that off),
so it is started first and runs while run_benchmark runs in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The hub is out of reach here; fail fast instead of retrying (read at import by datasets).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.assets import arc_data_dir, resolve_model  # noqa: E402
from tasks.benchmark import run_benchmark, write_task_files  # noqa: E402

pytestmark = pytest.mark.integration

LIMIT = 8
BATCH_SIZE = 4
LM_EVAL = Path(sys.executable).parent / "lm_eval"


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return resolve_model("tiny-neox")


@pytest.fixture(scope="session")
def arc_dir() -> Path:
    return arc_data_dir()


@pytest.fixture(scope="module")
def runs(tiny_model, arc_dir, tmp_path_factory):
    """Start the lm_eval CLI in the background, run run_benchmark meanwhile.

    Yields our result and a function that waits for the CLI's result JSON.
    """
    tmp = tmp_path_factory.mktemp("bench")
    task_dir = write_task_files(["arc_easy"], arc_dir, tmp / "tasks", num_fewshot=0)
    out = tmp / "cli_out"
    cmd = [
        str(LM_EVAL),
        "--model", "hf",
        "--model_args", f"pretrained={tiny_model},dtype=float32",
        "--tasks", "arc_easy",
        "--include_path", str(task_dir),
        "--limit", str(LIMIT),
        "--batch_size", str(BATCH_SIZE),
        "--device", "cpu",
        "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = (tmp / "cli.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        ours = run_benchmark(
            tiny_model,
            ["arc_easy"],
            limit=LIMIT,
            num_fewshot=0,
            batch_size=BATCH_SIZE,
            data_dir=arc_dir,
            device="cpu",
        )

        def cli_result() -> dict:
            rc = proc.wait(timeout=300)
            log.flush()
            assert rc == 0, f"lm_eval exited {rc}:\n{(tmp / 'cli.log').read_text()[-3000:]}"
            files = sorted(out.rglob("results_*.json"))
            assert len(files) == 1, f"expected one results_*.json under {out}, found {files}"
            return json.loads(files[0].read_text())

        yield ours, cli_result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_run_benchmark_reports_scores_with_stderr_and_provenance(runs, tiny_model):
    ours, _ = runs
    assert ours["model"] == tiny_model
    assert ours["lm_eval_version"].startswith("0.4.")
    scores = ours["tasks"]["arc_easy"]
    for metric in ("acc", "acc_norm"):
        p = scores[metric]
        assert 0.0 <= p <= 1.0
        # lm-eval's closed-form standard error of a mean of 0/1 scores (sample std, ddof=1).
        assert scores[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
    assert scores["task_version"] == 1.0
    assert scores["num_fewshot"] == 0
    assert scores["limit"] == LIMIT
    assert scores["n_samples"] == LIMIT


def test_scores_equal_the_lm_eval_command_line(runs):
    ours, cli_result = runs
    cli = cli_result()
    theirs = cli["results"]["arc_easy"]
    scores = ours["tasks"]["arc_easy"]
    assert cli["n-samples"]["arc_easy"]["effective"] == scores["n_samples"] == LIMIT
    assert scores["acc"] == theirs["acc,none"]
    assert scores["acc_norm"] == theirs["acc_norm,none"]
    assert scores["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"])
    assert scores["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"])
