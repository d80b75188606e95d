"""The local lm-eval task files: same prompt and metrics as lm-eval's ARC, local data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tasks.benchmark import (
    LOCAL_TASKS,
    format_benchmark_table,
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


def test_table_has_one_row_per_task_and_metric_with_delta():
    def result(acc, acc_norm):
        return {
            "tasks": {
                "arc_easy": {"acc": acc, "acc_stderr": 0.05, "acc_norm": acc_norm, "acc_norm_stderr": 0.05}
            }
        }

    table = format_benchmark_table(result(0.5, 0.4), result(0.52, 0.38))
    lines = table.strip().splitlines()
    assert lines[0] == "| task | metric | base | fine-tuned | delta |"
    assert len(lines) == 4
    assert lines[2].startswith("| arc_easy | acc | 0.500")
    assert lines[2].endswith("| +0.020 |")
    assert lines[3].endswith("| -0.020 |")
