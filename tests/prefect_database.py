"""A migrated Prefect database for the tests' Prefect servers, made once per test session and copied for each.

A Prefect server on a new SQLite database first runs every migration of its schema: about 7 of the 13 CPU seconds
it takes to start on these 2 cores. The suite starts several (the harness on each pytest-xdist worker, and the
integration modules' own servers), so the migrations run once, by `prefect server database upgrade`, into a
template file, and each server starts on a copy of it: one with every migration applied, so it has none to run.
The pytest-xdist workers of one session share the template (made under a file lock).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

TEMPLATE_NAME = "prefect-template.db"


def _session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the whole test session shares: the workers' common parent under pytest-xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's template database, with every migration of the installed Prefect applied (made on first use)."""
    folder = _session_folder(tmp_path_factory)
    template = folder / TEMPLATE_NAME
    with FileLock(str(folder / f"{TEMPLATE_NAME}.lock")):
        if not template.is_file():
            building = folder / f"building-{TEMPLATE_NAME}"
            building.unlink(missing_ok=True)
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
            env["PREFECT_HOME"] = str(folder / "prefect-template-home")
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{building}"
            done = subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.fail(f"could not migrate a template Prefect database:\n{done.stdout}\n{done.stderr}")
            # The upgrade's last connection closed: SQLite folded its write-ahead log into the file.
            building.rename(template)
    return template


def seed_database(tmp_path_factory: pytest.TempPathFactory, target: Path) -> Path:
    """Copy the session's migrated template to `target` (a database file a server will open); out: target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_template(tmp_path_factory), target)
    return target
