"""The test tiers: `make test` (pytest's testpaths, fast tier first) collects every folder of tests/ that holds
tests, and each such folder has its tier marker (tests/conftest.py), so a new folder cannot silently drop out."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _test_folders() -> set[str]:
    return {path.parent.relative_to(TESTS).parts[0] for path in TESTS.glob("*/**/test_*.py")}


def test_testpaths_name_every_test_folder_unit_first():
    options = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    testpaths = options["testpaths"]
    assert testpaths[0] == "tests/unit", testpaths
    assert {Path(path).name for path in testpaths} >= _test_folders(), testpaths


def _root_conftest() -> ModuleType:
    """tests/conftest.py as a module (pytest loads it as a plugin, not under an importable name)."""
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", TESTS / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest


def test_every_test_folder_has_a_registered_tier_marker():
    conftest = _root_conftest()
    options = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {marker.split(":")[0] for marker in options["markers"]}
    assert set(conftest.TIER_BY_FOLDER) >= _test_folders()
    assert set(conftest.TIER_BY_FOLDER.values()) <= registered


def test_modules_sharing_a_session_run_are_one_xdist_group():
    """`make test` runs on xdist workers with --dist loadgroup: a shared run must be built on one worker only."""
    conftest = _root_conftest()

    def item(module: str, *fixtures: str) -> SimpleNamespace:
        return SimpleNamespace(path=Path(module), nodeid=f"{module}::test_x", fixturenames=["tmp_path", *fixtures])

    groups = conftest.xdist_groups(
        [
            item("a.py", "tiny_run"),
            item("b.py"),
            item("b.py", "tiny_run"),  # one test of the module uses it: the whole module joins
            item("c.py", "concurrent_runs"),
            item("d.py"),
            item("e.py", "concurrent_runs"),
        ]
    )
    assert groups == {
        Path("a.py"): "tiny_run",
        Path("b.py"): "tiny_run",
        Path("c.py"): "concurrent_runs",
        Path("d.py"): "d.py",
        Path("e.py"): "concurrent_runs",
    }
    # A module that uses both runs puts them, and every module that uses either, in one group.
    joined = conftest.xdist_groups(
        [item("a.py", "tiny_run"), item("c.py", "concurrent_runs"), item("f.py", *conftest.SHARED_RUNS)]
    )
    assert set(joined.values()) == {"tiny_run"}


def test_xdist_loadgroup_keeps_a_group_on_one_worker(tmp_path: Path):
    """The installed pytest and pytest-xdist honour xdist_group: a release pair that ignores it (pytest 9.2 with
    xdist 3.8.0 did, silently) would build every shared run and module fixture on both workers."""
    pytest.importorskip("xdist")
    for name in ("a", "b"):
        tests = "\n".join(f"def test_{i}():\n    pass\n" for i in range(4))
        (tmp_path / f"test_{name}.py").write_text(
            f"import pytest\npytestmark = pytest.mark.xdist_group('{name}')\n{tests}"
        )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    workers: dict[str, set[str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("[gw") and "PASSED" in line:
            worker, nodeid = line.split()[0], line.split()[-1]
            workers.setdefault(nodeid.split("::")[0], set()).add(worker)
    assert set(workers) == {"test_a.py", "test_b.py"}, result.stdout
    assert all(len(found) == 1 for found in workers.values()), workers


def test_the_unit_tier_is_scheduled_last_in_the_order_otherwise_collected():
    """Under xdist the workers take the groups in collection order (`make test` turns xdist's reordering off), so the
    short unit modules must come last, to fill the end of the run on whichever worker frees first."""
    conftest = _root_conftest()

    def item(name: str, tier: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, get_closest_marker=lambda marker: marker if marker == tier else None)

    items = [item("u1", "unit"), item("f1", "flow"), item("u2", "unit"), item("i1", "integration"), item("r1", "x")]
    assert [i.name for i in conftest.unit_tier_last(items)] == ["f1", "i1", "r1", "u1", "u2"]


def test_make_test_keeps_the_collection_order_for_xdist():
    """xdist reorders groups by their number of tests unless told not to, which undoes unit_tier_last."""
    makefile = (TESTS.parent / "Makefile").read_text()
    workers = next(line for line in makefile.splitlines() if line.startswith("TEST_WORKERS ?="))
    assert "--dist loadgroup" in workers and "--no-loadscope-reorder" in workers, workers
