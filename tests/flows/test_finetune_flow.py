"""The whole flow on the tiny model: every stage commits a valid artifact, the model changes, a rerun is Cached.

The first run is the session's `tiny_run` (tests/conftest.py); the reruns work on a copy of its store.
"""

import json

import pytest
from safetensors.torch import load_file

from flows.finetune import finetune
from pipeline.assets import resolve_model
from pipeline.config import load_config
from pipeline.store import StoreSettings, open_store

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """The session's tiny run, then the tiny config again against a copy of its store (the same artifacts)."""
    store_dir = tiny_run.copy_store(tmp_path_factory.mktemp("rerun") / "store")
    second = finetune(config_path="configs/tiny.yaml", overrides=[f"store.uri={store_dir}"])
    return store_dir, tiny_run.summary, second


def test_every_stage_ran_then_was_cached(two_runs, tiny_stages):
    _, first, second = two_runs
    assert [e["stage"] for e in first["stages"]] == tiny_stages
    assert all(e["state"] == "Completed" for e in first["stages"]), first["stages"]
    assert [e["state"] for e in second["stages"]] == ["Cached"] * len(tiny_stages)
    assert [e["uri"] for e in second["stages"]] == [e["uri"] for e in first["stages"]]


def test_every_artifact_has_a_valid_manifest(tiny_run):
    first = tiny_run.summary
    store = open_store(StoreSettings(uri=str(tiny_run.store)))
    for entry in first["stages"]:
        manifest = store.read_manifest(entry["uri"])
        assert manifest is not None, entry["uri"]
        assert manifest["files"], f"{entry['uri']} lists no files"
        folder = store.fetch(store.open_ref(entry["uri"]))  # verifies every file's sha256
        assert {p.name for p in folder.rglob("*") if p.is_file()} >= {name.split("/")[-1] for name in manifest["files"]}


def test_training_changed_the_weights(tiny_run):
    first = tiny_run.summary
    store = open_store(StoreSettings(uri=str(tiny_run.store)))
    train_uri = next(e["uri"] for e in first["stages"] if e["stage"] == "train")
    tuned = load_file(store.fetch(store.open_ref(train_uri)) / "model" / "model.safetensors")
    base = load_file(f"{resolve_model('tiny-neox')}/model.safetensors")
    changed = [name for name in base if name in tuned and not (base[name] == tuned[name]).all()]
    assert len(changed) >= len(base) // 2, f"only {len(changed)} of {len(base)} tensors changed"
    report = json.loads((store.fetch(store.open_ref(train_uri)) / "report.json").read_text())
    assert report["steps"] == load_config("configs/tiny.yaml").train.max_steps
    assert report["final_train_loss"] < report["first_loss"]


def test_metrics_present_for_both_models(tiny_run):
    first = tiny_run.summary
    for side in ("base", "fine_tuned"):
        metrics = first["metrics"][side]
        assert 0.0 <= metrics["eval.exact_match"] <= 1.0
        assert -1.0 <= metrics["eval.similarity_mean"] <= 1.0
        assert 0.0 <= metrics["benchmark.arc_easy.acc"] <= 1.0
    assert first["passed"] is True and first["verdicts"][0]["metric"] == "eval.similarity_mean"


def test_a_config_change_reruns_only_that_stage_and_later(two_runs):
    store_dir, _first, _ = two_runs
    changed = finetune(config_path="configs/tiny.yaml", overrides=[f"store.uri={store_dir}", "eval.max_new_tokens=6"])
    states = {e["stage"]: e["state"] for e in changed["stages"]}
    assert all(
        states[s] == "Cached"
        for s in [
            "collect",
            "template",
            "tokenize",
            "validate",
            "split",
            "train",
            "benchmark (base, arc_easy 0-8)",
            "benchmark (fine-tuned, arc_easy 0-8)",
        ]
    )
    assert states["evaluate (base)"] == states["evaluate (fine-tuned)"] == states["gate (look 1)"] == "Completed"
