"""A Prefect test harness (temporary API and database) shared by the flow tests: it takes 10-20 s to start."""

import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """Run flows against a throwaway Prefect server whose home is a temporary folder."""
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ["PREFECT_HOME"] = home
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
