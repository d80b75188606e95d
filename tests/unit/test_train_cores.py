"""The train stage's pure parts: LoRA targets, length grouping, checkpoints in the store, launching,
error reporting, aliases and finding a trained model again. No training here."""

import ast
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.assets import UnknownModelError, resolve_model
from pipeline.config import LoraConfig, ModelConfig, TrainConfig
from pipeline.lora import LoraTargetError, check_lora_targets, lora_targets
from pipeline.models import alias_name, find_model, list_aliases, model_folder, read_alias, write_alias
from pipeline.store import LocalStore, StoreSettings
from tasks.train import (
    LengthGroupedSampler,
    TrainingError,
    TrainingOutOfMemory,
    job_store,
    launch_command,
    model_structure,
    out_of_memory_error,
    report_markdown,
    restore_checkpoints,
    stored_checkpoints,
    sync_checkpoints,
    training_failure,
)

# --------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gpt_neox", ["query_key_value"]),
        ("opt", ["q_proj", "v_proj"]),  # not ours: peft's default for the type
    ],
)
def test_lora_targets_follow_the_architecture(model_type, expected):
    assert lora_targets(model_type, LoraConfig()) == expected


def test_configured_lora_targets_win_and_unknown_architectures_ask_for_them():
    assert lora_targets("llama", LoraConfig(target_modules=["v_proj"])) == ["v_proj"]
    with pytest.raises(LoraTargetError, match="no default for model type 'made_up'"):
        lora_targets("made_up", LoraConfig())


def test_lora_targets_missing_from_the_model_name_its_modules():
    model_type, names = model_structure(resolve_model("tiny-neox"), trust_remote_code=False)  # meta device: no weights
    check_lora_targets(["query_key_value", "dense_h_to_4h"], names, model_type)
    with pytest.raises(LoraTargetError) as error:
        check_lora_targets(["q_proj", "query_key_value"], names, model_type)
    message = str(error.value)
    assert "['q_proj'] not found in this gpt_neox model" in message
    assert "'query_key_value'" in message and "'dense_4h_to_h'" in message


def test_unknown_model_spec_lists_the_aliases(tmp_path):
    with pytest.raises(UnknownModelError, match=r"Unknown model 'no-such/model-here'(.|\n)*tiny-neox"):
        model_folder(ModelConfig(name="no-such/model-here"), LocalStore(tmp_path))


# --------------------------------------------------------------------------- length grouping


def test_length_grouping_keeps_every_row_cuts_padding_and_is_reproducible():
    lengths = [(i * 37) % 97 + 5 for i in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.05
    assert all(len(b) == 8 for b in batches[:-1])  # the short batch is the last one, so boundaries hold
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=1)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


# --------------------------------------------------------------------------- checkpoints in the store


