"""The sweep flow on the tiny model, 2 data shares x 1 model: the data stages run once and come back Cached
at the second point, the table has one row per point with the rows seen growing, a point whose gates fail
does not stop the sweep, and the table and learning curve are committed in the store."""

import csv
import io
import itertools
import json

import pytest

from flows.sweep import COLUMNS, PLOT_FILE, TABLE_CSV, TABLE_JSON, grid_points, is_shared_stage, sweep, table_rows
from pipeline.config import ConfigError, load_config
from pipeline.store import StoreSettings, open_store
from tasks.train import nested_share

# Few test questions and probes: the sweep's cost is two whole flow runs.
CHEAP = [
    "eval.limit=8",
    "eval.probe_counts={general_knowledge: 1, near_domain: 1}",
    "eval.probe_questions=[]",
    "benchmark.sample_sizes=[4]",
]


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory):
    """Two points (50% and 100% of the train split) against a fresh store, with a gate no model passes."""
    store_dir = tmp_path_factory.mktemp("sweep-store")
    overrides = [f"store.uri={store_dir}", "sweep.fractions=[0.5, 1.0]", "gates.0.value=2.0", *CHEAP]
    return store_dir, sweep(config_path="configs/tiny.yaml", overrides=overrides)


@pytest.mark.flow
def test_one_row_per_point_with_more_rows_at_each(swept):
    _, summary = swept
    rows = summary["rows"]
    assert [r["fraction"] for r in rows] == [0.5, 1.0]
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["train_rows"] < rows[1]["train_rows"]
    assert rows[0]["train_rows"] == pytest.approx(rows[1]["train_rows"] / 2, abs=1)
    for row in rows:
        assert row["steps"] == load_config("configs/tiny.yaml").train.max_steps
        assert row["tokens_seen"] > 0 and row["wall_seconds"] > 0
        assert isinstance(row["eval_loss"], float) and isinstance(row["train_loss"], float)
        assert -1 <= row["similarity"] <= 1 and 0 <= row["exact_match"] <= 1
        assert isinstance(row["benchmark_delta"], float)
        # Error bars: the paired interval around the benchmark change, the bootstrap interval around similarity.
        assert row["benchmark_delta_low"] <= row["benchmark_delta"] <= row["benchmark_delta_high"], row
        assert row["benchmark_n"] == 4
        assert row["similarity_low"] <= row["similarity"] <= row["similarity_high"], row


@pytest.mark.flow
def test_a_failing_gate_does_not_stop_the_sweep(swept):
    _, summary = swept
    assert [r["state"] for r in summary["rows"]] == ["Gates failed", "Gates failed"]
    assert [r["passed"] for r in summary["rows"]] == [False, False]


@pytest.mark.flow
def test_shared_stages_are_cached_at_the_second_point(swept):
    _, summary = swept
    first, second = ({e["stage"]: e["state"] for e in p["stages"]} for p in summary["points"])
    shared = [stage for stage in first if is_shared_stage(stage)]
    assert len(shared) == 7 and "benchmark (base, arc_easy 0-4)" in shared, first
    assert all(first[stage] == "Completed" for stage in shared), first
    assert all(second[stage] == "Cached" for stage in shared), second
    assert first["train"] == second["train"] == "Completed"  # each share trains its own model
    assert summary["points"][0]["train_uri"] != summary["points"][1]["train_uri"]


@pytest.mark.flow
def test_table_and_plot_are_in_the_store(swept):
    store_dir, summary = swept
    store = open_store(StoreSettings(uri=str(store_dir)))
    assert store.has_artifact(summary["uri"])
    folder = store.fetch(store.open_ref(summary["uri"]))  # checks every file against the manifest
    assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((folder / TABLE_JSON).read_text())
    assert document["rows"] == summary["rows"] and document["metric"] == "eval.similarity_mean"
    table = list(csv.DictReader(io.StringIO((folder / TABLE_CSV).read_text())))
    assert [int(r["train_rows"]) for r in table] == [r["train_rows"] for r in summary["rows"]]


# --------------------------------------------------------------------------- no flow needed


def test_shares_are_nested():
    rows = list(range(101))
    shares = [nested_share(rows, fraction, seed=42) for fraction in (0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in shares] == [11, 26, 51, 101]
    assert all(set(small) <= set(large) for small, large in itertools.pairwise(shares))
    assert shares[0] == sorted(shares[0])  # the original order is kept
    assert nested_share(rows, 0.1, seed=43) != shares[0]


def test_grid_is_every_combination_with_config_values_for_empty_lists():
    config = load_config(
        "configs/tiny.yaml",
        ["sweep.fractions=[1.0, 0.5]", "sweep.methods=[full, lora]", "sweep.learning_rates=[0.001, 0.0001]"],
    )
    points = grid_points(config)
    assert len(points) == 2 * 2 * 2
    assert {p.model for p in points} == {"tiny-neox"}
    assert [p.fraction for p in points[:2]] == [0.5, 1.0]  # each line of the curve in order
    assert "train.train_fraction=0.5" in points[0].overrides()


def test_table_rounds_to_significant_digits():
    row = table_rows([dict.fromkeys(COLUMNS) | {"learning_rate": 5e-05, "similarity": 0.123456, "train_rows": 65}])[0]
    assert (row["learning_rate"], row["similarity"], row["train_rows"]) == (5e-05, 0.1235, 65)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sweep.fractions=[0.5, 1.5]", "sweep.fractions: expected fractions in (0, 1], found [1.5]"),
        ("sweep.metric=eval.nope", "sweep.metric: expected eval.<"),
        ("sweep.metric=benchmark.piqa.acc", "names task 'piqa', expected one of benchmark.tasks"),
        ("sweep.learning_rates=[0]", "sweep.learning_rates: expected learning rates above 0, found [0.0]"),
    ],
)
def test_bad_sweep_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", [override])
    assert message in str(error.value)
