"""The local lm-eval task files (same prompt and metrics as lm-eval's ARC, local data), the seeded nested
question samples and their looks, and the per-question rows taken from lm-eval's logged samples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.config import BenchmarkConfig, ConfigError, load_config
from tasks.benchmark import (
    ITEM_SCHEMA,
    LOCAL_TASKS,
    BenchmarkSample,
    UnknownBenchmarkTask,
    benchmark_looks,
    item_rows,
    question_order,
    task_size,
    write_task_files,
)


def _row(i: int) -> dict:
    return {
        "id": f"q{i}",
        "question": f"Which number is {i}?",
        "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]},
        "answerKey": "A",
    }


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "arc"
    for folder in ("arc_easy", "arc_challenge"):
        (root / folder).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            lines = [json.dumps(_row(i)) for i in range(3)]
            (root / folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_task_files_keep_lm_eval_arc_prompt_and_point_at_local_data(data_dir, tmp_path):
    out = write_task_files(["arc_easy", "arc_challenge"], data_dir, tmp_path / "t", num_fewshot=0)

    assert out == tmp_path / "t"
    assert sorted(p.name for p in out.iterdir()) == ["arc_challenge.yaml", "arc_easy.yaml"]
    for name in ("arc_easy", "arc_challenge"):
        cfg = yaml.safe_load((out / f"{name}.yaml").read_text())
        assert cfg["task"] == name
        assert cfg["output_type"] == "multiple_choice"
        assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"
        assert cfg["doc_to_target"] == "{{choices.label.index(answerKey)}}"
        assert cfg["doc_to_choice"] == "{{choices.text}}"
        assert cfg["metric_list"] == [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ]
        assert cfg["dataset_path"] == "json"
        files = cfg["dataset_kwargs"]["data_files"]
        assert set(files) == {"train", "validation", "test"}
        for split, path in files.items():
            assert Path(path).is_absolute()
            assert Path(path) == (data_dir / LOCAL_TASKS[name].folder / f"{split}.jsonl").resolve()
        assert cfg["test_split"] == "test"
        assert cfg["fewshot_split"] == "train"
        assert cfg["num_fewshot"] == 0
        assert cfg["metadata"] == {"version": 1.0}


def test_task_files_match_the_installed_lm_eval_arc_task(data_dir, tmp_path):
    """Same prompt, target, choices and metrics as lm-eval's own arc_easy.yaml."""
    spec = importlib.util.find_spec("lm_eval")
    builtin_file = Path(spec.submodule_search_locations[0]) / "tasks" / "arc" / "arc_easy.yaml"
    builtin = yaml.safe_load(builtin_file.read_text())
    out = write_task_files(["arc_easy"], data_dir, tmp_path / "t", num_fewshot=0)
    ours = yaml.safe_load((out / "arc_easy.yaml").read_text())
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice",
                "metric_list", "test_split", "metadata"):  # fmt: skip
        assert ours[key] == builtin[key], key


def test_task_files_record_the_few_shot_count(data_dir, tmp_path):
    out = write_task_files(["arc_challenge"], data_dir, tmp_path / "t", num_fewshot=5)
    assert yaml.safe_load((out / "arc_challenge.yaml").read_text())["num_fewshot"] == 5


