"""Every third-party module the code imports is declared in pyproject.toml.

A module that is only installed by chance (as a dependency of a dependency, or by hand on one machine)
breaks on the next machine or the next release of whatever pulled it in. So: walk every .py file of the
repository's code folders with `ast`, take the top-level module of every absolute import (including the
ones inside functions), drop the standard library and the project's own modules, map each module to the
distribution that installs it (`importlib.metadata.packages_distributions()`), and require that
distribution in pyproject: modules imported by the code that runs (pipeline/, tasks/, flows/, bench/,
deployments/) in `[project] dependencies`, modules imported only by tests/ there or in the `test` extra.

Packages the shipped configs name as data sources (`data.sources[].package`, imported by name at run time,
invisible to `ast`) must be runtime dependencies too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_FOLDERS = ("finetune", "pipeline", "tasks", "flows", "bench", "deployments")
TEST_FOLDERS = ("tests",)
TEST_EXTRA = "test"


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution name at the start of a PEP 508 requirement string ("torch==2.13.0" -> "torch")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"Cannot read a distribution name from the requirement {requirement!r}")
    return canonical(match.group(1))


def declared_distributions(pyproject: Mapping) -> tuple[set[str], set[str]]:
    """(runtime, test) canonical distribution names declared in a parsed pyproject.toml."""
    project = pyproject["project"]
    runtime = {requirement_name(r) for r in project.get("dependencies", [])}
    test = {requirement_name(r) for r in project.get("optional-dependencies", {}).get(TEST_EXTRA, [])}
    return runtime, test


def own_top_level_names(pyproject: Mapping) -> set[str]:
    """The project's own importable top-level names: its packages and the code folders themselves."""
    packages = pyproject.get("tool", {}).get("setuptools", {}).get("packages", [])
    return {name.split(".")[0] for name in packages} | set(RUNTIME_FOLDERS) | set(TEST_FOLDERS)


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file (module level or nested)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def is_sibling_module(name: str, path: Path) -> bool:
    """True when `name` is a module next to `path`, or next to a conftest.py above it: a script's folder (and,
    with pytest's default import mode, a test file's folder without __init__.py and every conftest.py's folder)
    comes first on sys.path, e.g. tests/reliability/exploits.py, tests/data_files.py."""
    folders = [path.parent, *(f for f in path.parents if (f / "conftest.py").is_file())]
    return any((f / f"{name}.py").is_file() or (f / name / "__init__.py").is_file() for f in folders)


def third_party_imports(folders: Iterable[str], own: set[str], root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the files (relative to `root`) that import it, for imports that are neither stdlib nor the project's."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for name in imported_modules(path):
                if name in sys.stdlib_module_names or name in own or is_sibling_module(name, path):
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(root)))
    return found


def undeclared(
    imports: Mapping[str, set[str]],
    declared: set[str],
    module_to_distributions: Mapping[str, list[str]],
    used: str = "imported in",
) -> list[str]:
    """One line per imported module none of whose distributions is in `declared` (canonical names)."""
    problems = []
    for module, files in sorted(imports.items()):
        distributions = module_to_distributions.get(module, [])
        where = ", ".join(sorted(files)[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        if not distributions:
            problems.append(f"{module!r} ({used} {where}) is not installed, so its distribution is unknown")
        elif not {canonical(d) for d in distributions} & declared:
            problems.append(
                f"{module!r} ({used} {where}) comes from {' or '.join(sorted(set(distributions)))}, "
                "which pyproject.toml does not declare"
            )
    return problems


def config_packages(config_dir: Path) -> dict[str, set[str]]:
    """package -> the shipped configs whose data sources import it by name."""
    found: dict[str, set[str]] = {}
    for path in sorted(config_dir.glob("*.yaml")):
        data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
        for source in data.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("package"), str):
                top = source["package"].split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(config_dir.parent)))
    return found


