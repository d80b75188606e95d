"""The deployments against a REAL Prefect server: a served `adhoc` run triggered over the REST API, and
`deployments/prefect.yaml` registered with the `prefect deploy` CLI.

One `prefect server start` per module (its own PREFECT_HOME, SQLite database and port, in a temp
folder). The run test serves `adhoc` as `deployments/serve.py` defines it, from a child process
started in the repository root (so `configs/tiny.yaml` resolves), creates a flow run with
`POST /api/deployments/{id}/create_flow_run`, and polls `GET /api/flow_runs/{id}` until it ends.
Every process is started in its own session and its whole group is killed if it does not stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = REPO_ROOT / "deployments" / "serve.py"
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"

# Generous: 2 cores, possibly shared with other jobs. Measured unloaded: server ~18 s, serve
# registration ~15 s (importing the flow pulls in torch and transformers), tiny run ~60 s.
SERVER_STARTUP_TIMEOUT_S = 180.0
SERVE_STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 480.0
CLI_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# Serves only `adhoc`, built by the shipped deployments/serve.py (serving `nightly` too would let
# a test that happens to run at 02:00 UTC start a full default-config run).
SERVE_ADHOC = f"""
import runpy
from prefect import serve
deployments = runpy.run_path({str(SERVE_SCRIPT)!r})["build_deployments"]()
serve(*[d for d in deployments if d.name == "adhoc"])
"""


@dataclasses.dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server: its API URL, its PREFECT_HOME and where its output goes."""

    api_url: str
    home: Path
    log_path: Path

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a client process: this server, no Prefect settings inherited from ours."""
        return _clean_env(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url, **extra)


def _clean_env(**settings: str) -> dict[str, str]:
    """os.environ without PREFECT_* (a test harness may have set some), plus `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    env.update(settings)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `command` in the repository root, in a new session (so its children can be killed with it)."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
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


def _wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen, log_path: Path):
    """Poll `check()` until it returns something truthy; fail with the log tail on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}; output tail:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s; output tail:\n{_tail(log_path)}")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port of 127.0.0.1, home and database in a temp folder."""
    base = tmp_path_factory.mktemp("prefect-server")
    home = base / "home"
    home.mkdir()
    port = _free_port()
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, log_path=base / "server.log")
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    started = time.monotonic()
    proc = _start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        server.log_path,
    )
    try:
        _wait_for(
            "Prefect server health",
            lambda: httpx.get(f"{server.api_url}/health", timeout=5).json() is True,
            SERVER_STARTUP_TIMEOUT_S,
            proc,
            server.log_path,
        )
        print(f"\nPrefect server up at {server.api_url} in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def served_adhoc(prefect_server: PrefectServer, tmp_path: Path) -> Iterator[dict]:
    """The `adhoc` deployment served from a child process; yields the deployment as the API returns it."""
    log_path = tmp_path / "serve.log"
    env = prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="2")  # pick the run up within 2 s, not 10
    started = time.monotonic()
    proc = _start([sys.executable, "-c", SERVE_ADHOC], env, log_path)

    def registered():
        response = httpx.get(f"{prefect_server.api_url}/deployments/name/finetune/adhoc", timeout=10)
        return response.json() if response.status_code == 200 else None

    try:
        deployment = _wait_for("serving finetune/adhoc", registered, SERVE_STARTUP_TIMEOUT_S, proc, log_path)
        print(f"finetune/adhoc served in {time.monotonic() - started:.1f} s")
        yield {**deployment, "_log_path": log_path, "_proc": proc}
    finally:
        # SIGTERM, not SIGINT: the runner handles both, but SIGINT is ignored by processes started from a
        # non-interactive shell's background job (and so by their children), which would cost the whole timeout.
        _stop(proc)


def _flow_run_logs(api_url: str, flow_run_id: str, limit: int = 80) -> str:
    """The flow run's last log lines from the API, for a failure message."""
    try:
        response = httpx.post(
            f"{api_url}/logs/filter",
            timeout=10,
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": limit},
        )
        return "\n".join(f"{log['level']:>2} {log['message']}" for log in reversed(response.json()))
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return f"(logs unavailable: {error!r})"


def test_adhoc_run_triggered_over_rest_completes(prefect_server: PrefectServer, served_adhoc: dict, tmp_path: Path):
    api = prefect_server.api_url
    store_dir = tmp_path / "store"
    parameters = {"config_path": "configs/tiny.yaml", "overrides": [f"store.uri={store_dir}", "train.max_steps=2"]}

    # The deployment's id by name, as a curl user would find it.
    deployment = httpx.get(f"{api}/deployments/name/finetune/adhoc", timeout=10).raise_for_status().json()
    assert deployment["id"] == served_adhoc["id"]
    assert deployment["entrypoint"] == "flows/finetune.py:finetune"

    started = time.monotonic()
    created = (
        httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=30, json={"parameters": parameters})
        .raise_for_status()
        .json()
    )
    flow_run_id = created["id"]

    proc, serve_log = served_adhoc["_proc"], served_adhoc["_log_path"]
    deadline = started + RUN_TIMEOUT_S
    while True:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).raise_for_status().json()
        state = flow_run["state_type"]
        if state in FINAL_STATES:
            break
        if proc.poll() is not None:
            pytest.fail(
                f"the serving process exited with {proc.returncode} while the run was {state}; "
                f"output tail:\n{_tail(serve_log)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {state} after {RUN_TIMEOUT_S:.0f} s; serve output tail:\n{_tail(serve_log)}")
        time.sleep(2.0)
    print(f"flow run {flow_run['name']} {state} {time.monotonic() - started:.1f} s after it was created")

    assert state == "COMPLETED", (
        f"flow run ended {state}: {flow_run['state'].get('message')}\n"
        f"--- flow run logs ---\n{_flow_run_logs(api, flow_run_id)}\n--- serve output ---\n{_tail(serve_log)}"
    )
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["parameters"] == parameters
    assert flow_run["parameters"]["overrides"] == [f"store.uri={store_dir}", "train.max_steps=2"]

    # The gate's committed output (one per round of the gate loop): a folder holding its manifest.
    gate_dir = store_dir / "gate"
    gate_outputs = sorted(path for path in gate_dir.iterdir() if path.is_dir()) if gate_dir.is_dir() else []
    found = sorted(path.name for path in store_dir.iterdir()) if store_dir.is_dir() else "no store folder"
    assert gate_outputs, f"no gate artifact in {store_dir}: {found}"
    for output in gate_outputs:
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["files"], f"{output}/manifest.json lists no files"


def test_prefect_yaml_registers_both_deployments(prefect_server: PrefectServer, tmp_path: Path):
    """`make worker`'s registration: create the process pool, `prefect deploy --all` from the yaml."""
    env = prefect_server.env()
    env.pop("FINETUNE_REPO", None)  # the pull step must keep its placeholder for the worker to fill in
    commands = [
        [sys.executable, "-m", "prefect", "work-pool", "create", "finetune-pool", "--type", "process"],
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(PREFECT_FILE.relative_to(REPO_ROOT)),
        ],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        assert done.returncode == 0, f"{' '.join(command[2:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    api = prefect_server.api_url
    nightly = httpx.get(f"{api}/deployments/name/finetune/nightly", timeout=10).raise_for_status().json()
    adhoc = httpx.get(f"{api}/deployments/name/finetune/adhoc", timeout=10).raise_for_status().json()
    for deployment in (nightly, adhoc):
        assert deployment["entrypoint"] == "flows/finetune.py:finetune"
        assert deployment["work_pool_name"] == "finetune-pool"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FINETUNE_REPO }}"}}
        ]
        assert set(deployment["parameter_openapi_schema"]["properties"]) == {"config_path", "overrides"}
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in nightly["schedules"]] == [
        ("0 2 * * *", "UTC", True)
    ]
    assert nightly["parameters"] == {"config_path": "configs/default.yaml", "overrides": []}
    assert adhoc["schedules"] == []
    pool = httpx.get(f"{api}/work_pools/finetune-pool", timeout=10).raise_for_status().json()
    assert pool["type"] == "process"
