"""Settings every test shares: no hub access (nothing from it loads here), no stray parallelism,
a Prefect test harness (temporary API and database) started once, only for tests that ask for it
(it takes 10-20 s to start), and one run of the tiny config shared by the tests that read it.

`tiny_run` is the session's run of configs/tiny.yaml on a fresh local store: a whole flow run costs tens of
seconds on 2 cores, so tests that assert on the same run read this one instead of making their own, and a test
that needs to run the flow again on top of it (a rerun, a changed stage) works on `tiny_run.copy_store(...)`,
where every stage the change does not touch comes back Cached. `tiny_stages` are the stage labels of one
round of that config, in order.

On pytest-xdist workers (`make test` runs `-n 2 --dist loadgroup`) each test module is one group, run whole
on one worker (its module fixtures are built once), and the modules that read one of the session's shared runs
(SHARED_RUNS) are one group, so the run is made once, not once per worker.
"""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from prefect_database import seed_database

# Relative to the repository root, where the tests run, as every flow test names it (a model card records it).
TINY_CONFIG = "configs/tiny.yaml"
# The stages of one round of configs/tiny.yaml, as the flow's summary labels them (flows/finetune.py): one look
# of the benchmark's first sample size (8 questions), and a gate every model passes.
TINY_STAGES = (
    "collect",
    "template",
    "tokenize",
    "validate",
    "split",
    "train",
    "evaluate (base)",
    "evaluate (fine-tuned)",
    "benchmark (base, arc_easy 0-8)",
    "benchmark (fine-tuned, arc_easy 0-8)",
    "gate (look 1)",
)

HARNESS_DATABASE = "prefect-test.db"
"""The file name prefect_test_harness gives its server's database, in the folder it makes."""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No terminal reads the tests' output: Prefect's console handler need not run rich's highlighter over every line.
os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # set by pytest-xdist in each worker, before this file is imported
    # The workers share the cores, so torch in each (and in the processes it starts) gets its share, not all of
    # them. With all of them each, 2 workers on 2 cores ran up to 4 busy torch threads: 780 to 840 CPU s and 7:21
    # to 8:06 for the suite, against 720 to 740 CPU s and 7:05 to 7:12 with one thread each (4 and 2 runs here).
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """Run flows against a throwaway Prefect server whose home is a temporary folder.

    Prefect's harness puts the server's SQLite database in a new temporary folder; that folder is given a copy of
    the session's migrated database first (tests/prefect_database.py), so the server starts without migrating.
    """
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ["PREFECT_HOME"] = home
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing import utilities

    database_folder = Path(tempfile.mkdtemp(prefix="prefect-harness-db-"))
    seed_database(tmp_path_factory, database_folder / HARNESS_DATABASE)
    # The harness names its folder with tempfile.mkdtemp (prefect.testing.utilities); patch.object fails loudly
    # should that name go, and the check below tells whether the server opened the seeded file. The harness's
    # server can take minutes to answer on 2 busy cores; a session fixture that fails once errors every flow
    # test, so wait long rather than flake.
    with (
        mock.patch.object(utilities, "mkdtemp", lambda: str(database_folder)),
        utilities.prefect_test_harness(server_startup_timeout=300),
    ):
        used = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        assert used.endswith(str(database_folder / HARNESS_DATABASE)), f"the harness's database moved: {used}"
        yield


@pytest.fixture(scope="session")
def tiny_stages() -> list[str]:
    """The stage labels of one round of configs/tiny.yaml, in the order the flow runs them."""
    return list(TINY_STAGES)


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A finished run of configs/tiny.yaml: its local store folder and the flow's summary. Read it, never write to it."""

    store: Path
    summary: dict[str, Any]

    def stage(self, label: str) -> dict[str, Any]:
        """The summary entry of the stage labelled `label` (state, uri, sha256, meta)."""
        return next(entry for entry in self.summary["stages"] if entry["stage"] == label)

    def copy_store(self, target: Path) -> Path:
        """The run's artifacts and Prefect's cache records, copied to `target` (which must not exist); out: target.

        What only a passing run leaves (the latest-passing pointer, the model card) is not copied, so a run on
        the copy promotes its model itself; every stage that run shares with this one comes back Cached.
        """

        def passing_only(folder: str, names: list[str]) -> set[str]:
            return {"pointers", "cards"} & set(names) if Path(folder) == self.store else set()

        shutil.copytree(self.store, target, ignore=passing_only)
        return target


