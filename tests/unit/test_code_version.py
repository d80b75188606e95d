"""A stage's content key covers its code: editing a stage reruns it and what depends on it, nothing else.

Cheap and in-process: the keys of the flow's stage graph are computed the way the tasks compute them
(`content_key(stage, code version, inputs)`, each input Ref's sha256 standing for its manifest, which
records the artifact's uri and so its key) over copies of the repository's code, one of them edited.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from pipeline.code_version import code_files, code_version, package_files
from pipeline.refs import Ref, content_key

ROOT = Path(__file__).resolve().parents[2]

# The flow's stage graph (flows/finetune.py): stage label -> (stage module, the labels of its input Refs).
GRAPH: dict[str, tuple[str, tuple[str, ...]]] = {
    "collect": ("collect", ()),
    "template": ("template", ("collect",)),
    "tokenize": ("tokenize", ("template",)),
    "validate": ("validate", ("collect", "tokenize")),
    "split": ("split", ("tokenize",)),
    "train": ("train", ("split",)),
    "evaluate (base)": ("evaluate", ("split",)),
    "evaluate (fine-tuned)": ("evaluate", ("split", "train")),
    "benchmark (base)": ("benchmark", ()),
    "benchmark (fine-tuned)": ("benchmark", ("train",)),
    "gate": ("gate", ("evaluate (base)", "evaluate (fine-tuned)", "benchmark (base)", "benchmark (fine-tuned)")),
    "refine": ("refine", ("gate",)),
}


def stage_file(root: Path, module: str) -> Path:
    """The file a stage's body is defined in: `tasks/<module>.py`, or `tasks/<module>/stage.py` for a package."""
    package = root / "tasks" / module
    return package / "stage.py" if package.is_dir() else root / "tasks" / f"{module}.py"


def chain_keys(root: Path) -> dict[str, str]:
    """Every stage's content key for the code under `root`, inputs chained as the flow chains them."""
    keys: dict[str, str] = {}
    refs: dict[str, Ref] = {}
    for label, (module, inputs) in GRAPH.items():
        version = code_version(stage_file(root, module), root)
        key = content_key(module, version, {**{name: refs[name] for name in inputs}, "config": {"label": label}})
        uri = f"{module}/{key}"
        # A manifest names its uri, so a new key always gives a new sha256 to the stages that read it.
        refs[label] = Ref(kind=module, uri=uri, sha256=hashlib.sha256(uri.encode()).hexdigest())
        keys[label] = key
    return keys


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A copy of the repository's code folders."""
    root = tmp_path_factory.mktemp("original")
    for folder in ("pipeline", "tasks", "flows"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edited(original: Path, tmp_path: Path, *files: str) -> Path:
    """A copy of `original` with a line of code added to each of `files`."""
    root = tmp_path / "edited"
    shutil.copytree(original, root)
    for name in files:
        with (root / name).open("a", encoding="utf-8") as handle:
            handle.write("\nEDITED = True  # any change to the code counts\n")
    return root


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {label for label in before if before[label] != after[label]}


def test_editing_a_stage_reruns_it_and_what_depends_on_it(original: Path, tmp_path: Path):
    before, after = chain_keys(original), chain_keys(edited(original, tmp_path, "tasks/split.py"))
    assert changed(before, after) == {
        "split",
        "train",
        "evaluate (base)",
        "evaluate (fine-tuned)",
        "benchmark (fine-tuned)",
        "gate",
        "refine",
    }


def test_editing_a_shared_module_reruns_the_stages_that_import_it(original: Path, tmp_path: Path):
    before, after = chain_keys(original), chain_keys(edited(original, tmp_path, "pipeline/answers.py"))
    assert changed(before, after) == {"evaluate (base)", "evaluate (fine-tuned)", "gate", "refine"}


EVERYTHING_AFTER_COLLECT = set(GRAPH) - {"benchmark (base)"}


@pytest.mark.parametrize(
    "name",
    ["tasks/collect/readers.py", "tasks/collect/docs.py", "tasks/collect/stage.py", "tasks/collect/__init__.py"],
)
def test_editing_any_file_of_a_stage_package_reruns_that_stage(original: Path, tmp_path: Path, name: str):
    before, after = chain_keys(original), chain_keys(edited(original, tmp_path, name))
    assert changed(before, after) == EVERYTHING_AFTER_COLLECT


def test_editing_the_entry_point_of_the_training_process_reruns_train(original: Path, tmp_path: Path):
    # tasks/train/__main__.py is imported by nothing, but `python -m tasks.train` runs it.
    before, after = chain_keys(original), chain_keys(edited(original, tmp_path, "tasks/train/__main__.py"))
    assert changed(before, after) == {
        "train",
        "evaluate (fine-tuned)",
        "benchmark (fine-tuned)",
        "gate",
        "refine",
    }


def test_editing_modules_no_stage_imports_reruns_nothing(original: Path, tmp_path: Path):
    before = chain_keys(original)
    planner = [f"pipeline/planner/{p.name}" for p in sorted((original / "pipeline" / "planner").glob("*.py"))]
    after = chain_keys(edited(original, tmp_path, *planner, "flows/sweep.py", "flows/finetune.py"))
    assert changed(before, after) == set()


def test_the_code_files_follow_imports_transitively_and_relative_ones(tmp_path: Path):
    files = {
        "tasks/__init__.py": "",
        "tasks/stage.py": "import json\nfrom pipeline.helpers import f\n\ndef body():\n    from pipeline import lazy\n",
        "pipeline/__init__.py": "",
        "pipeline/helpers.py": "from .store import Store\n",
        "pipeline/lazy.py": "",
        "pipeline/store/__init__.py": "from .local import Store\n",
        "pipeline/store/local.py": "class Store: ...\n",
        "pipeline/unused.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = [p.relative_to(tmp_path).as_posix() for p in code_files(tmp_path / "tasks/stage.py", tmp_path)]
    assert found == sorted(set(files) - {"pipeline/unused.py"})


def test_a_stage_task_carries_its_code_version():
    from tasks.split import split

    assert split.version == code_version(ROOT / "tasks" / "split.py")
    assert len(split.version) == 16


def test_a_stage_package_counts_every_file_of_it_imported_or_not(tmp_path: Path):
    files = {
        "tasks/__init__.py": "",
        "tasks/split.py": "",
        "tasks/train/__init__.py": "from tasks.train.stage import train\n",
        "tasks/train/stage.py": "from .launch import run\n\ndef train():\n    run()\n",
        "tasks/train/launch.py": "from pipeline.helpers import f\n\ndef run(): ...\n",
        "tasks/train/__main__.py": "from pipeline.entry import main\n",
        "pipeline/__init__.py": "",
        "pipeline/helpers.py": "",
        "pipeline/entry.py": "",
        "pipeline/unused.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = [p.relative_to(tmp_path).as_posix() for p in code_files(tmp_path / "tasks/train/stage.py", tmp_path)]
    assert found == sorted(set(files) - {"pipeline/unused.py", "tasks/split.py"})
    assert package_files(tmp_path / "tasks/split.py", tmp_path) == []


def test_a_stage_defined_in_a_package_carries_the_code_version_of_its_package():
    from tasks.collect import collect

    assert collect.name == "collect"
    assert collect.version == code_version(ROOT / "tasks" / "collect" / "stage.py")
    files = set(code_files(ROOT / "tasks" / "collect" / "stage.py"))
    assert set((ROOT / "tasks" / "collect").glob("*.py")) <= files
