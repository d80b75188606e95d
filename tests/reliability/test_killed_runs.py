"""SIGKILL during training, during an upload and during evaluation: each rerun recomputes only what was
lost, training resumes from the last checkpoint in the store, and the run ends with the same artifacts
as an uninterrupted run (the same sha256 for every file, wall-clock figures apart).

One local store goes through four runs: killed while training (from outside, once the first checkpoint
is in the store), killed while writing the trained model into the store (the process kills itself
halfway through the file: no outside watcher could time that), killed while evaluating (inside the
first generation call), then finished in this process. The exact resume of one killed training
process (step, loss) is tests/integration/test_train_runs.py; here it is the whole flow.
"""

from __future__ import annotations

import json
import signal

import pytest

from pipeline.refs import MANIFEST_NAME
from pipeline.store import LocalStore

pytestmark = [pytest.mark.flow]

BEFORE_TRAIN = ["collect", "template", "tokenize", "validate", "split"]


def _manifests(root, stage: str) -> list:
    return sorted(root.glob(f"{stage}/*/{MANIFEST_NAME}"))


def test_killed_three_times_then_finishes_like_an_uninterrupted_run(
    prefect_harness, reference_run, flow_process, checks, tmp_path
):
    from flows.finetune import finetune

    root = tmp_path / "store"
    store = LocalStore(root)

    # 1. SIGKILL (flow and training process) once the first checkpoint is committed to the store.
    run = flow_process(str(root), "1-killed-in-training")
    run.wait_for(lambda: bool(list(root.glob(f"checkpoints/*/checkpoint-*/{MANIFEST_NAME}"))), what="a checkpoint")
    run.kill()
    assert run.proc.returncode == -signal.SIGKILL
    assert not _manifests(root, "train"), "killed in training, yet a trained model was committed"
    committed = checks.assert_every_manifest_verifies(store)
    assert {uri.split("/")[0] for uri in committed} == {*BEFORE_TRAIN, "checkpoints"}
    (checkpoint,) = [uri for uri in committed if uri.startswith("checkpoints/")]
    assert checkpoint.endswith("/checkpoint-2")  # save_steps=2 of max_steps=4

    # 2. Rerun, killed halfway through writing the trained weights into the store.
    run = flow_process(str(root), "2-killed-in-upload", kill_while_writing="*/train/*/model/model.safetensors")
    assert run.wait() == -signal.SIGKILL, run.tail()
    assert "KILLING MYSELF" in run.log.read_text()
    states = run.task_states()
    assert all(states[stage] == "Cached" for stage in BEFORE_TRAIN), states  # nothing before train recomputed
    (train_dir,) = root.glob("train/*")
    assert (train_dir / "model" / ".~tmp-model.safetensors.killed").is_file()  # the half-written file ...
    assert not (train_dir / MANIFEST_NAME).exists()  # ... of an artifact that does not exist
    uri = f"train/{train_dir.name}"
    assert not store.has_artifact(uri) and store.read_manifest(uri) is None
    assert not any(".~tmp-" in path for path in store.list())  # listings never show it
    assert checks.assert_every_manifest_verifies(store) == committed  # the checkpoint is still there

    # 3. Rerun, killed inside the first evaluation (after train committed).
    run = flow_process(str(root), "3-killed-in-evaluation", kill_at="tasks.evaluate.generation:generate_answers")
    assert run.wait() == -signal.SIGKILL, run.tail()
    states = run.task_states()
    assert all(states[stage] == "Cached" for stage in BEFORE_TRAIN) and states["train"] == "Completed", states
    assert _manifests(root, "train") and not _manifests(root, "evaluate")
    assert not (train_dir / "model" / ".~tmp-model.safetensors.killed").exists()  # the retry cleared it
    assert not store.list("checkpoints")  # the committed model supersedes its checkpoints
    checks.assert_every_manifest_verifies(store)

    # 4. Rerun here, to the end.
    summary = finetune(config_path="configs/tiny.yaml", overrides=[f"store.uri={root}"])
    states = {entry["stage"]: entry["state"] for entry in summary["stages"]}
    assert [states[stage] for stage in checks.STAGES] == ["Cached"] * 6 + ["Completed"] * 5, states
    report = json.loads((root / summary["stages"][5]["uri"] / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["steps"] == 4  # training resumed from checkpoint-2

    checks.assert_every_manifest_verifies(store)
    checks.assert_same_artifacts(reference_run, root, summary)
    assert checks.leftover_temp_files(root) == []
