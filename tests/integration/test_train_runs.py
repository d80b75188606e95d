"""Real training on tiny-neox: LoRA export and `finetune ask`, out-of-memory advice, a run killed with SIGKILL
that resumes from the store to the same loss, and two processes with DataLoader workers inside a Prefect task."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from qa_rows import qa_table
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer

from finetune.cli import main
from pipeline.assets import resolve_model
from pipeline.config import ModelConfig, StoreConfig, TemplateConfig, TrainConfig
from pipeline.models import list_aliases, load_model, load_tokenizer, read_alias
from pipeline.store import StoreSettings, open_store
from tasks.train import (
    LOSS_PLOT_FILE,
    REPORT_FILE,
    TrainingOutOfMemory,
    TrainJob,
    fine_tune,
    launch_command,
    run_training,
    stored_checkpoints,
    training_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    """A split artifact's files: 32 train rows, 8 test rows for tiny-neox."""
    folder = tmp_path_factory.mktemp("split")
    tokenizer, rng = load_tokenizer(resolve_model("tiny-neox")), random.Random(0)
    pq.write_table(qa_table(tokenizer, 32, rng), folder / "train.parquet")
    pq.write_table(qa_table(tokenizer, 8, rng), folder / "test.parquet")
    return folder


def _job(root: Path, split_dir: Path, store: StoreSettings | None = None, **train) -> TrainJob:
    """A training job on tiny-neox writing under `root`; `train` overrides the fast test settings."""
    settings = {
        **dict(
            max_steps=4,
            learning_rate=1e-3,
            batch_size=4,
            gradient_accumulation_steps=1,
            optim="adamw_torch",
            warmup_steps=0,
            eval_steps=2,
            save_steps=2,
        ),
        **train,
    }
    (root / "out").mkdir(parents=True, exist_ok=True)
    return TrainJob(
        base_folder=resolve_model("tiny-neox"),
        base_spec="tiny-neox",
        split_dir=str(split_dir),
        out_dir=str(root / "out"),
        work_dir=str(root / "work"),
        config=TrainConfig(**settings),
        store=store,
        checkpoint_prefix="checkpoints/test" if store else None,
    )


def test_a_job_that_keeps_no_model_writes_only_its_report(split_dir, tmp_path):
    """save_model=False (the planner's probe): the run trains and reports, and no weights are written."""
    job = _job(tmp_path, split_dir, max_steps=2, eval_steps=2, save_steps=100).model_copy(update={"save_model": False})
    report = fine_tune(job)
    assert report["steps"] == 2 and report["peak_memory_bytes"] > 0
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == sorted([REPORT_FILE, LOSS_PLOT_FILE]), written
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["steps"] == 2