def _fake_checkpoint(folder: Path, step: int, best: Path | None = None) -> None:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * step)
    (path / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": str(best) if best else None}))


def test_checkpoints_mirror_the_trainer_and_restore_into_a_new_folder(tmp_path):
    store, run = LocalStore(tmp_path / "store"), tmp_path / "run-1"
    _fake_checkpoint(run, 2)
    sync_checkpoints(store, "checkpoints/k", run)
    _fake_checkpoint(run, 4, best=run / "checkpoint-2")
    sync_checkpoints(store, "checkpoints/k", run)
    assert stored_checkpoints(store, "checkpoints/k") == ["checkpoint-2", "checkpoint-4"]
    (run / "checkpoint-2").rename(run / "gone")  # the Trainer rotated it out
    sync_checkpoints(store, "checkpoints/k", run)
    assert stored_checkpoints(store, "checkpoints/k") == ["checkpoint-4"]
    store.put_bytes("checkpoints/k/checkpoint-6/model.safetensors", b"half")  # a kill mid-upload: no manifest
    restored = restore_checkpoints(store, "checkpoints/k", tmp_path / "run-2")
    assert restored == tmp_path / "run-2" / "checkpoint-4"
    assert (restored / "model.safetensors").read_bytes() == b"w" * 4 and not (restored / "manifest.json").exists()
    state = json.loads((restored / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(tmp_path / "run-2" / "checkpoint-2")


def test_nothing_to_restore_means_a_fresh_start(tmp_path):
    assert restore_checkpoints(LocalStore(tmp_path / "store"), "checkpoints/k", tmp_path / "run") is None


# --------------------------------------------------------------------------- launching and errors


def test_one_process_runs_the_module_several_go_through_torchrun_or_accelerate(tmp_path):
    job = tmp_path / "job.json"
    assert launch_command(TrainConfig(), job) == [sys.executable, "-m", "tasks.train", str(job)]
    torchrun = launch_command(TrainConfig(num_processes=2), job)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and torchrun[-5:] == [
        "--nproc_per_node",
        "2",
        "-m",
        "tasks.train",
        str(job),
    ]
    accelerate = launch_command(TrainConfig(num_processes=2, launcher="accelerate"), job)
    assert (
        accelerate[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in accelerate
    )  # else one process on CPU
    fsdp = launch_command(TrainConfig(accelerate_config=str(tmp_path / "fsdp.yaml")), job)
    assert fsdp[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" not in fsdp
    assert fsdp[fsdp.index("--config_file") + 1] == str(tmp_path / "fsdp.yaml") and fsdp[-3:] == [
        "--module",
        "tasks.train",
        str(job),
    ]


def test_the_training_process_error_comes_back_with_its_type(tmp_path):
    (tmp_path / "error.json").write_text(json.dumps({"type": "LoraTargetError", "message": "['x'] not found"}))
    error = training_failure(tmp_path / "error.json", 3, [], TrainConfig())
    assert isinstance(error, LoraTargetError) and str(error) == "['x'] not found"
    killed = training_failure(tmp_path / "none.json", -9, ["step 3"], TrainConfig(batch_size=8))
    assert isinstance(killed, TrainingOutOfMemory) and "train.method=lora" in str(killed) and "step 3" in str(killed)
    crashed = training_failure(tmp_path / "none.json", 1, ["Traceback", "KeyError: 'x'"], TrainConfig())
    assert type(crashed) is TrainingError and "status 1" in str(crashed) and "KeyError: 'x'" in str(crashed)


def test_out_of_memory_advice_fits_the_run():
    advice = str(out_of_memory_error(TrainConfig(batch_size=8), "cuda", RuntimeError("CUDA out of memory")))
    for hint in (
        "train.method=lora",
        "smaller train.batch_size (now 8)",
        "train.gradient_checkpointing=true",
        "train.dtype=bfloat16",
    ):
        assert hint in advice
    assert "model.dtype=bfloat16" in advice
    lora = str(
        out_of_memory_error(
            TrainConfig(method="lora", batch_size=1, gradient_checkpointing=True), "cpu", RuntimeError("x"), "bfloat16"
        )
    )
    assert "train.method=lora" not in lora and "model.dtype" not in lora and "a smaller model" in lora


# --------------------------------------------------------------------------- aliases and finding models


def test_alias_is_dataset_steps_and_utc_time():
    when = datetime(2026, 11, 22, 7, 46, 41, tzinfo=UTC)
    assert alias_name("more_itertools", 60, when) == "more_itertools_60_steps_20261122T074641Z"
    assert alias_name("my faq/v2", 3, when) == "my-faq-v2_3_steps_20261122T074641Z"


def test_a_model_is_found_by_alias_uri_or_folder(tmp_path):
    store = LocalStore(tmp_path / "store")
    staged = tmp_path / "staged" / "model"
    staged.mkdir(parents=True)
    (staged / "config.json").write_text("{}")
    ref = store.commit("train/" + "a" * 32, staged.parent, kind="train", inputs={}, config={}, meta={})
    alias = "faq_3_steps_20261122T074641Z"
    write_alias(store, alias, ref)
    expected = str(tmp_path / "store" / "train" / ("a" * 32) / "model")
    assert read_alias(store, alias) == ref and list_aliases(store) == [alias]
    assert find_model(alias, store) == find_model(ref.uri, store) == find_model(f"{ref.uri}/model", store) == expected
    assert find_model(str(tmp_path / "store" / ref.uri), store) == expected
    with pytest.raises(UnknownModelError, match=rf"(.|\n)*tiny-neox(.|\n)*aliases\):\n  {alias}"):
        find_model("faq_4_steps_typo", store)


def test_report_markdown_embeds_the_loss_curve():
    report = {
        "method": "lora",
        "device": "cpu",
        "processes": 2,
        "precision": "fp32",
        "parameters": 1000,
        "trainable_parameters": 10,
        "model_memory_bytes": 4000,
        "steps": 3,
        "examples_seen": 24,
        "resumed_from_step": 2,
        "flops_per_optimizer_step": 1.5e9,
        "tokens_per_second": 99.5,
        "padding_share": 0.031,
        "wall_seconds": 3.0,
        "training_seconds": 2.0,
        "peak_memory_bytes": 2**30,
        "peak_memory_kind": "process peak RSS",
        "first_loss": 3.0,
        "final_train_loss": 2.0,
        "test_loss": 2.5,
        "best_step": 3,
    }
    text = report_markdown(report, b"\x89PNG fake", "faq_3_steps_x", "train/abc")
    assert "| padding share | 3.1% |" in text and "(resumed at step 2)" in text and "1.5e+09" in text
    assert "![loss curve](data:image/png;base64,iVBORyBmYWtl)" in text


def test_the_training_process_gets_the_store_settings_but_never_the_secrets(tmp_path, monkeypatch):
    from tasks.train import training_env

    store = StoreSettings(
        uri="s3://bucket/runs",
        endpoint_url="http://127.0.0.1:8333",
        access_key_id="AKIAEXAMPLE",
        secret_access_key="do-not-write-me",
        retry_attempts=9,
        retry_backoff_seconds=2.5,
    )
    job = job_store(store)
    assert (job.retry_attempts, job.retry_backoff_seconds, job.endpoint_url) == (9, 2.5, "http://127.0.0.1:8333")
    assert "do-not-write-me" not in job.model_dump_json() and job.access_key_id is None
    assert training_env(store)["AWS_SECRET_ACCESS_KEY"] == "do-not-write-me", "the secret goes by environment"
    monkeypatch.chdir(tmp_path)
    assert job_store(StoreSettings(uri="artifacts")).uri == str(tmp_path / "artifacts")


def _imported_at_import_time(module: str) -> set[str]:
    """The modules a project module's own top-level statements import (not those inside its functions)."""
    from pipeline.code_version import imported_names, module_file

    path = module_file(module)
    top = [node for node in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(node, IMPORT_TIME_NODES)]
    return imported_names(ast.unparse(ast.Module(body=top, type_ignores=[])), module, path.name == "__init__.py")


IMPORT_TIME_NODES = (ast.Import, ast.ImportFrom, ast.If, ast.Try)
"""Top-level statements whose imports run when the module is imported."""


def test_a_training_process_never_imports_the_stage_or_prefect():
    """`python -m tasks.train` imports the package first; its lazy re-exports keep the `train` task and Prefect
    (about 2 s of CPU per training started) out of the training process. Read statically: what the modules'
    top-level statements import, transitively, from the package and its `__main__`."""
    from pipeline.code_version import module_file

    seen: set[str] = set()
    external: set[str] = set()
    todo = ["tasks", "tasks.train", "tasks.train.__main__"]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        for imported in _imported_at_import_time(name):
            parts = imported.split(".")
            todo.extend(".".join(parts[:end]) for end in range(1, len(parts) + 1))
            external.add(parts[0])
    assert "tasks.train.process" in seen and "pipeline.store" in seen
    assert not {"tasks.train.stage", "pipeline.stage"} & seen, sorted(seen)
    assert "torch" in external and "prefect" not in external
