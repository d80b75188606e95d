"""The gate loop on the tiny model: a failing gate sends the run round again with changed data;
stages the change does not touch come back Cached; the run's final state follows the last verdicts."""

import json

import pytest

from flows.finetune import LATEST_PASSING, GatesFailed, finetune
from pipeline.config import load_config
from pipeline.models import find_model
from pipeline.store import StoreSettings, open_store

pytestmark = pytest.mark.flow

UNREACHABLE_GATE = "gates=[{metric: eval.similarity_mean, op: '>=', value: 2.0}]"
"""Cosine similarity never reaches 2.0: every round fails, so the loop must stop at max_rounds."""


@pytest.fixture(scope="module")
def failed_run(prefect_harness, tmp_path_factory):
    """The tiny config with a gate no model passes, two rounds allowed."""
    store_dir = tmp_path_factory.mktemp("loop-store")
    overrides = [f"store.uri={store_dir}", UNREACHABLE_GATE, "refine.max_rounds=2"]
    state = finetune(config_path="configs/tiny.yaml", overrides=overrides, return_state=True)
    return store_dir, state


def test_the_run_fails_after_the_last_round(failed_run):
    store_dir, state = failed_run
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GatesFailed)
    assert "after 2 round(s)" in str(error)
    assert not open_store(StoreSettings(uri=str(store_dir))).exists(LATEST_PASSING), "a failed run must not move the pointer"


def test_round_two_ran_with_the_planned_data_changes(failed_run):
    _, state = failed_run
    summary = state.result(raise_on_failure=False).summary
    first, second = summary["rounds"]
    assert [first["round"], second["round"]] == [1, 2]
    assert first["overrides"] == [] and not first["passed"] and not second["passed"]
    planned = first["changes_next"]
    assert [c["change"] for c in planned] == ["augment_phrasings", "more_data"]
    assert all(c["gate"] == "eval.similarity_mean >= 2" and c["why"] for c in planned)
    tiny = load_config("configs/tiny.yaml").data.sources[0]
    assert second["overrides"] == [f"data.sources.0.phrasings={tiny.phrasings + 1}",
                                   f"data.sources.0.max_objects={tiny.max_objects * 2}"]
    rows = {entry["round"]: entry for entry in summary["stages"] if entry["stage"] == "collect"}
    assert rows[2]["meta"]["rows"] > rows[1]["meta"]["rows"], "round 2 must train on more rows"
    assert rows[2]["uri"] != rows[1]["uri"]


def test_stages_the_change_does_not_touch_are_cached(failed_run):
    _, state = failed_run
    summary = state.result(raise_on_failure=False).summary
    round_two = {e["stage"]: e["state"] for e in summary["stages"] if e["round"] == 2}
    assert round_two["benchmark (base)"] == "Cached"  # the base model's ARC score does not depend on the data
    assert round_two["collect"] == round_two["train"] == "Completed"


def test_elo_ranks_every_model_version(failed_run):
    _, state = failed_run
    summary = state.result(raise_on_failure=False).summary
    assert set(summary["elo"]) == {"base", "round 1", "round 2"}


def test_a_passing_run_marks_latest_passing(prefect_harness, tmp_path):
    summary = finetune(config_path="configs/tiny.yaml",
                       overrides=[f"store.uri={tmp_path}", "refine.max_rounds=3", "elo.judge=token_f1"])
    assert summary["passed"] and len(summary["rounds"]) == 1, "a passing first round must not loop"
    [gate_uri] = [entry["uri"] for entry in summary["stages"] if entry["stage"] == "gate"]
    assert "## Elo (pairwise, judged by token_f1)" in (tmp_path / gate_uri / "report.md").read_text(), \
        "the configured judge reaches the gate stage"
    pointer = json.loads(open_store(StoreSettings(uri=str(tmp_path))).get_bytes(LATEST_PASSING))
    assert pointer["model_uri"] == summary["model_uri"] and pointer["round"] == 1
    assert (tmp_path / pointer["model_uri"] / "model.safetensors").is_file()
    store = open_store(StoreSettings(uri=str(tmp_path)))
    assert find_model("latest-passing", store).endswith(pointer["model_uri"])  # what `finetune ask latest-passing` loads
