"""Settings every test shares: no hub access (nothing from it loads here), no stray parallelism,
and a Prefect test harness (temporary API and database) started once, only for tests that ask for it
(it takes 10-20 s to start)."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """Run flows against a throwaway Prefect server whose home is a temporary folder."""
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ["PREFECT_HOME"] = home
    from prefect.testing.utilities import prefect_test_harness

    # The harness's server can take minutes to answer on 2 busy cores; a session fixture that fails
    # once errors every flow test, so wait long rather than flake.
    with prefect_test_harness(server_startup_timeout=300):
        yield


# Test tiers (registered in pyproject.toml, selected with -m): each folder's tests carry its tier's marker, whether
# or not the module sets a pytestmark. Markers a module sets itself (integration on a reliability test that needs
# a real server, say) stay as well.
TIER_BY_FOLDER = {"unit": "unit", "flows": "flow", "integration": "integration", "reliability": "reliability"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    """Add the tier marker of the tests/ folder each collected test lives in."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        tier = TIER_BY_FOLDER.get(folder)
        if tier is not None and item.get_closest_marker(tier) is None:
            item.add_marker(tier)
