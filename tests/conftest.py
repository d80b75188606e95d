"""Settings every test shares: no hub access (nothing from it loads here), no stray parallelism,
and a Prefect test harness (temporary API and database) started once, only for tests that ask for it
(it takes 10-20 s to start)."""

import os
import tempfile

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

    with prefect_test_harness(server_startup_timeout=120):
        yield