@pytest.fixture(scope="session")
def tiny_run(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """configs/tiny.yaml run once for the session on a fresh local store (its gate passes)."""
    from flows.finetune import finetune

    store = tmp_path_factory.mktemp("tiny-run") / "store"
    summary = finetune(config_path=TINY_CONFIG, overrides=[f"store.uri={store}"])
    assert [entry["stage"] for entry in summary["stages"]] == list(TINY_STAGES), summary["stages"]
    assert summary["passed"] is True
    return TinyRun(store=store, summary=summary)


# Test tiers (registered in pyproject.toml, selected with -m): each folder's tests carry its tier's marker, whether
# or not the module sets a pytestmark. Markers a module sets itself (integration on a reliability test that needs
# a real server, say) stay as well.
TIER_BY_FOLDER = {"unit": "unit", "flows": "flow", "integration": "integration", "reliability": "reliability"}


# Session fixtures that each cost whole flow runs: every module that uses one (through any fixture) joins that
# fixture's xdist group, so with `--dist loadgroup` it is built on one worker only.
SHARED_RUNS = ("tiny_run", "concurrent_runs")


def unit_tier_last(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items with the unit tier's moved to the end, the order otherwise kept.

    Under xdist (`make test` passes --no-loadscope-reorder), the workers take the groups in this order. The unit
    modules, seconds each, then fill the end of the run on whichever worker frees first. xdist's own order, by
    number of tests, put the few-test modules that run whole flows (test_secrets, test_placement) last, where one
    worker ran on alone for half a minute.
    """
    return sorted(items, key=lambda item: item.get_closest_marker("unit") is not None)


def xdist_groups(items: list[pytest.Item]) -> dict[Path, str]:
    """{test module: its xdist group}: the name of the shared run (SHARED_RUNS) the module uses, else its own path.

    A module that uses two shared runs puts both in one group (named after the first in SHARED_RUNS), with every
    other module that uses either, so neither run is built twice.
    """
    uses: dict[Path, set[str]] = {}
    names: dict[Path, str] = {}
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        uses.setdefault(item.path, set()).update(run for run in SHARED_RUNS if run in fixtures)
        names.setdefault(item.path, item.nodeid.split("::", 1)[0])
    joined = {run: run for run in SHARED_RUNS}  # each shared run's group, once modules have joined some

    def group_of(run: str) -> str:
        while joined[run] != run:
            run = joined[run]
        return run

    for runs in uses.values():
        roots = sorted({group_of(run) for run in runs}, key=SHARED_RUNS.index)
        for root in roots[1:]:
            joined[root] = roots[0]
    return {
        module: group_of(min(runs, key=SHARED_RUNS.index)) if runs else names[module] for module, runs in uses.items()
    }


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m, and before xdist reads xdist_group
def pytest_collection_modifyitems(config, items):
    """Add the tier marker of the tests/ folder each collected test lives in, and its xdist group (xdist_groups);
    when distributing over xdist workers, run the unit tier last (unit_tier_last)."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        tier = TIER_BY_FOLDER.get(folder)
        if tier is not None and item.get_closest_marker(tier) is None:
            item.add_marker(tier)
    if config.pluginmanager.hasplugin("xdist"):
        groups = xdist_groups(items)
        for item in items:
            if item.get_closest_marker("xdist_group") is None:
                item.add_marker(pytest.mark.xdist_group(groups[item.path]))
        if hasattr(config, "workerinput"):  # an xdist worker: the controller schedules in this collection's order
            items[:] = unit_tier_last(items)
