"""Bad input to evaluation and benchmark (issue 5): each fails, or is counted, with a message naming the thing,
what was expected and what was found, before any model loads.

- an empty test split;
- a model folder without tokenizer files (evaluate and benchmark);
- a target answer that is empty (excluded and counted, not an error; the count in the stage's summary is
  asserted by test_evaluate.py::test_evaluate_model_scores_test_questions_and_probes);
- an lm-eval task name that does not exist (the message lists the local tasks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.assets import resolve_model
from pipeline.config import BENCHMARK_TASKS, ConfigError, EvalConfig, TemplateConfig, load_config
from pipeline.models import MissingTokenizerFiles, check_tokenizer_files
from pipeline.prompts import render_prompt
from tasks.benchmark import LOCAL_TASKS, UnknownBenchmarkTask, run_benchmark, write_task_files
from tasks.evaluate import EmptyTestSplit, evaluate_model, read_test_rows

TEMPLATE = TemplateConfig()
ANSWER = "Break an iterable into lists of length n."


def _write_split(folder: Path, targets: list[str | None], prompts: list[str] | None = None) -> Path:
    """A split folder whose test.parquet has one row per target (and train.parquet its first row)."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = (
        prompts
        if prompts is not None
        else [render_prompt(f"What does `f{i}` do?", TEMPLATE) for i in range(len(targets))]
    )
    table = pa.table(
        {
            "id": pa.array([f"id{i}" for i in range(len(targets))], pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "completion": pa.array(targets, pa.string()),
        }
    )
    pq.write_table(table, folder / "test.parquet")
    pq.write_table(table.slice(0, 1), folder / "train.parquet")
    return folder


def _weights_only_folder(tmp_path: Path) -> Path:
    """A model folder with config and weights but no tokenizer file."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(resolve_model("tiny-neox")) / name, folder)
    return folder


@pytest.fixture()
def arc_dir(tmp_path: Path) -> Path:
    """A tiny local ARC folder (3 rows per split), enough for task files."""
    row = {"id": "q0", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    root = tmp_path / "arc"
    for folder in ("arc_easy", "arc_challenge"):
        (root / folder).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            (root / folder / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    return root


# --------------------------------------------------------------------------- an empty test split


def test_an_empty_test_split_names_the_file_and_what_was_expected(tmp_path):
    split_dir = _write_split(tmp_path / "split", [])
    with pytest.raises(
        EmptyTestSplit, match=r"test.parquet has no rows \(expected at least one question.*found 0 rows"
    ):
        read_test_rows(split_dir / "test.parquet", None)
    with pytest.raises(
        EmptyTestSplit, match="has no rows"
    ):  # the stage core fails the same way, before loading a model
        evaluate_model("/nonexistent/model", split_dir, EvalConfig(probe_counts={}), TEMPLATE)


def test_a_split_of_only_unscorable_rows_says_why_each_was_dropped(tmp_path):
    split_dir = _write_split(tmp_path / "split", ["", "  ", ANSWER], prompts=[render_prompt("Q?", TEMPLATE)] * 2 + [""])
    with pytest.raises(EmptyTestSplit, match="none of the 3 rows.*2 have an empty target answer, 1 an empty prompt"):
        read_test_rows(split_dir / "test.parquet", None)


def test_a_test_split_without_the_expected_columns_names_them(tmp_path):
    (tmp_path / "split").mkdir()
    pq.write_table(pa.table({"id": ["a"], "question": ["Q?"], "answer": ["A."]}), tmp_path / "split" / "test.parquet")
    with pytest.raises(ValueError, match=r"missing \['prompt', 'completion'\], found \['id', 'question', 'answer'\]"):
        read_test_rows(tmp_path / "split" / "test.parquet", None)


# --------------------------------------------------------------------------- a model folder without tokenizer files


def test_a_model_folder_without_tokenizer_files_is_named_with_what_it_holds(tmp_path):
    folder = _weights_only_folder(tmp_path)
    with pytest.raises(
        MissingTokenizerFiles,
        match=rf"{folder} has no tokenizer files: expected one of tokenizer.json"
        r".*found \['config.json', 'model.safetensors'\]",
    ):
        check_tokenizer_files(str(folder))
    check_tokenizer_files(resolve_model("tiny-neox"))  # a complete folder passes
    check_tokenizer_files("someone/hub-model")  # not a local folder: left to from_pretrained


def test_evaluate_names_the_folder_without_tokenizer_before_loading_it(tmp_path):
    split_dir = _write_split(tmp_path / "split", [ANSWER])
    with pytest.raises(MissingTokenizerFiles, match="weights-only"):
        evaluate_model(str(_weights_only_folder(tmp_path)), split_dir, EvalConfig(probe_counts={}), TEMPLATE)


def test_benchmark_names_the_folder_without_tokenizer_before_lm_eval_runs(tmp_path, arc_dir):
    folder = _weights_only_folder(tmp_path)
    with pytest.raises(MissingTokenizerFiles, match=str(folder)):
        run_benchmark(str(folder), ["arc_easy"], limit=2, num_fewshot=0, batch_size=2, data_dir=arc_dir)


# --------------------------------------------------------------------------- empty target answers


def test_empty_target_answers_are_excluded_and_counted(tmp_path):
    split_dir = _write_split(tmp_path / "split", [ANSWER, "", "   ", ANSWER])
    rows, excluded = read_test_rows(split_dir / "test.parquet", None)
    assert [r["id"] for r in rows] == ["id0", "id3"]
    assert excluded == {"empty_target": 2, "no_prompt": 0}
    # A missing (null) target counts as empty too.
    nulls = _write_split(tmp_path / "nulls", [None, ANSWER])
    rows, excluded = read_test_rows(nulls / "test.parquet", None)
    assert [r["id"] for r in rows] == ["id1"] and excluded["empty_target"] == 1
    # A plain-text row (empty prompt) has nothing to ask: excluded and counted apart.
    text_rows = _write_split(tmp_path / "text", [ANSWER, ANSWER], prompts=["", render_prompt("Q?", TEMPLATE)])
    rows, excluded = read_test_rows(text_rows / "test.parquet", None)
    assert [r["id"] for r in rows] == ["id1"] and excluded == {"empty_target": 0, "no_prompt": 1}


# --------------------------------------------------------------------------- an lm-eval task that does not exist


def test_an_unknown_task_lists_the_local_tasks_before_anything_is_written(arc_dir, tmp_path):
    with pytest.raises(UnknownBenchmarkTask) as err:
        write_task_files(["arc_easy", "mmlu"], arc_dir, tmp_path / "t", num_fewshot=0)
    message = str(err.value)
    assert "unknown benchmark task(s) ['mmlu']" in message
    assert all(name in message for name in LOCAL_TASKS)
    assert not (tmp_path / "t").exists()


def test_an_unknown_task_fails_before_any_model_loads(arc_dir):
    with pytest.raises(
        UnknownBenchmarkTask, match=r"\['mmlu'\], expected one or more of \['arc_challenge', 'arc_easy'"
    ):
        run_benchmark("/nonexistent/model", ["mmlu"], limit=8, num_fewshot=0, batch_size=4, data_dir=arc_dir)


def test_an_unknown_task_in_the_config_is_refused_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['arc_hard'\]") as err:
        load_config(None, ["benchmark.tasks=[arc_easy, arc_hard]"])
    assert all(name in str(err.value) for name in BENCHMARK_TASKS)
