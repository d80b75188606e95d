"""Placed stages on real work pools: the tiny config with `placement.train.work_pool=gpu` against a real Prefect
server, a real SeaweedFS store and two `process` work pools, `cpu` (the fine-tuning flow) and `gpu` (the train
stage), a worker each with its own working folder, PREFECT_HOME and download cache, and the store's credentials
in its environment only.

One setup for the module (server, pools, deployments, the global concurrency limit `gpu` of 1 slot, workers),
and one store, so each run reuses what the earlier ones computed:

1. the gpu worker (and everything it started) is SIGKILLed once the train stage's first checkpoint is in the
   store: the parent run fails naming the stage, the pool and the child run;
2. a second gpu worker starts, and two parent runs start at once: the rerun of the killed run and one with
   another seed (so both train). Both complete: the rerun's training resumed from the stored checkpoint, the
   train stage ran as a flow run on the gpu pool, every other stage in the parent run; and the two train runs
   shared the 1-slot limit, never overlapping in time;
3. a rerun is all Cached and starts no flow run on the gpu pool;
4. the store's credentials appear nowhere (issue 7's scan, over the placed runs too).

Steps 2 and 4 of an earlier version ran one after the other, a whole placed run more on the suite's longest path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect_helpers import (
    FINAL_STATES,
    REPO_ROOT,
    PrefectServer,
    call_api,
    clean_env,
    flow_run_logs,
    http,
    running_prefect_server,
    stop,
    tail,
    wait_for,
)

pytestmark = pytest.mark.integration

TINY = "configs/tiny.yaml"
BEFORE_TRAIN = ("collect", "template", "tokenize", "validate", "split")
AFTER_TRAIN = ("evaluate", "benchmark", "gate")
# The workers' heartbeat; the server marks a worker offline after 3 missed (15 s), checked every second. Shorter
# risks a false "offline" on 2 busy cores.
HEARTBEAT_SECONDS = "5"
# How often a worker asks for runs to start (Prefect's default: 10 s), and how often the tests ask whether a run
# ended: each run waits a little longer, but the server answers fewer requests on cores the rest of the suite uses.
WORKER_QUERY_SECONDS = "5"
RUN_POLL_S = 2.0
# The server's services this module has no use for (no schedules, automations, pauses or cancellations); each
# loops every few seconds. The repossessor stays: it frees the `gpu` slot a killed run's lease still holds.
UNUSED_SERVICES = ("SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "TRIGGERS")
RUN_TIMEOUT_S = 420.0
WORKER_STARTUP_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Worker:
    """A `prefect worker start` process for one pool, in its own folder (cwd, PREFECT_HOME, download cache)."""

    name: str
    pool: str
    proc: subprocess.Popen
    log_path: Path
    folder: Path


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the flow runs a process worker started, their training processes)."""
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = (int(part) for part in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclasses.dataclass
class Cluster:
    """The module's server, store and pools; starts workers and parent runs, reads runs back from the API."""

    server: PrefectServer
    endpoint: str
    access_key: str
    secret_key: str
    store_uri: str
    folder: Path
    workers: dict[str, Worker] = dataclasses.field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.server.api_url

    def start_worker(self, pool: str, name: str) -> Worker:
        folder = self.folder / name
        (folder / "home").mkdir(parents=True)
        env = clean_env(
            PREFECT_API_URL=self.api,
            PREFECT_HOME=str(folder / "home"),
            PREFECT_WORKER_HEARTBEAT_SECONDS=HEARTBEAT_SECONDS,
            PREFECT_WORKER_QUERY_SECONDS=WORKER_QUERY_SECONDS,
            FINETUNE_REPO=str(REPO_ROOT),  # the deployments' pull step moves each run into the checkout
            XDG_CACHE_HOME=str(folder / "cache"),  # its own S3 download cache: nothing shared through local files
            AWS_ACCESS_KEY_ID=self.access_key,  # the store's credentials: the worker's environment, nowhere else
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_REGION="us-east-1",
        )
        log_path = folder / "worker.log"
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*command, "--name", name],
                cwd=folder,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers[pool] = Worker(name, pool, proc, log_path, folder)
        return self.workers[pool]

    def kill_worker(self, pool: str) -> None:
        """SIGKILL the pool's worker and every process below it, as if its machine died."""
        worker = self.workers[pool]
        for pid in [worker.proc.pid, *_descendants(worker.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.proc.wait(timeout=30)

    def overrides(self, *more: str) -> list[str]:
        return [
            f"store.uri={self.store_uri}",
            f"store.endpoint_url={self.endpoint}",
            "placement.train.work_pool=gpu",
            *more,
        ]

    def start_run(self, name: str, *overrides: str) -> str:
        """A flow run of finetune/adhoc (on the cpu pool) for the tiny config; returns its id."""
        deployment = call_api("GET", f"{self.api}/deployments/name/finetune/adhoc")
        parameters = {"config_path": TINY, "overrides": self.overrides(*overrides)}
        body = {"parameters": parameters, "name": name}
        return call_api("POST", f"{self.api}/deployments/{deployment['id']}/create_flow_run", body)["id"]

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return call_api("GET", f"{self.api}/flow_runs/{flow_run_id}")

    def wait(self, flow_run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        """The flow run once it is final; fails with its logs and the workers' output on timeout."""
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(flow_run_id))["state_type"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {run['name']} still {run['state_type']} after {timeout:.0f} s\n{self.tails()}")
            time.sleep(RUN_POLL_S)
        return run

    def tails(self) -> str:
        return "\n".join(f"--- worker {w.name} ---\n{tail(w.log_path, 40)}" for w in self.workers.values())

    def explain(self, run: dict[str, Any]) -> str:
        return f"{run['state'].get('message')}\n--- logs ---\n{flow_run_logs(self.api, run['id'])}\n{self.tails()}"

    def filter(self, what: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        return call_api("POST", f"{self.api}/{what}/filter", {**body, "limit": 200})

    def children(self, parent_id: str) -> list[dict[str, Any]]:
        """The subflow runs of a parent run (the placed stages' flow runs)."""
        return self.filter("flow_runs", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}})

    def on_pool(self, pool: str) -> list[dict[str, Any]]:
        return self.filter("flow_runs", {"work_pools": {"name": {"any_": [pool]}}})

    def task_names(self, flow_run_id: str) -> list[str]:
        """The stage (or subflow) name of each task run of a flow run ('collect-3f2' -> 'collect')."""
        runs = self.filter("task_runs", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return sorted(run["name"].rsplit("-", 1)[0] for run in runs)

    @functools.cached_property
    def s3(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def keys(self, under: str) -> list[str]:
        bucket, prefix = self.store_uri.removeprefix("s3://").split("/", 1)
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{under}")
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        bucket = self.store_uri.removeprefix("s3://").split("/", 1)[0]
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _register(api_url: str, prefect_file: str, flow_name: str, names: set[str], pool: str) -> None:
    """Register the named deployments of a shipped prefect.yaml on `pool` over the REST API, as `prefect deploy`
    would (entrypoint, pull steps, parameters, tags), without its cost: it imports the flow (torch, transformers)
    to read the parameter schema, minutes on 2 busy cores."""
    spec = yaml.safe_load((REPO_ROOT / prefect_file).read_text())
    flow_id = call_api("POST", f"{api_url}/flows/", {"name": flow_name})["id"]
    chosen = [d for d in spec["deployments"] if d["name"] in names]
    assert {d["name"] for d in chosen} == names, f"{prefect_file} lacks {names}"
    for deployment in chosen:
        body = {
            "name": deployment["name"],
            "flow_id": flow_id,
            "entrypoint": deployment["entrypoint"],
            "work_pool_name": pool,
            "work_queue_name": "default",
            "pull_steps": spec["pull"],
            "parameters": deployment["parameters"],
            "tags": deployment["tags"],
            "enforce_parameter_schema": False,
        }
        call_api("POST", f"{api_url}/deployments/", body)


@pytest.fixture(scope="module")
def cluster(seaweedfs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Server (its foreman checks worker heartbeats every second), pools cpu and gpu with a worker each, the stage
    deployments (deployments/stages.yaml) on gpu, finetune/adhoc (deployments/prefect.yaml) on cpu, the global
    concurrency limit `gpu` of 1 slot, and an empty S3 store."""
    started = time.monotonic()
    # A longer wait than the other modules': this module's whole setup is one fixture, worth waiting for.
    off = {f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false" for service in UNUSED_SERVICES}
    servers = running_prefect_server(tmp_path_factory, 600.0, PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS="1", **off)
    server = next(servers)
    folder = tmp_path_factory.mktemp("placement")
    cluster = Cluster(
        server=server,
        endpoint=seaweedfs.endpoint_url,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        store_uri=f"s3://placement-{uuid.uuid4().hex[:10]}/runs",
        folder=folder,
    )
    # The store makes its bucket on first write; making it here lets the tests list keys before a run has written.
    cluster.s3.create_bucket(Bucket=cluster.store_uri.removeprefix("s3://").split("/", 1)[0])
    try:
        # Both workers start at once (each takes seconds to import Prefect); a worker of type process creates its pool.
        for pool in ("cpu", "gpu"):
            cluster.start_worker(pool, f"{pool}-1")
        for pool, worker in cluster.workers.items():
            wait_for(
                f"work pool {pool}",
                lambda p=pool: http().get(f"{server.api_url}/work_pools/{p}", timeout=10).status_code == 200,
                WORKER_STARTUP_TIMEOUT_S,
                worker.proc,
                worker.log_path,
            )
        _register(
            server.api_url, "deployments/stages.yaml", "finetune-stage", {"train", "evaluate", "benchmark"}, "gpu"
        )
        _register(server.api_url, "deployments/prefect.yaml", "finetune", {"adhoc"}, "cpu")
        call_api("POST", f"{server.api_url}/v2/concurrency_limits/", {"name": "gpu", "limit": 1})
        print(f"\nplacement setup (server, 2 pools and workers, 4 deployments) in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        for worker in cluster.workers.values():
            below = _descendants(worker.proc.pid)
            stop(worker.proc)
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(StopIteration):
            next(servers)


@dataclasses.dataclass
class KilledThenRerun:
    killed: dict[str, Any]  # the parent run whose gpu worker died
    killed_child: dict[str, Any]
    rerun: dict[str, Any]  # the killed run's rerun, after a new gpu worker started
    other_seed: dict[str, Any]  # started with the rerun, with another seed: its training competes for the slot
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def killed_then_rerun(cluster: Cluster) -> KilledThenRerun:
    """Parent run 1, its gpu worker SIGKILLed once the first checkpoint is stored; then a new gpu worker and two
    parent runs at once on the same store: the rerun of run 1 and one with another seed."""
    seconds: dict[str, float] = {}
    started = time.monotonic()
    first = cluster.start_run("killed")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(key.endswith("/manifest.json") for key in cluster.keys("checkpoints/")):
        run = cluster.flow_run(first)
        if run["state_type"] in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint in the store before the run ended {run['state_type']}:\n{cluster.explain(run)}")
        time.sleep(0.1)
    assert not cluster.keys("train/"), "training finished before the worker could be killed"
    cluster.kill_worker("gpu")
    killed_at = time.monotonic()
    killed = cluster.wait(first)
    seconds["killed run"] = killed_at - started
    seconds["failure noticed after the kill"] = time.monotonic() - killed_at
    (child,) = cluster.children(first)

    cluster.start_worker("gpu", "gpu-2")
    started = time.monotonic()
    ids = [cluster.start_run("rerun"), cluster.start_run("seed-8", "train.seed=8")]
    rerun, other_seed = (cluster.wait(flow_run_id) for flow_run_id in ids)
    seconds["rerun and another seed, sharing the gpu slot"] = time.monotonic() - started
    print(f"\nplacement runs: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    return KilledThenRerun(killed, cluster.flow_run(child["id"]), rerun, other_seed, seconds)


def test_a_dead_gpu_worker_fails_the_parent_naming_stage_pool_and_run(killed_then_rerun: KilledThenRerun):
    killed, child = killed_then_rerun.killed, killed_then_rerun.killed_child
    assert killed["state_type"] == "FAILED", killed["state"]
    message = killed["state"]["message"]
    assert "placed stage train" in message and "work pool 'gpu'" in message, message
    assert child["name"] in message and child["id"] in message and "gpu-1" in message, message
    # The dead worker's run does not stay Running forever: it is marked Crashed, saying why.
    assert child["state_type"] == "CRASHED" and "went offline" in child["state"]["message"]


def test_placed_train_runs_on_the_gpu_pool_and_everything_else_in_the_parent(
    cluster: Cluster, killed_then_rerun: KilledThenRerun
):
    rerun = killed_then_rerun.rerun
    assert rerun["state_type"] == "COMPLETED", cluster.explain(rerun)
    assert rerun["work_pool_name"] == "cpu" and rerun["labels"]["prefect.worker.name"] == "cpu-1"
    (child,) = cluster.children(rerun["id"])
    # Read back from the API: the train stage's flow run ran on the gpu pool, taken by the new gpu worker.
    assert child["work_pool_name"] == "gpu" and child["labels"]["prefect.worker.name"] == "gpu-2"
    assert child["state_type"] == "COMPLETED" and child["parameters"]["stage"] == "train"
    assert child["deployment_id"] and child["parent_task_run_id"]
    assert cluster.task_names(child["id"]) == ["train"]
    # What placing the stage cost: the child run from its creation to its end, less the train task's own time.
    (task,) = cluster.filter("task_runs", {"flow_runs": {"id": {"any_": [child["id"]]}}})
    lifetime = datetime.fromisoformat(child["end_time"]) - datetime.fromisoformat(child["created"])
    print(
        f"\nplaced train stage: flow run {lifetime.total_seconds():.1f} s from creation to end, the train task "
        f"{task['total_run_time']:.1f} s of it"
    )
    parent_tasks = set(cluster.task_names(rerun["id"]))
    assert {*BEFORE_TRAIN, *AFTER_TRAIN} <= parent_tasks, parent_tasks
    assert "train" not in parent_tasks
    # The child hangs under one of the parent's task runs (run_deployment's as_subflow): a subflow in the UI.
    parent_task_ids = {t["id"] for t in cluster.filter("task_runs", {"flow_runs": {"id": {"any_": [rerun["id"]]}}})}
    assert child["parent_task_run_id"] in parent_task_ids
    # The parameters carry Refs and config sections, never the store's credentials.
    store = child["parameters"]["arguments"]["store"]
    assert store["uri"] == cluster.store_uri and "secret_access_key" not in store and "access_key_id" not in store


def test_the_rerun_resumes_from_the_checkpoint_the_killed_run_stored(
    cluster: Cluster, killed_then_rerun: KilledThenRerun
):
    report_keys = [key for key in cluster.keys("train/") if key.endswith("/report.json")]
    reports = [json.loads(cluster.read(key)) for key in report_keys]
    # Checkpoints are stored under the train stage's key: only the killed run's rerun (same seed) finds any.
    resumed = sorted((report["resumed_from_step"] or 0, report["steps"]) for report in reports)
    assert resumed == [(0, 4), (2, 4)], reports
    assert not cluster.keys("checkpoints/")  # the committed models supersede their checkpoints


def test_a_cached_rerun_starts_nothing_on_the_gpu_pool(cluster: Cluster, killed_then_rerun: KilledThenRerun):
    before = len(cluster.on_pool("gpu"))
    started = time.monotonic()
    run = cluster.wait(cluster.start_run("cached"))
    print(f"\ncached rerun with a placed train stage: {time.monotonic() - started:.1f} s")
    assert run["state_type"] == "COMPLETED", cluster.explain(run)
    assert len(cluster.on_pool("gpu")) == before and not cluster.children(run["id"])
    tasks = cluster.filter("task_runs", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    states = {task["name"].rsplit("-", 1)[0]: task["state"]["name"] for task in tasks}
    took = {
        task["name"].rsplit("-", 1)[0]: round(
            (datetime.fromisoformat(task["end_time"]) - datetime.fromisoformat(task["created"])).total_seconds(), 2
        )
        for task in tasks
        if task["end_time"]
    }
    print(f"cached rerun, each task run from creation to end (s): {json.dumps(took)}")
    assert states["train"] == "Cached" and set(states.values()) == {"Cached"}, states


def test_two_runs_share_one_gpu_slot_without_overlapping(cluster: Cluster, killed_then_rerun: KilledThenRerun):
    runs = [killed_then_rerun.rerun, killed_then_rerun.other_seed]
    for run in runs:
        assert run["state_type"] == "COMPLETED", cluster.explain(run)
    children = [child for run in runs for child in cluster.children(run["id"])]
    assert len(children) == 2 and {c["work_pool_name"] for c in children} == {"gpu"}
    spans = sorted((datetime.fromisoformat(c["start_time"]), datetime.fromisoformat(c["end_time"])) for c in children)
    assert spans[0][1] <= spans[1][0], f"the two train runs overlap: {spans}"


def test_credentials_appear_nowhere_in_the_placed_runs(cluster: Cluster, killed_then_rerun: KilledThenRerun):
    """Issue 7's scan (tests/reliability/test_secrets.py) over this module's server, workers and store."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = importlib.util.spec_from_file_location("_secret_scan", REPO_ROOT / "tests/reliability/test_secrets.py")
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)
    secrets = (cluster.secret_key, cluster.access_key)
    found: dict[str, list[str]] = {}

    def check(where: str, blob: bytes | str) -> None:
        if hits := scan.leaks(blob, secrets):
            found[where] = hits

    with temporary_settings({PREFECT_API_URL: cluster.api}):
        api = scan.prefect_api_dump()
    assert "finetune-stage" in api["flow_runs"] and '"stage": "train"' in api["flow_runs"]
    for kind, text in api.items():
        check(f"Prefect API {kind}", text)
    for path in scan.files_in(cluster.server.home, cluster.folder):  # every worker's home, cache and output
        check(f"file {path}", path.read_bytes())
    objects = cluster.keys("")
    assert any("/_prefect/" in key for key in objects) and any(key.endswith("model.safetensors") for key in objects)
    for key in objects:
        check(f"object {key}", cluster.read(key))
    assert not found, f"credentials found: {found}"