def test_lora_keeps_the_adapter_apart_and_exports_it_merged(split_dir, tmp_path, capsys):
    report = fine_tune(_job(tmp_path, split_dir, method="lora", lora={"r": 4, "alpha": 8}, learning_rate=1e-2))
    out = tmp_path / "out"
    assert 0 < report["trainable_parameters"] < 0.01 * report["parameters"]
    assert report["padding_share"] < 0.10 and report["tokens_per_second"] > 0 and report["flops_per_optimizer_step"] > 0
    assert report["peak_memory_bytes"] > report["model_memory_bytes"] > 0
    assert [e["step"] for e in report["eval_history"]] == [2, 4] and report["test_loss"] < report["first_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    base, merged = (
        load_file(Path(resolve_model("tiny-neox")) / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    mlp = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(base[qkv], merged[qkv]) and torch.equal(base[mlp], merged[mlp])  # only the targets moved
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-neox"
    ids = torch.tensor([[510, 3533, 27, 187]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out / "model")(ids).logits
        via_peft = load_model(str(out / "adapter"), device="cpu")(ids).logits
    assert torch.allclose(plain, via_peft, atol=1e-4)

    capsys.readouterr()
    code = main(
        [
            "ask",
            str(out),
            "What does chunked do?",
            "--config",
            "configs/tiny.yaml",
            "--set",
            f"store.uri={tmp_path / 'store'}",
            "--max-new-tokens",
            "4",
        ]
    )
    answer = capsys.readouterr().out
    assert code == 0 and answer.endswith("\n") and "### Question" not in answer  # the prompt is cut off by tokens


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory"),
    ],
)
def test_out_of_memory_says_what_to_change(split_dir, tmp_path, monkeypatch, failure):
    def run_out_of_memory(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(Trainer, "train", run_out_of_memory)
    with pytest.raises(TrainingOutOfMemory) as error:
        fine_tune(_job(tmp_path, split_dir, batch_size=8))
    message = str(error.value)
    assert "out of memory on cpu" in message and "train.method=lora" in message
    assert "smaller train.batch_size (now 8)" in message and "train.gradient_checkpointing=true" in message


def test_a_killed_run_resumes_from_the_store_and_ends_with_the_same_loss(split_dir, tmp_path):
    # 32 rows, 8 per optimizer step: the run resumes mid-epoch at step 3 and crosses an epoch end at step 4,
    # so data order after a resume is tested too.
    steps = dict(max_steps=8, gradient_accumulation_steps=2, eval_steps=3, save_steps=3)
    reference = fine_tune(_job(tmp_path / "whole", split_dir, **steps))

    store = StoreSettings(uri=str(tmp_path / "store"))
    job = _job(tmp_path / "killed", split_dir, store, **steps)
    Path(job.work_dir).mkdir(parents=True)
    job_path = Path(job.work_dir) / "job.json"
    job_path.write_text(job.model_dump_json(), encoding="utf-8")
    process = subprocess.Popen(
        launch_command(job.config, job_path),
        env=training_env(None),
        cwd=Path.cwd(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while process.poll() is None and not stored_checkpoints(open_store(store), "checkpoints/test"):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (Path(job.out_dir) / REPORT_FILE).exists()
    killed_at = int(stored_checkpoints(open_store(store), "checkpoints/test")[-1].rsplit("-", 1)[1])
    assert 3 <= killed_at < 8

    # Started again in a fresh folder: everything it resumes from comes from the store.
    resumed = run_training(job.model_copy(update={"work_dir": str(tmp_path / "again")}), store, log=lambda line: None)
    assert resumed["resumed_from_step"] == killed_at and resumed["steps"] == 8
    assert resumed["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=0.01)
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], rel=0.01)
    assert [e["step"] for e in resumed["loss_history"]] == list(range(1, 9))


def test_two_processes_with_dataloader_workers_inside_a_prefect_task(prefect_harness, split_dir, tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact

    from pipeline.stage import result_storage_for
    from tasks.train import train

    store = StoreConfig(uri=str(tmp_path / "store"))
    split = open_store(store).commit("split/" + "0" * 32, split_dir, kind="split", inputs={}, config={}, meta={})
    # 2 processes x 4 rows: 4 steps per epoch, so 6 steps cross an epoch end with worker processes running.
    config = TrainConfig(
        num_processes=2,
        dataloader_num_workers=1,
        max_steps=6,
        learning_rate=1e-3,
        batch_size=4,
        gradient_accumulation_steps=1,
        optim="adamw_torch",
        eval_steps=3,
        save_steps=3,
        dataset_name="faq",
    )

    @flow
    def one_training():
        task = train.with_options(result_storage=result_storage_for(store))
        return task(
            split_data=split, config=config, model=ModelConfig(name="tiny-neox"), template=TemplateConfig(), store=store
        )

    ref = one_training()
    folder = open_store(store).fetch(ref)
    report = json.loads((folder / REPORT_FILE).read_text())
    assert report["processes"] == 2 and report["steps"] == 6 and report["epochs"] > 1
    assert AutoModelForCausalLM.from_pretrained(folder / "model").num_parameters() == report["parameters"]
    assert list_aliases(open_store(store)) == [report["alias"]] and report["alias"].startswith("faq_6_steps_")
    assert read_alias(open_store(store), report["alias"]) == ref and ref.meta["alias"] == report["alias"]
    assert open_store(store).list("checkpoints") == []  # the committed model supersedes them
    artifact = Artifact.get("training-report")
    assert artifact is not None and "data:image/png;base64," in str(artifact.data)
