"""The gate loop on the tiny model.

An inconclusive benchmark gate grows the question sample (scoring only the new questions), an inconclusive
probe gate draws more probes, and neither changes data; a failed gate sends the run round again with changed data; stages the change does not
touch come back Cached; a gate still inconclusive when no items remain is decided by
gates_on_inconclusive; the run's final state follows the last verdicts."""

import json

import pyarrow.parquet as pq
import pytest

from flows.finetune import LATEST_PASSING, GatesFailed, finetune
from pipeline.models import find_model
from pipeline.store import StoreSettings, open_store

pytestmark = pytest.mark.flow

GROWING_GATE = "gates=[{metric: benchmark.arc_easy.acc, op: '>=', value: 0.5}]"
"""On 4 questions every score's interval (97.5%, Wilson) contains 0.5, from 0/4 (0 to 0.56) to 4/4 (0.44 to 1):
inconclusive whatever the model answers. On 64 the tiny model, near chance (about 0.25), is wholly below: fail."""
LOOKS = "benchmark.sample_sizes=[4, 64]"


@pytest.fixture(scope="module")
def failed_run(tiny_run, tmp_path_factory):
    """The tiny config with a gate the tiny model fails once the sample is large enough, two rounds allowed.

    On a copy of the session's tiny run's store: round 1 shares its data, model and first benchmark slice with
    that run (Cached here); the second look, the refine and round 2 are computed.
    """
    store_dir = tiny_run.copy_store(tmp_path_factory.mktemp("loop") / "store")
    overrides = [f"store.uri={store_dir}", GROWING_GATE, LOOKS, "refine.max_rounds=2"]
    state = finetune(config_path="configs/tiny.yaml", overrides=overrides, return_state=True)
    return store_dir, state


def _summary(state) -> dict:
    """The run summary of a finished flow run, passed (its return value) or failed (GatesFailed carries it)."""
    result = state.result(raise_on_failure=False)
    return result if isinstance(result, dict) else result.summary


def _entries(state, round_number: int) -> list[dict]:
    summary = state.result(raise_on_failure=False).summary
    return [entry for entry in summary["stages"] if entry["round"] == round_number]


def test_the_run_fails_after_the_last_round(failed_run):
    store_dir, state = failed_run
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GatesFailed)
    assert "after 2 round(s)" in str(error)
    assert not open_store(StoreSettings(uri=str(store_dir))).exists(LATEST_PASSING), (
        "a failed run must not move the pointer"
    )


def test_an_inconclusive_gate_grows_the_sample_instead_of_changing_data(failed_run):
    _, state = failed_run
    stages = [entry["stage"] for entry in _entries(state, 1)]
    assert stages[stages.index("evaluate (fine-tuned)") + 1 :] == [
        "benchmark (base, arc_easy 0-4)",
        "benchmark (fine-tuned, arc_easy 0-4)",
        "gate (look 1)",
        "benchmark (base, arc_easy 4-64)",
        "benchmark (fine-tuned, arc_easy 4-64)",
        "gate (look 2)",
        "refine",
    ]
    looks = {e["stage"]: e["meta"] for e in _entries(state, 1) if e["stage"].startswith("gate")}
    first, second = looks["gate (look 1)"], looks["gate (look 2)"]
    assert first["status"] == "grow" and first["verdicts"][0]["verdict"] == "inconclusive", first["verdicts"]
    assert first["verdicts"][0]["n"] == 4 and first["verdicts"][0]["items_to_decide"]
    assert second["status"] == "fail" and second["verdicts"][0]["verdict"] == "fail", second["verdicts"]
    assert second["verdicts"][0]["n"] == 64 and second["benchmark_n"] == {"arc_easy": 64}
    # A larger look at alpha / looks: the interval is at 97.5% for 2 looks of a 95% gate.
    assert second["verdicts"][0]["confidence"] == pytest.approx(0.975)


def test_the_earlier_questions_come_from_the_store(failed_run):
    store_dir, state = failed_run
    slices = {e["stage"]: e for e in _entries(state, 1) if e["stage"].startswith("benchmark (fine-tuned")}
    first, second = slices["benchmark (fine-tuned, arc_easy 0-4)"], slices["benchmark (fine-tuned, arc_easy 4-64)"]
    assert (first["meta"]["n"], second["meta"]["n"]) == (4, 60), "the second look scores only its 60 new questions"
    items = [json.loads((store_dir / e["uri"] / "results.json").read_text())["sample"] for e in (first, second)]
    assert (items[0]["start"], items[0]["end"], items[1]["start"], items[1]["end"]) == (0, 4, 4, 64)
    round_two = {e["stage"]: e["state"] for e in _entries(state, 2)}
    # The base model's questions do not depend on the data: every base slice round 2 asks for is reused.
    base_slices = [stage for stage in round_two if stage.startswith("benchmark (base")]
    assert "benchmark (base, arc_easy 0-4)" in base_slices
    assert all(round_two[stage] == "Cached" for stage in base_slices), round_two
    assert round_two["collect"] == round_two["train"] == "Completed"


def test_a_failed_benchmark_gate_changes_data_for_the_next_round(failed_run):
    _, state = failed_run
    summary = state.result(raise_on_failure=False).summary
    first, second = summary["rounds"]
    assert first["overrides"] == [] and not first["passed"] and not second["passed"]
    assert [c["change"] for c in first["changes_next"]] == ["replay_general"]
    assert second["overrides"] == first["changes_next"][0]["overrides"]
    rows = {entry["round"]: entry for entry in summary["stages"] if entry["stage"] == "collect"}
    assert rows[2]["meta"]["rows"] > rows[1]["meta"]["rows"], "round 2 must train on more rows"