def test_missing_data_file_is_named(data_dir, tmp_path):
    (data_dir / "arc_easy" / "train.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        write_task_files(["arc_easy"], data_dir, tmp_path / "t", num_fewshot=0)


# --------------------------------------------------------------------------- the seeded nested samples


def test_question_order_is_a_seeded_permutation():
    order = question_order(2376, seed=0)
    assert sorted(order) == list(range(2376))
    assert order != list(range(2376)), "a random order, not the file's"
    assert question_order(2376, seed=0) == order, "the same seed gives the same order"
    assert question_order(2376, seed=1) != order
    assert question_order(2376, seed=1)[:200] != order[:200]
    assert question_order(0, seed=0) == [] and question_order(1, seed=5) == [0]


def test_sample_doc_ids_are_nested_slices_of_the_order():
    size, seed = 2376, 3

    def ids(start: int, end: int) -> list[int]:
        return BenchmarkSample(task="arc_easy", seed=seed, start=start, end=end).doc_ids(size)

    first, second, both = ids(0, 200), ids(200, 400), ids(0, 400)
    assert len(first) == len(second) == 200 and len(both) == 400
    assert set(first) <= set(both), "a larger look keeps the smaller look's questions"
    assert not set(first) & set(second) and set(first) | set(second) == set(both)
    assert set(first) == set(question_order(size, seed)[:200])
    # ascending: lm-eval maps the k-th document it scores (file order) back to doc_ids[k]
    assert first == sorted(first) and both == sorted(both)
    assert set(first) != set(range(200)), "not the first documents of the file (lm-eval's limit)"
    assert BenchmarkSample(task="arc_easy", seed=seed + 1, start=0, end=200).doc_ids(size) != first


def test_sample_bounds_are_checked():
    with pytest.raises(ValueError):
        BenchmarkSample(task="arc_easy", seed=0, start=-1, end=10)
    with pytest.raises(ValueError):
        BenchmarkSample(task="arc_easy", seed=0, start=0, end=0)


def _spans(looks: list[list[BenchmarkSample]]) -> list[list[tuple[str, int, int]]]:
    return [[(s.task, s.start, s.end) for s in look] for look in looks]


def test_default_looks_on_arc_easy_are_200_400_800_and_all():
    looks = benchmark_looks(BenchmarkConfig(), {"arc_easy": 2376})
    assert BenchmarkConfig().sample_sizes == [200, 400, 800, "all"]
    assert _spans(looks) == [
        [("arc_easy", 0, 200)],
        [("arc_easy", 200, 400)],
        [("arc_easy", 400, 800)],
        [("arc_easy", 800, 2376)],
    ]


def test_looks_carry_the_seed_and_scoring_settings():
    config = BenchmarkConfig(sample_seed=7, num_fewshot=2, batch_size=4, sample_sizes=[50, 100])
    looks = benchmark_looks(config, {"arc_easy": 2376})
    assert _spans(looks) == [[("arc_easy", 0, 50)], [("arc_easy", 50, 100)]], "without 'all' the split is not finished"
    assert all(s.seed == 7 and s.num_fewshot == 2 and s.batch_size == 4 for look in looks for s in look)


def test_sizes_beyond_a_small_task_are_cut_and_empty_looks_dropped():
    looks = benchmark_looks(BenchmarkConfig(), {"arc_easy": 300})
    assert _spans(looks) == [[("arc_easy", 0, 200)], [("arc_easy", 200, 300)]]
    assert _spans(benchmark_looks(BenchmarkConfig(sample_sizes=[200, 400]), {"arc_easy": 150})) == [
        [("arc_easy", 0, 150)]
    ]


def test_two_tasks_of_different_sizes_share_looks_until_the_smaller_one_is_done():
    config = BenchmarkConfig(tasks=["arc_easy", "arc_challenge"])
    looks = benchmark_looks(config, {"arc_easy": 2376, "arc_challenge": 300})
    assert _spans(looks) == [
        [("arc_easy", 0, 200), ("arc_challenge", 0, 200)],
        [("arc_easy", 200, 400), ("arc_challenge", 200, 300)],
        [("arc_easy", 400, 800)],
        [("arc_easy", 800, 2376)],
    ]
    for task, size in (("arc_easy", 2376), ("arc_challenge", 300)):
        slices = [s for look in looks for s in look if s.task == task]
        ids = [doc for s in slices for doc in s.doc_ids(size)]
        assert sorted(ids) == list(range(size)), f"{task}: the slices cover the split once"


@pytest.mark.parametrize("sizes", ["[400, 200]", "[200, 200]", "[200, all, 400]", "[all, all]", "[0, 200]"])
def test_sample_sizes_must_grow_and_end_in_all(sizes):
    with pytest.raises(ConfigError, match=r"benchmark\.sample_sizes: expected growing positive sizes"):
        load_config(None, [f"benchmark.sample_sizes={sizes}"])


def test_sample_sizes_accept_growing_sizes_and_all_alone():
    assert load_config(None, ["benchmark.sample_sizes=[100, 300, all]"]).benchmark.sample_sizes == [100, 300, "all"]
    assert load_config(None, ["benchmark.sample_sizes=[all]"]).benchmark.sample_sizes == ["all"]
    assert load_config(None, ["benchmark.sample_sizes=[50]"]).benchmark.sample_sizes == [50]


def test_task_size_counts_the_scored_split(data_dir):
    assert task_size("arc_easy", data_dir) == 3
    lines = [json.dumps(_row(i)) for i in range(5)]
    (data_dir / "arc_challenge" / "test.jsonl").write_text("\n".join(lines) + "\n\n")  # a trailing blank line
    assert task_size("arc_challenge", data_dir) == 5
    assert task_size("arc_easy", data_dir) == 3, "the test split, not train or validation"
    with pytest.raises(UnknownBenchmarkTask, match="mmlu"):
        task_size("mmlu", data_dir)
    (data_dir / "arc_easy" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        task_size("arc_easy", data_dir)


# --------------------------------------------------------------------------- per-question rows


def _sample(doc_id: int, doc: dict, target, acc: float, acc_norm: float, logliks: list[float]) -> dict:
    """One lm-eval logged sample of a multiple-choice task (the fields item_rows reads, plus some it ignores)."""
    return {
        "doc_id": doc_id,
        "doc": doc,
        "target": target,
        "arguments": [["ctx", f" {k}"] for k in range(len(logliks))],
        "resps": [[[ll, k == 0]] for k, ll in enumerate(logliks)],
        "acc": acc,
        "acc_norm": acc_norm,
        "filtered_resps": [(ll, k == 0) for k, ll in enumerate(logliks)],
        "filter": "none",
        "metrics": ["acc", "acc_norm"],
        "doc_hash": "x",
        "prompt_hash": "y",
        "target_hash": "z",
    }


def test_item_rows_turn_logged_samples_into_sorted_per_question_rows():
    samples = [
        _sample(812, {"id": "Mercury_7", "question": "Q?"}, 2, 1.0, 0.0, [-3.5, -2.0, -1.25]),
        _sample(3, {"question": "a doc without an id"}, 0, 0, 1, [-1.0, -4.5]),
        _sample(40, {"id": "NYSEDREGENTS_2015_4_1"}, "1", 1.0, 1.0, [-2.0, -0.5, -7.0, -9.0]),
        _sample(41, {"id": "x"}, "A", 0.0, 0.0, [-1.0, -1.5]),
    ]
    rows = item_rows(samples)
    assert [r["doc_id"] for r in rows] == [3, 40, 41, 812]
    assert rows[0] == {"doc_id": 3, "doc": "3", "gold": 0, "acc": 0.0, "acc_norm": 1.0, "loglikelihoods": [-1.0, -4.5]}
    assert rows[-1] == {
        "doc_id": 812,
        "doc": "Mercury_7",
        "gold": 2,
        "acc": 1.0,
        "acc_norm": 0.0,
        "loglikelihoods": [-3.5, -2.0, -1.25],
    }
    assert rows[1]["gold"] == 1 and rows[1]["doc"] == "NYSEDREGENTS_2015_4_1"
    assert rows[2]["gold"] == -1, "a target that is not a choice index"
    assert all(isinstance(r["acc"], float) and isinstance(r["acc_norm"], float) for r in rows)
    table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)  # what the stage writes to items.parquet
    assert table.num_rows == 4 and table.column("loglikelihoods").to_pylist()[3] == [-3.5, -2.0, -1.25]
    assert item_rows([]) == []
