"""Imports only run downward: finetune (entry points) -> flows -> tasks (stages) -> pipeline (what stages share).

Every module's imports are read with `ast` (inside functions too; relative ones made absolute), so a lazy
import cannot hide an upward dependency. `pipeline/` imports neither `tasks/`, `flows/` nor `finetune/`; a
stage imports no other stage (what two stages share lives in `pipeline/`) and no flow or entry point; a flow
imports no entry point. A stage split into a package (`tasks/collect/`) is one stage: its modules import each
other freely.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.code_version import imported_names, module_name

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("pipeline", "tasks", "flows", "finetune")
"""Bottom to top: a layer may import the layers before it, never those after it."""


def project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The project modules (of LAYERS) a file's import statements name, as absolute dotted names."""
    names = imported_names(path.read_text(encoding="utf-8"), module_name(path, root), path.name == "__init__.py")
    return {name for name in names if name.split(".")[0] in LAYERS}


def layer_modules() -> list[Path]:
    """Every module of every layer."""
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def stage_of(name: str) -> str:
    """The stage a module of `tasks` belongs to: 'tasks.collect.readers' -> 'tasks.collect' ('tasks' for the package)."""
    return ".".join(name.split(".")[:2])


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with one module's imports, one line per offending import ([] when nothing is)."""
    own = module_name(path, root)
    layer = own.split(".")[0]
    problems = []
    for name in sorted(project_imports(path, root)):
        target = name.split(".")[0]
        if LAYERS.index(target) > LAYERS.index(layer):
            problems.append(f"{own} ({layer}/) imports {name} from the layer above ({target}/)")
        elif layer == target == "tasks" and own != "tasks" and stage_of(name) not in ("tasks", stage_of(own)):
            problems.append(f"{own} imports {name}: a stage never imports another stage (share it through pipeline/)")
    return problems


@pytest.mark.parametrize("path", layer_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_only_run_downward(path: Path):
    assert not violations(path)


def test_the_checker_sees_upward_and_sideways_imports(tmp_path: Path):
    fake = {
        "pipeline/planner.py": "def probe():\n    from tasks.train import fine_tune\n",  # a lazy import counts too
        "pipeline/store/__init__.py": "from ..config import StoreConfig\n",  # relative, inside the layer: fine
        "tasks/gate.py": "from tasks.evaluate import CATEGORIES\nfrom . import split\n",
        "tasks/split.py": "import flows.finetune\n",
        "flows/sweep.py": "from finetune.api import FineTuner\n",
        "finetune/cli.py": "from flows.finetune import finetune\nfrom tasks.evaluate import generate_answers\n",
        # A stage package's modules import each other (absolute or relative), never another stage's.
        "tasks/collect/stage.py": "from tasks.collect.readers import FORMATS\nfrom .mixing import read_source\n",
        "tasks/collect/docs.py": "from tasks.train.report import plot_loss\nfrom ..evaluate import probes\n",
    }
    for name, text in fake.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {name: violations(tmp_path / name, tmp_path) for name in fake}
    planner = found["pipeline/planner.py"]
    assert len(planner) == 2 and "imports tasks.train from the layer above" in planner[0]
    assert [line.split(" imports ")[1].split(":")[0] for line in found["tasks/gate.py"]] == [
        "tasks.evaluate",
        "tasks.evaluate.CATEGORIES",
        "tasks.split",
    ]
    assert found["tasks/split.py"] == ["tasks.split (tasks/) imports flows.finetune from the layer above (flows/)"]
    assert found["flows/sweep.py"][0].startswith("flows.sweep (flows/) imports finetune.api")
    assert found["pipeline/store/__init__.py"] == [] and found["finetune/cli.py"] == []
    assert found["tasks/collect/stage.py"] == []
    assert [line.split(" imports ")[1].split(":")[0] for line in found["tasks/collect/docs.py"]] == [
        "tasks.evaluate",
        "tasks.evaluate.probes",
        "tasks.train.report",
        "tasks.train.report.plot_loss",
    ]
