"""16-bit weights (model.dtype=bfloat16) really train on this CPU: the tiny model (configs/tiny.yaml, full
fine-tuning and LoRA) and the default SmolLM2-135M (a few full steps on short rows). Each run's loss falls, the
saved model is bfloat16 on disk and in its config, and it loads back through the pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from qa_rows import qa_table
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.assets import resolve_model
from pipeline.config import load_config
from pipeline.models import load_model, load_tokenizer
from tasks.train import TrainJob, check_before_launch, fine_tune

pytestmark = pytest.mark.integration


def split_for(model: str, folder: Path, train_rows: int, test_rows: int) -> Path:
    """A split artifact's files for `model`: short random question/answer rows (qa_rows)."""
    tokenizer, rng = load_tokenizer(resolve_model(model)), random.Random(0)
    pq.write_table(qa_table(tokenizer, train_rows, rng), folder / "train.parquet")
    pq.write_table(qa_table(tokenizer, test_rows, rng), folder / "test.parquet")
    return folder


def train_in_bfloat16(model: str, split: Path, root: Path, *overrides: str) -> dict:
    """Train `model` as configs/tiny.yaml says with model.dtype=bfloat16 (+ `overrides`), through the same checks
    and training process body the train stage runs; out: the report. The model lands in `root/out`."""
    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", f"model.name={model}", *overrides])
    base = resolve_model(model)
    check_before_launch(base, cfg.train, cfg.model)  # passes on a CPU: bfloat16 needs no GPU
    (root / "out").mkdir(parents=True)
    job = TrainJob(
        base_folder=base,
        base_spec=model,
        weights=cfg.model.dtype,
        split_dir=str(split),
        out_dir=str(root / "out"),
        work_dir=str(root / "work"),
        config=cfg.train,
    )
    return fine_tune(job)


def assert_saved_in_bfloat16(folder: Path) -> None:
    """The saved model is bfloat16 in its config and in every floating tensor on disk, and loads in bfloat16."""
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert {tensor.dtype for tensor in load_file(folder / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16


def assert_loss_fell(report: dict) -> None:
    """The evaluation loss fell between the first and the last evaluation, and the train loss from its start."""
    evals = [entry["eval_loss"] for entry in report["eval_history"]]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert report["final_train_loss"] < report["first_loss"], report["loss_history"]


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    return split_for("tiny-neox", tmp_path_factory.mktemp("tiny-split"), 32, 8)


def test_tiny_model_full_fine_tuning_in_bfloat16(tiny_split, tmp_path):
    report = train_in_bfloat16("tiny-neox", tiny_split, tmp_path)
    assert (report["weights_dtype"], report["precision"]) == ("bfloat16", "bf16")
    assert_loss_fell(report)
    assert_saved_in_bfloat16(tmp_path / "out" / "model")
    # The pipeline's own loader (evaluate, ask) takes it: float32 on a CPU, so the upcast is exact.
    model = load_model(str(tmp_path / "out" / "model"), device="cpu")
    assert model.dtype == torch.float32 and torch.isfinite(model(torch.tensor([[510, 3533, 27]])).logits).all()


def test_tiny_model_lora_over_bfloat16_weights(tiny_split, tmp_path):
    report = train_in_bfloat16(
        "tiny-neox", tiny_split, tmp_path, "train.method=lora", "train.learning_rate=1e-2", "train.lora.r=4"
    )
    assert 0 < report["trainable_parameters"] < 0.01 * report["parameters"]
    assert_loss_fell(report)
    assert_saved_in_bfloat16(tmp_path / "out" / "model")  # the adapter merged into the bfloat16 base
    # The adapter itself trained (and is saved) in float32 over the 16-bit base: its updates are not rounded away.
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}
    assert torch.isfinite(
        load_model(str(tmp_path / "out" / "adapter"), device="cpu")(torch.tensor([[510]])).logits
    ).all()


def test_default_model_full_fine_tuning_in_bfloat16(tmp_path):
    # SmolLM2-135M: 3 steps of 4 short rows (about 30 tokens each), evaluated once at the end. A learning rate of
    # 3e-4 moves bfloat16 weights (an AdamW step of about lr per weight must exceed half a bfloat16 step, ~0.4% of
    # the weight).
    (tmp_path / "split").mkdir()
    split = split_for("smollm2-135m-instruct", tmp_path / "split", 12, 4)
    report = train_in_bfloat16(
        "smollm2-135m-instruct",
        split,
        tmp_path / "run",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.learning_rate=3e-4",
        "train.eval_steps=3",
        "train.save_steps=3",
    )
    assert report["weights_dtype"] == "bfloat16" and report["parameters"] > 100e6
    assert report["final_train_loss"] < report["first_loss"] and report["test_loss"] < report["first_loss"], report
    saved = tmp_path / "run" / "out" / "model"
    assert_saved_in_bfloat16(saved)
    base = load_file(Path(resolve_model("smollm2-135m-instruct")) / "model.safetensors")
    tuned = load_file(saved / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = (base[name].to(torch.bfloat16) != tuned[name]).float().mean().item()
    assert moved > 0.25, f"only {moved:.1%} of {name} changed: updates rounded away in bfloat16"