def constraint_pins(text: str) -> dict[str, str]:
    """{canonical distribution name: version} of a pip constraints file; raises ValueError naming the line for any
    line (besides comments and blank ones) that is not an exact `name==version` pin."""
    pins = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if match is None:
            raise ValueError(f"constraints.txt line {number}: expected name==version, found {line!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@pytest.fixture(scope="module")
def module_to_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def test_runtime_imports_are_runtime_dependencies(pyproject, module_to_distributions):
    runtime, _ = declared_distributions(pyproject)
    imports = third_party_imports(RUNTIME_FOLDERS, own_top_level_names(pyproject))
    assert imports, "found no third-party import at all: the walk is broken"
    problems = undeclared(imports, runtime, module_to_distributions)
    assert not problems, "Add these to [project] dependencies in pyproject.toml:\n" + "\n".join(problems)


def test_test_imports_are_declared(pyproject, module_to_distributions):
    runtime, test = declared_distributions(pyproject)
    imports = third_party_imports(TEST_FOLDERS, own_top_level_names(pyproject))
    problems = undeclared(imports, runtime | test, module_to_distributions)
    assert not problems, (
        f"Add these to [project.optional-dependencies] {TEST_EXTRA} (or dependencies) in pyproject.toml:\n"
        + "\n".join(problems)
    )


def test_packages_named_by_configs_are_runtime_dependencies(pyproject, module_to_distributions):
    runtime, _ = declared_distributions(pyproject)
    packages = config_packages(ROOT / "configs")
    problems = undeclared(packages, runtime, module_to_distributions, used="a data source in")
    assert not problems, "Add these to [project] dependencies in pyproject.toml:\n" + "\n".join(problems)


def test_the_check_fails_on_a_missing_declaration(pyproject, module_to_distributions):
    """The check can fail: drop one declared distribution that the code imports and it is named."""
    runtime, _ = declared_distributions(pyproject)
    imports = third_party_imports(RUNTIME_FOLDERS, own_top_level_names(pyproject))
    assert "yaml" in imports and canonical("PyYAML") in runtime
    before = set(undeclared(imports, runtime, module_to_distributions))
    after = set(undeclared(imports, runtime - {canonical("PyYAML")}, module_to_distributions))
    added = sorted(after - before)
    assert len(added) == 1 and added[0].startswith("'yaml' (imported in ") and "PyYAML" in added[0], added


def test_helpers_read_requirements_and_skip_local_modules(tmp_path):
    assert requirement_name("sentence-transformers>=3.0") == "sentence-transformers"
    assert requirement_name("Foo.Bar_baz[extra] ; python_version > '3'") == "foo-bar-baz"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "helper.py").write_text("X = 1\n")
    (tmp_path / "pkg" / "mod.py").write_text(
        "import os, json\nfrom . import x\nfrom helper import X\nimport not_a_real_dist_xyz.sub\n"
        "def f():\n    from another_missing_one import thing\n"
    )
    imports = third_party_imports(["pkg"], set(), root=tmp_path)
    assert set(imports) == {"not_a_real_dist_xyz", "another_missing_one"}
    assert len(undeclared(imports, set(), {})) == 2


def test_constraints_pin_every_declared_distribution_but_torch(pyproject):
    """`make install` takes its versions from constraints.txt: each package pyproject declares (runtime and test) is
    pinned there exactly, so a new declaration cannot slip in unpinned; torch is pinned by the Makefile and the
    Dockerfile instead (a CPU or a CUDA wheel of the same release)."""
    runtime, test = declared_distributions(pyproject)
    pins = constraint_pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    missing = sorted((runtime | test) - {"torch"} - set(pins))
    assert not missing, f"Not in constraints.txt (regenerate it with `make lock`): {missing}"
    assert "torch" not in pins and "finetune-pipeline" not in pins
    with pytest.raises(ValueError, match="line 2: expected name==version, found 'boto3>=1.34'"):
        constraint_pins("# header\nboto3>=1.34\n")
