"""The deployments against a REAL Prefect server: a served `adhoc` run triggered over the REST API, and
`deployments/prefect.yaml` registered with the `prefect deploy` CLI.

One `prefect server start` per module (the `prefect_server` fixture, tests/integration/prefect_helpers.py).
The run test serves `adhoc` as `deployments/serve.py` defines it, from a child process started in the repository root (so `configs/tiny.yaml` resolves), creates a flow run with
`POST /api/deployments/{id}/create_flow_run`, and polls `GET /api/flow_runs/{id}` until it ends.
Every process is started in its own session and its whole group is killed if it does not stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect_helpers import (
    FINAL_STATES,
    POLL_S,
    PrefectServer,
    call_api,
    flow_run_logs,
    http,
    start,
    stop,
    tail,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = REPO_ROOT / "deployments" / "serve.py"
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"

# Generous: 2 cores, possibly shared with other jobs. Measured unloaded: serve registration ~15 s
# (importing the flow pulls in torch and transformers), a whole tiny run ~60 s (here only its gate runs). The
# server: prefect_helpers.py.
SERVE_STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 480.0
CLI_TIMEOUT_S = 240.0

# Serves only `adhoc`, built by the shipped deployments/serve.py (serving `nightly` too would let
# a test that happens to run at 02:00 UTC start a full default-config run).
SERVE_ADHOC = f"""
import runpy
from prefect import serve
deployments = runpy.run_path({str(SERVE_SCRIPT)!r})["build_deployments"]()
serve(*[d for d in deployments if d.name == "adhoc"])
"""


@pytest.fixture
def served_adhoc(prefect_server: PrefectServer, tmp_path: Path) -> Iterator[dict]:
    """The `adhoc` deployment served from a child process; yields the deployment as the API returns it."""
    log_path = tmp_path / "serve.log"
    env = prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="1")  # pick the run up within 1 s, not 10
    started = time.monotonic()
    proc = start([sys.executable, "-c", SERVE_ADHOC], env, log_path)

    def registered():
        response = http().get(f"{prefect_server.api_url}/deployments/name/finetune/adhoc", timeout=10)
        return response.json() if response.status_code == 200 else None

    try:
        deployment = wait_for("serving finetune/adhoc", registered, SERVE_STARTUP_TIMEOUT_S, proc, log_path)
        print(f"finetune/adhoc served in {time.monotonic() - started:.1f} s")
        yield {**deployment, "_log_path": log_path, "_proc": proc}
    finally:
        # SIGTERM, not SIGINT: the runner handles both, but SIGINT is ignored by processes started from a
        # non-interactive shell's background job (and so by their children), which would cost the whole timeout.
        stop(proc)


# A gate the tiny model passes (its similarity is far above -0.99), different from the tiny config's: on a copy of
# the session's tiny run's store, only the gate stage runs, and what it commits shows the run did the work.
NEW_GATE = "gates=[{metric: eval.similarity_mean, op: '>=', value: -0.99}]"


def test_adhoc_run_triggered_over_rest_completes(
    prefect_server: PrefectServer, served_adhoc: dict, tiny_run, tmp_path: Path
):
    api = prefect_server.api_url
    store_dir = tiny_run.copy_store(tmp_path / "store")
    copied_gates = {path.name for path in (store_dir / "gate").iterdir()}
    parameters = {"config_path": "configs/tiny.yaml", "overrides": [f"store.uri={store_dir}", NEW_GATE]}

    # The deployment's id by name, as a curl user would find it.
    deployment = call_api("GET", f"{api}/deployments/name/finetune/adhoc")
    assert deployment["id"] == served_adhoc["id"]
    assert deployment["entrypoint"] == "flows/finetune.py:finetune"

    started = time.monotonic()
    # A 503 (the server's database busy) is retried, as Prefect's client does; the idempotency key makes a retry
    # that follows a lost answer return the same run rather than start a second.
    body = {"parameters": parameters, "idempotency_key": f"adhoc-{tmp_path.name}"}
    created = call_api("POST", f"{api}/deployments/{deployment['id']}/create_flow_run", body)
    flow_run_id = created["id"]

    proc, serve_log = served_adhoc["_proc"], served_adhoc["_log_path"]
    deadline = started + RUN_TIMEOUT_S
    while True:
        flow_run = call_api("GET", f"{api}/flow_runs/{flow_run_id}")
        state = flow_run["state_type"]
        if state in FINAL_STATES:
            break
        if proc.poll() is not None:
            pytest.fail(
                f"the serving process exited with {proc.returncode} while the run was {state}; "
                f"output tail:\n{tail(serve_log)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {state} after {RUN_TIMEOUT_S:.0f} s; serve output tail:\n{tail(serve_log)}")
        time.sleep(POLL_S)
    print(f"flow run {flow_run['name']} {state} {time.monotonic() - started:.1f} s after it was created")

    assert state == "COMPLETED", (
        f"flow run ended {state}: {flow_run['state'].get('message')}\n"
        f"--- flow run logs ---\n{flow_run_logs(api, flow_run_id)}\n--- serve output ---\n{tail(serve_log)}"
    )
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["parameters"] == parameters
    assert flow_run["parameters"]["overrides"] == [f"store.uri={store_dir}", NEW_GATE]

    # The gate's committed output (one per round of the gate loop): a folder holding its manifest, made by this run.
    gate_dir = store_dir / "gate"
    gate_outputs = sorted(path for path in gate_dir.iterdir() if path.is_dir() and path.name not in copied_gates)
    found = sorted(path.name for path in gate_dir.iterdir())
    assert gate_outputs, f"no gate artifact of this run in {gate_dir}: {found}, copied {sorted(copied_gates)}"
    for output in gate_outputs:
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["files"], f"{output}/manifest.json lists no files"


def test_prefect_yaml_registers_both_deployments(prefect_server: PrefectServer, tmp_path: Path):
    """`make worker`'s registration: create the process pool, `prefect deploy --all` from the yaml (nightly, adhoc,
    and the promotion smoke test with its automation)."""
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
    nightly = call_api("GET", f"{api}/deployments/name/finetune/nightly")
    adhoc = call_api("GET", f"{api}/deployments/name/finetune/adhoc")
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
    pool = call_api("GET", f"{api}/work_pools/finetune-pool")
    assert pool["type"] == "process"
    # The promotion smoke test: its trigger became an automation that runs it on each promoted model.
    smoke = call_api("GET", f"{api}/deployments/name/smoke-test-promoted-model/on-promotion")
    assert smoke["entrypoint"] == "flows/promotion.py:smoke_test_promoted"
    assert smoke["work_pool_name"] == "finetune-pool"
    related = call_api("GET", f"{api}/automations/related-to/prefect.deployment.{smoke['id']}")
    (automation,) = related
    assert automation["trigger"]["expect"] == ["finetune.model.promoted"]
    assert [(a["type"], a["deployment_id"], a["parameters"]) for a in automation["actions"]] == [
        (
            "run-deployment",
            smoke["id"],
            {"model": "{{ event.payload.alias }}", "store_uri": "{{ event.payload.store }}"},
        )
    ]