def test_the_ranking_covers_every_model_version(failed_run):
    _, state = failed_run
    summary = state.result(raise_on_failure=False).summary
    assert set(summary["ranking"]) == {"base", "round 1", "round 2"}


INCONCLUSIVE_GATE = (
    "gates=[{metric: eval.similarity_mean, op: '>=', value: -1.0}, "
    "{metric: benchmark.arc_easy.acc_norm, op: '>=', value: 0.0, relative_to_base: true}]"
)
"""Four training steps barely move the tiny model's ARC choices: on 8 questions the paired difference's
interval straddles 0, and with one look there are no more questions to add."""


def test_a_final_inconclusive_gate_is_decided_by_the_policy(tiny_run, tmp_path):
    # On a copy of the session's tiny run's store: the same data, model and benchmark slice; the gates are new.
    store_dir = tiny_run.copy_store(tmp_path / "store")
    overrides = [
        f"store.uri={store_dir}",
        INCONCLUSIVE_GATE,
        "benchmark.sample_sizes=[8]",
        "refine.max_rounds=3",
        "gates_on_inconclusive=pass",
        "elo.judge=token_f1",
    ]
    summary = finetune(config_path="configs/tiny.yaml", overrides=overrides)
    assert summary["passed"] and len(summary["rounds"]) == 1, "a passing first round must not loop"
    forgetting = summary["verdicts"][1]
    assert forgetting["verdict"] == "inconclusive" and forgetting["decided_by"] == "gates_on_inconclusive"
    assert forgetting["low"] < 0.0 < forgetting["high"] and forgetting["n"] == 8
    [gate_uri] = [entry["uri"] for entry in summary["stages"] if entry["stage"].startswith("gate")]
    report = (store_dir / gate_uri / "report.md").read_text()
    assert "judged by token_f1" in report, "the configured judge reaches the gate stage"
    assert "(gates_on_inconclusive)" in report and (store_dir / gate_uri / "intervals.png").is_file()
    pointer = json.loads(open_store(StoreSettings(uri=str(store_dir))).get_bytes(LATEST_PASSING))
    assert pointer["model_uri"] == summary["model_uri"] and pointer["round"] == 1
    assert (store_dir / pointer["model_uri"] / "model.safetensors").is_file()
    store = open_store(StoreSettings(uri=str(store_dir)))
    assert find_model("latest-passing", store).endswith(
        pointer["model_uri"]
    )  # what `finetune ask latest-passing` loads


GROWING_PROBE_GATE = "gates=[{metric: eval.false_refusal_rate, op: '<=', value: 0.5}]"
"""The tiny config asks 2 on-topic probes at look 1. With 3 looks each look's Wilson interval is at 98.3%: on 2
probes it runs from 0 to 0.74 (none declined) or from 0.26 to 1 (both), on 4 from 0 to 0.59 or 0.41 to 1, so
0.5 is inside whatever the model answers: looks 2 and 3 must draw more probes."""


def test_an_inconclusive_probe_gate_draws_more_probes_and_reuses_the_earlier_ones(tiny_run, tmp_path):
    # On a copy of the session's tiny run's store: data, model, evaluations and the first ARC slice are Cached.
    store_dir = tiny_run.copy_store(tmp_path / "store")
    overrides = [f"store.uri={store_dir}", GROWING_PROBE_GATE, "benchmark.sample_sizes=[8, 16, 24]"]
    summary = _summary(finetune(config_path="configs/tiny.yaml", overrides=overrides, return_state=True))
    stages = [entry["stage"] for entry in summary["stages"]]
    # No ARC questions are added (no benchmark gate asked), no data changes: only probes, then a new look.
    assert stages[stages.index("evaluate (fine-tuned)") + 1 :] == [
        "benchmark (base, arc_easy 0-8)",
        "benchmark (fine-tuned, arc_easy 0-8)",
        "gate (look 1)",
        "probe (fine-tuned, look 2)",
        "gate (look 2)",
        "probe (fine-tuned, look 3)",
        "gate (look 3)",
    ]
    entries = {entry["stage"]: entry for entry in summary["stages"]}
    looks = [entries[f"gate (look {k})"]["meta"] for k in (1, 2, 3)]
    assert [look["status"] for look in looks[:2]] == ["grow", "grow"] and looks[0]["grow"] == ["probes"]
    assert [look["verdicts"][0]["n"] for look in looks] == [2, 4, 8], "each look doubles the on-topic probes"
    assert looks[2]["verdicts"][0]["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert entries["evaluate (fine-tuned)"]["state"] == "Cached"
    # Each probe stage answers only its new probes: 2 more on-topic ones at look 2, 4 at look 3, none asked twice.
    probe_entries = [entries[f"probe (fine-tuned, look {k})"] for k in (2, 3)]
    assert [e["meta"]["on_topic"]["n"] for e in probe_entries] == [2, 4]
    asked = [
        row["question"]
        for uri in (entries["evaluate (fine-tuned)"]["uri"], *(e["uri"] for e in probe_entries))
        for row in pq.read_table(store_dir / uri / "probes.parquet").to_pylist()
    ]
    assert len(asked) == len(set(asked))
    # A rerun takes every probe answer from the store.
    again = _summary(finetune(config_path="configs/tiny.yaml", overrides=overrides, return_state=True))
    states = {e["stage"]: e["state"] for e in again["stages"]}
    assert states["probe (fine-tuned, look 2)"] == states["probe (fine-tuned, look 3)"] == "Cached", states
