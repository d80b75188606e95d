"""The promotion event against a REAL Prefect server: a passing run emits `finetune.model.promoted` (resource: the
model's location; payload: its alias and the gate figures), a failing one does not, and the automation that the
shipped `on-promotion` deployment's trigger creates runs the smoke test on the promoted model.

One `prefect server start` for the module (`prefect_server`, prefect_helpers.py); the `on-promotion` deployment is
served from a child process exactly as deployments/serve.py builds it; the runs are the real command,
`finetune run --config configs/tiny.yaml`, pointed at the server with PREFECT_API_URL, on a copy of the session's
tiny run's store (tests/conftest.py), so the stages they share with it come back Cached. The failing run goes first
(its only change is a gate nobody can pass, and one round), so when the passing run's event arrives, the failing
run's would have too.
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
    REPO_ROOT,
    PrefectServer,
    call_api,
    flow_run_logs,
    http,
    start,
    stop,
    tail,
    wait_for,
)

from pipeline.store import StoreSettings, open_store

pytestmark = pytest.mark.integration

SERVE_SCRIPT = REPO_ROOT / "deployments" / "serve.py"
SERVE_STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 600.0
REACTION_TIMEOUT_S = 300.0
EVENT = "finetune.model.promoted"
SERVE_ON_PROMOTION = f"""
import runpy
from prefect import serve
deployments = runpy.run_path({str(SERVE_SCRIPT)!r})["build_deployments"]()
serve(*[d for d in deployments if d.name == "on-promotion"])
"""


@pytest.fixture(scope="module")
def on_promotion(prefect_server: PrefectServer, tmp_path_factory) -> Iterator[dict]:
    """The `on-promotion` deployment served from a child process; yields it, its automation and the process."""
    log_path = tmp_path_factory.mktemp("on-promotion") / "serve.log"
    api = prefect_server.api_url
    proc = start(
        [sys.executable, "-c", SERVE_ON_PROMOTION], prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="1"), log_path
    )

    def registered():
        response = http().get(f"{api}/deployments/name/smoke-test-promoted-model/on-promotion", timeout=10)
        return response.json() if response.status_code == 200 else None

    try:
        deployment = wait_for("serving on-promotion", registered, SERVE_STARTUP_TIMEOUT_S, proc, log_path)
        automations = wait_for(
            "the deployment trigger's automation",
            lambda: (
                http().get(f"{api}/automations/related-to/prefect.deployment.{deployment['id']}", timeout=10).json()
            ),
            60,
            proc,
            log_path,
        )
        yield {"deployment": deployment, "automations": automations, "proc": proc, "log_path": log_path}
    finally:
        stop(proc)


def _events(api: str) -> list[dict]:
    return call_api("POST", f"{api}/events/filter", {"filter": {"event": {"name": [EVENT]}}, "limit": 50})["events"]


def _runs_of(api: str, deployment_id: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    return call_api("POST", f"{api}/flow_runs/filter", body)


def _run(prefect_server: PrefectServer, store_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "finetune.cli", "run", "--config", "configs/tiny.yaml", "--set"]
    return subprocess.run(
        [*command, f"store.uri={store_dir}", *(f"--set={o}" for o in overrides)],
        cwd=REPO_ROOT,
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_the_trigger_is_an_automation_that_runs_the_deployment(on_promotion):
    (automation,) = on_promotion["automations"]
    assert automation["trigger"]["expect"] == [EVENT]
    (action,) = automation["actions"]
    assert action["type"] == "run-deployment" and action["deployment_id"] == on_promotion["deployment"]["id"]
    assert action["parameters"] == {"model": "{{ event.payload.alias }}", "store_uri": "{{ event.payload.store }}"}


def test_a_passing_run_announces_its_model_and_the_automation_smoke_tests_it(
    prefect_server, on_promotion, tiny_run, tmp_path
):
    api, deployment_id = prefect_server.api_url, on_promotion["deployment"]["id"]
    # A copy of the session's tiny run's store without its pointer and card: the failing run computes only its
    # gate, and the passing run promotes (pointer, card, event) the model the copy holds.
    store_dir = tiny_run.copy_store(tmp_path / "store")

    failing = _run(prefect_server, store_dir, "gates.0.value=2.0", "refine.max_rounds=1")  # similarity >= 2: never
    assert failing.returncode == 1, failing.stderr[-3000:]
    assert not (store_dir / "pointers" / "latest-passing.json").exists()
    passing = _run(prefect_server, store_dir)
    assert passing.returncode == 0, passing.stderr[-3000:]

    pointer = json.loads((store_dir / "pointers" / "latest-passing.json").read_text())
    alias = json.loads((store_dir / pointer["train_uri"] / "report.json").read_text())["alias"]
    verdicts = json.loads((store_dir / pointer["gate_uri"] / "verdicts.json").read_text())["verdicts"]
    proc, log_path = on_promotion["proc"], on_promotion["log_path"]
    (event,) = wait_for("the promotion event", lambda: _events(api), 60, proc, log_path)
    location = open_store(StoreSettings(uri=str(store_dir))).location(pointer["model_uri"])
    assert event["resource"]["prefect.resource.id"] == location
    assert event["resource"]["prefect.resource.name"] == alias
    payload = event["payload"]
    assert payload["alias"] == alias and payload["store"] == str(store_dir)
    assert (payload["model_uri"], payload["train_sha256"], payload["card"]) == (
        pointer["model_uri"],
        pointer["train_sha256"],
        pointer["card"],
    )
    figures = ("gate", "estimate", "low", "high", "n", "confidence", "verdict", "passed")
    assert [[g[k] for k in figures] for g in payload["gates"]] == [[v[k] for k in figures] for v in verdicts]
    related = {resource["prefect.resource.id"] for resource in event["related"]}
    assert f"prefect.flow-run.{pointer['flow_run_id']}" in related  # emitted inside the passing run

    def finished():
        runs = [run for run in _runs_of(api, deployment_id) if run["state_type"] in FINAL_STATES]
        return runs or None

    (run,) = wait_for("the automation's flow run", finished, REACTION_TIMEOUT_S, proc, log_path)
    assert run["state_type"] == "COMPLETED", (
        f"{run['state']['message']}\n{flow_run_logs(api, run['id'])}\n--- serve output ---\n{tail(log_path)}"
    )
    assert run["parameters"] == {"model": alias, "store_uri": str(store_dir)}
    assert run["created_by"]["type"] == "AUTOMATION"
    assert run["created_by"]["id"] == on_promotion["automations"][0]["id"]
    body = {"artifacts": {"key": {"any_": ["promoted-model-smoke-test"]}, "flow_run_id": {"any_": [run["id"]]}}}
    (table,) = call_api("POST", f"{api}/artifacts/filter", body)
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [row["question"] for row in rows] == [
        "What can you answer questions about?",
        "What is the capital of France?",
    ]
    time.sleep(2)
    assert len(_events(api)) == 1  # the failing run announced nothing
