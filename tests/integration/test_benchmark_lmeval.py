"""run_benchmark against the real lm-eval, and against lm-eval's own command line.

The agreement test is what makes our scores comparable with anyone's `lm_eval` run:
the same model folder, task files and limit must give exactly the same accuracies.
The command line indexes lm-eval's ~14,000 built-in tasks (no flag turns that off),
so it is started first and runs while run_benchmark runs in this process.
A LoRA adapter kept unmerged (`train.lora.merge: false`) must score as the model
lm-eval itself builds with `peft=<adapter>`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The hub is out of reach here; fail fast instead of retrying (read at import by datasets).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.assets import arc_data_dir, resolve_model
from tasks.benchmark import load_for_benchmark, run_benchmark, write_task_files

pytestmark = pytest.mark.integration

LIMIT = 40  # enough questions that a single differing log-likelihood would likely show in acc or acc_norm
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


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on tiny-neox with random (non-zero) weights, saved as train saves one with merge: false."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the adapter changes the model's outputs.
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["query_key_value"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(base, lora).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    config = out / "adapter_config.json"  # the base named by its alias, as the train stage writes it
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "tiny-neox"}))
    return out


def test_a_lora_adapter_loads_as_lm_evals_peft_model_and_scores(adapter_dir, tiny_model, arc_dir):
    import torch
    from lm_eval.models.huggingface import HFLM

    ours, tokenizer = load_for_benchmark(str(adapter_dir), "cpu")
    theirs = HFLM(pretrained=tiny_model, peft=str(adapter_dir), dtype="float32", device="cpu", batch_size=1).model
    plain, _ = load_for_benchmark(tiny_model, "cpu")
    ids = tokenizer("Question: Which gas do plants take in?\nAnswer: carbon dioxide", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = {name: model(ids).logits for name, model in (("ours", ours), ("peft", theirs), ("base", plain))}
    assert ours.dtype == torch.float32
    # lm-eval's peft path cuts the embeddings to the tokenizer's length (tiny-neox pads its vocab to 50,304):
    # the tokens both models have must get the same logits (merged here, unmerged in lm-eval).
    common = min(logits["ours"].shape[-1], logits["peft"].shape[-1])
    assert common == len(tokenizer)
    assert torch.allclose(logits["ours"][..., :common], logits["peft"][..., :common], atol=1e-4)
    assert not torch.allclose(logits["ours"], logits["base"], atol=1e-2)  # the adapter did change the model

    result = run_benchmark(
        str(adapter_dir), ["arc_easy"], limit=4, num_fewshot=0, batch_size=BATCH_SIZE, data_dir=arc_dir, device="cpu"
    )
    assert result["weights"].startswith("adapter") and result["adapter_base_model"] == "tiny-neox"
    assert result["tasks"]["arc_easy"]["n_samples"] == 4


def test_a_benchmark_run_outside_a_git_checkout_prints_no_git_error(tiny_model, arc_dir, tmp_path, monkeypatch, capfd):
    # lm-eval looks up the git commit of the current folder; outside a checkout git printed
    # `fatal: not a git repository` on the terminal of every run started there.
    inside_git = shutil.which("git") and subprocess.run(["git", "-C", str(tmp_path), "rev-parse"], capture_output=True)
    if inside_git and inside_git.returncode == 0:
        pytest.skip(f"{tmp_path} is inside a git checkout")
    monkeypatch.chdir(tmp_path)
    result = run_benchmark(
        tiny_model, ["arc_easy"], limit=None, num_fewshot=0, batch_size=2, data_dir=arc_dir, doc_ids=[0, 1]
    )
    assert result["tasks"]["arc_easy"]["n_samples"] == 2
    captured = capfd.readouterr()
    assert "fatal:" not in captured.err + captured.out
