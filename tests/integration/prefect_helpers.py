"""A real Prefect server for integration tests: `prefect server start` on a free port of 127.0.0.1, its own
PREFECT_HOME and SQLite database in a temp folder, and the helpers that start, poll and stop processes against it.

`running_prefect_server` is the generator behind the `prefect_server` fixture (tests/integration/conftest.py).
Every process is started in its own session and its whole group is killed if it does not stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect_database import seed_database

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous: 2 cores, possibly shared with other jobs. Measured unloaded: server ~18 s.
SERVER_STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# How often the tests ask a server or process whether what they wait for happened: each wait ends within this of
# the event, and a local GET is nothing to the server.
POLL_S = 0.25
# The statuses Prefect's own client retries (prefect.client.base, with backoff): the server answers 503 when its
# SQLite database stays locked past the statement timeout on busy cores, having rolled the request back.
RETRIED_STATUSES = frozenset({408, 429, 502, 503})
API_ATTEMPTS = 6


@functools.cache
def http() -> httpx.Client:
    """The process's one HTTP client for calls to the test servers.

    `httpx.get` and friends make a client per call, and every client builds an SSL context from certifi's bundle:
    about 50 ms of CPU per request, a whole core-minute over the suite's polling. No connection is kept alive:
    a server that closes an idle one just as a request goes out would fail that request.
    """
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


@dataclasses.dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server: its API URL, its PREFECT_HOME and where its output goes."""

    api_url: str
    home: Path
    log_path: Path

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a client process: this server, no Prefect settings inherited from ours."""
        return clean_env(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url, **extra)


def clean_env(**settings: str) -> dict[str, str]:
    """os.environ without PREFECT_* (a test harness may have set some), plus `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_COLORS": "false",  # as tests/conftest.py: no terminal reads it
        }
    )
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `command` in the repository root, in a new session (so its children can be killed with it)."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process (server and runner shut down cleanly on it), then SIGKILL its whole process group."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=STOP_TIMEOUT_S)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    # children (uvicorn, flow-run processes) share the group even when the leader has exited
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=STOP_TIMEOUT_S)


def wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen, log_path: Path):
    """Poll `check()` every POLL_S until it returns something truthy; fail with the log tail on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}; output tail:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s; output tail:\n{tail(log_path)}")
        time.sleep(POLL_S)


def running_prefect_server(
    tmp_path_factory: pytest.TempPathFactory, startup_timeout_s: float = SERVER_STARTUP_TIMEOUT_S, **settings: str
) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port of 127.0.0.1, home and database (a migrated copy) in a temp folder;
    `settings` are extra PREFECT_* settings for the server process."""
    base = tmp_path_factory.mktemp("prefect-server")
    home = base / "home"
    home.mkdir()
    port = free_port()
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, log_path=base / "server.log")
    # SQLite waits up to 60 s for a lock (PRAGMA busy_timeout) but the driver gives up after the statement
    # timeout (10 s by default): on 2 busy cores, workers' heartbeats and runs' state changes then get
    # 503 "database is locked". A server for several workers should use PostgreSQL (deployments/README.md).
    # A copy of the session's migrated database (tests/prefect_database.py): the server has no migration to run.
    database = seed_database(tmp_path_factory, home / "prefect.db")
    settings = {
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
        **settings,
    }
    env = clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", **settings)
    started = time.monotonic()
    proc = start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        server.log_path,
    )
    try:
        wait_for(
            "Prefect server health",
            lambda: http().get(f"{server.api_url}/health", timeout=5).json() is True,
            startup_timeout_s,
            proc,
            server.log_path,
        )
        print(f"\nPrefect server up at {server.api_url} in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        stop(proc)


def call_api(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """The JSON answer of one REST call to a test server, sent again with backoff (1, 2, 4, 8, 8 s) while the
    server answers a status Prefect's client retries; any other error status raises httpx.HTTPStatusError."""
    for attempt in range(API_ATTEMPTS):
        response = http().request(method, url, json=body, timeout=timeout)
        if response.status_code not in RETRIED_STATUSES or attempt == API_ATTEMPTS - 1:
            break
        time.sleep(min(2.0**attempt, 8.0))
    return response.raise_for_status().json()


def flow_run_logs(api_url: str, flow_run_id: str, limit: int = 80) -> str:
    """The flow run's last log lines from the API, for a failure message."""
    try:
        response = http().post(
            f"{api_url}/logs/filter",
            timeout=10,
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": limit},
        )
        return "\n".join(f"{log['level']:>2} {log['message']}" for log in reversed(response.json()))
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return f"(logs unavailable: {error!r})"
