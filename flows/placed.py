"""A heavy stage on the infrastructure it needs: its own flow run on another work pool (`placement` in the config).

Two sides of one contract:

* The stage flow `placed_stage` (flow name `finetune-stage`, entrypoint `flows/placed.py:placed_stage`), deployed
  once per placeable stage as `finetune-stage/<stage>` on the pool that stage needs (deployments/stages.yaml). In:
  the stage's name and its task parameters as JSON (input Refs as dicts, config sections as dicts, the store
  without credentials). It runs the ordinary stage task, cached on the same content key with its cache record in
  the same store, and returns the Ref as a dict.
* The parent side, `place_stage`, called by the fine-tuning flow for a placed stage. In: the stage task, its
  parameters and its `StagePlacement`. When the stage's artifact is already in the store it starts nothing and
  returns None (the flow runs the task in its own process, where it comes back Cached). Otherwise it takes a slot
  of each concurrency limit (waiting for one), looks in the store again, starts the stage flow with
  `run_deployment` as a subflow of the flow run, waits for it, and returns the committed Ref read back from the
  store. A stage flow run that fails or crashes, or whose worker goes offline, raises `PlacedStageFailed`
  naming the stage, the pool and the flow run (the rerun resumes from checkpoints in the store, as any rerun).

Credentials never travel with the run: not in its parameters (the store goes without its keys), not in job
variables (the config refuses clear-text credentials there). The placed run takes them from its worker's
environment, or from a Prefect Secret block the work pool's job variables reference.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow
from pydantic import TypeAdapter

from pipeline.config import ConfigError, PlacementConfig, StagePlacement, StoreConfig
from pipeline.refs import Ref
from pipeline.stage import StageRun, open_stage, result_storage_for, run_logger
from tasks.benchmark import benchmark
from tasks.evaluate import evaluate
from tasks.train import train

FLOW_NAME = "finetune-stage"
"""The stage flow's name; its deployments are `finetune-stage/<stage>`."""
ENTRYPOINT = "flows/placed.py:placed_stage"
STAGE_TASKS: dict[str, Any] = {"train": train, "evaluate": evaluate, "benchmark": benchmark}
"""The stage tasks a placement may move, by stage name (the config's PLACEABLE_STAGES, in the same order)."""

STORE_FIELDS_NOT_SENT = frozenset({"access_key_id", "secret_access_key", "cache_dir", "retry_backoff_seconds"})
"""Store settings that stay behind: credentials (the placed run has its worker's), a folder on this machine, and
a deprecated setting."""
POLL_SECONDS = 1.0
"""How often the flow asks the server about a placed run (a read per second is nothing to the API; a placed
stage's overhead is at least this)."""


class PlacedStageFailed(RuntimeError):
    """A placed stage's flow run did not complete: it failed, crashed, was cancelled, or its worker went offline."""


class PlacementError(ConfigError):
    """The Prefect server is not set up for the config's placement: a deployment, pool or limit is missing."""


def deployment_name(stage: str) -> str:
    """'finetune-stage/<stage>': the deployment a placed `stage` runs through."""
    return f"{FLOW_NAME}/{stage}"


# --------------------------------------------------------------------------- parameters as JSON


def _task_parameters(stage_task: Any) -> dict[str, inspect.Parameter]:
    """The task's parameters (their annotations are the types: Ref, list[Ref] | None, config sections)."""
    return dict(inspect.signature(stage_task.fn).parameters)


def bound_parameters(stage_task: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """`parameters` checked against the task's signature, defaults filled in (what its content key hashes)."""
    bound = inspect.signature(stage_task.fn).bind(**parameters)
    bound.apply_defaults()
    return dict(bound.arguments)


def encode_parameters(stage_task: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """The task's parameters as JSON-safe values: Refs and config sections as dicts, the store without credentials
    or its local cache folder."""
    encoded: dict[str, Any] = {}
    for name, param in _task_parameters(stage_task).items():
        value = parameters[name]
        if isinstance(value, StoreConfig):
            encoded[name] = value.model_dump(mode="json", exclude=set(STORE_FIELDS_NOT_SENT))
        else:
            encoded[name] = TypeAdapter(param.annotation).dump_python(value, mode="json")
    return encoded


def decode_parameters(stage_task: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """`encode_parameters` undone: each value validated into its parameter's type (Ref, config section, store)."""
    params = _task_parameters(stage_task)
    if set(arguments) != set(params):
        raise ValueError(
            f"stage {stage_task.name}: expected the parameters {sorted(params)}, found {sorted(arguments)}"
        )
    return {name: TypeAdapter(params[name].annotation).validate_python(arguments[name]) for name in params}


# --------------------------------------------------------------------------- the stage flow (runs on the pool)


@flow(name=FLOW_NAME, log_prints=False)  # log_prints breaks `datasets` fingerprinting (docs/assets.md)
def placed_stage(stage: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run the stage task `stage` (train, evaluate, benchmark) on `arguments` (`encode_parameters`' JSON) in this
    flow run; returns its Ref as a dict. Cached on the same key, in the same store, as in the parent's process."""
    if stage not in STAGE_TASKS:
        raise ValueError(f"stage: expected one of {list(STAGE_TASKS)}, found {stage!r}")
    stage_task = STAGE_TASKS[stage]
    parameters = decode_parameters(stage_task, arguments)
    ref: Ref = stage_task.with_options(result_storage=result_storage_for(parameters["store"]))(**parameters)
    return ref.model_dump(mode="json")


# --------------------------------------------------------------------------- checks before any work


def check_placement(placement: PlacementConfig) -> None:
    """Before any work: every placed stage's deployment exists on the pool the config names, and every concurrency
    limit exists, is active and has room for the stage's slots. Raises PlacementError listing every problem."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    problems: list[str] = []
    where = PREFECT_API_URL.value() or "the Prefect server"
    with get_client(sync_client=True) as client:
        for stage, place in placement.placed.items():
            name = deployment_name(stage)
            register = f"prefect deploy --prefect-file deployments/stages.yaml --name {name} --pool {place.work_pool}"
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                problems.append(f"placement.{stage}: expected the deployment {name} on {where}, found none; {register}")
            else:
                if deployment.work_pool_name != place.work_pool:
                    problems.append(
                        f"placement.{stage}.work_pool: expected the deployment {name} on work pool "
                        f"{place.work_pool!r}, found it on {deployment.work_pool_name!r}; {register}"
                    )
            for limit in place.limits:
                try:
                    found = client.read_global_concurrency_limit_by_name(limit)
                except ObjectNotFound:
                    problems.append(
                        f"placement.{stage}.concurrency_limit: expected the global concurrency limit {limit!r} on "
                        f"{where}, found none; create it: prefect gcl create {limit} --limit <number of GPUs>"
                    )
                    continue
                if not found.active:
                    problems.append(
                        f"placement.{stage}.concurrency_limit: expected {limit!r} active, found it inactive (it "
                        f"would ration nothing); prefect gcl enable {limit}"
                    )
                elif found.limit < place.slots:
                    problems.append(
                        f"placement.{stage}.slots: expected at most the limit {limit!r} allows ({found.limit}), "
                        f"found {place.slots}: the stage could never start"
                    )
    if problems:
        raise PlacementError("\n".join(problems))


# --------------------------------------------------------------------------- the parent side


@dataclass(frozen=True)
class PlacedRun:
    """A placed stage's finished flow run: the Ref it committed, its final state and where it ran."""

    ref: Ref
    state: str
    work_pool: str
    flow_run_id: str
    flow_run_name: str
    worker: str | None

    def summary(self) -> dict[str, Any]:
        """Where the stage ran, for the run summary's stage entry."""
        return {
            "work_pool": self.work_pool,
            "worker": self.worker,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
        }


def _committed(stage: StageRun) -> bool:
    try:
        return stage.committed
    finally:
        stage.discard()  # only the key and the store were needed, not a staging folder


def place_stage(stage_task: Any, label: str, place: StagePlacement, parameters: dict[str, Any]) -> PlacedRun | None:
    """Run `stage_task` on `parameters` as a flow run of `finetune-stage/<stage>` on `place.work_pool`.

    None when its artifact is already committed (before or after waiting for a concurrency slot): nothing was
    started, and the caller runs the task in its own process, where it comes back Cached. Else the finished run
    with its Ref; PlacedStageFailed when the run did not complete or committed nothing under the stage's key.
    """
    from prefect.concurrency.sync import concurrency

    log = run_logger()
    parameters = bound_parameters(stage_task, parameters)
    stage = open_stage(stage_task.name, stage_task.version or "0", parameters)
    if _committed(stage):
        return None
    waited = time.perf_counter()
    if place.limits:
        log.info("%s: waiting for a slot of %s", label, place.limits)
    # strict: a missing limit raises instead of letting every run through. A lease renewal that fails once (a
    # busy server) must not cancel a stage that holds its slot: the lease only expires when this process is gone.
    with concurrency(place.limits, occupy=place.slots, strict=True, raise_on_lease_renewal_failure=False):
        if place.limits:
            log.info("%s: got a slot of %s after %.1f s", label, place.limits, time.perf_counter() - waited)
        if _committed(stage):  # another run made it while this one waited for the slot
            return None
        return _run_on_pool(stage_task, label, place, parameters, stage)


def _run_on_pool(
    stage_task: Any, label: str, place: StagePlacement, parameters: dict[str, Any], stage: StageRun
) -> PlacedRun:
    """Start the stage flow on the pool as a subflow, wait for it, read its Ref back from the store."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    log = run_logger()
    parent = str(flow_run.get_id() or "")
    child = run_deployment(
        deployment_name(stage_task.name),
        parameters={"stage": stage_task.name, "arguments": encode_parameters(stage_task, parameters)},
        job_variables=dict(place.job_variables),
        flow_run_name=f"{flow_run.get_name() or 'finetune'}: {label}",
        tags=[FLOW_NAME, stage_task.name],
        idempotency_key=f"{parent}:{stage.uri}" if parent else None,
        timeout=0,  # return at once: the wait below also watches the worker
        as_subflow=True,
    )
    log.info("%s: started flow run %r (%s) on work pool %r", label, child.name, child.id, place.work_pool)
    finished = wait_for_placed_run(str(child.id), stage_task.name, place.work_pool)
    worker = finished.labels.get("prefect.worker.name")
    where = f"placed stage {stage_task.name} on work pool {place.work_pool!r}, flow run {finished.name!r} "
    where += f"({finished.id})"
    state = finished.state
    if state is None or not state.is_completed():
        name = state.name if state is not None else "unknown"
        raise PlacedStageFailed(f"{where} ended {name}: {(state.message if state else '') or 'no message'}")
    if not stage.store.has_artifact(stage.uri):
        raise PlacedStageFailed(
            f"{where} completed but nothing is committed at {stage.uri}: the worker's code or config computes "
            "another key (is its checkout at the same commit as this run's?)"
        )
    log.info("%s: flow run %r %s on worker %r", label, finished.name, state.name, worker)
    return PlacedRun(
        ref=stage.store.open_ref(stage.uri),
        state=state.name,
        work_pool=place.work_pool,
        flow_run_id=str(finished.id),
        flow_run_name=finished.name,
        worker=worker,
    )


def wait_for_placed_run(flow_run_id: str, stage: str, pool: str, poll_seconds: float = POLL_SECONDS) -> Any:
    """Poll the flow run until it is final; returns it. When the worker that took it goes offline first (the
    server's foreman marks a worker OFFLINE after missing heartbeats), the run is marked Crashed and
    PlacedStageFailed raised: a dead worker's run would otherwise stay Running forever."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    log = run_logger()
    waiting_said = False
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            worker = run.labels.get("prefect.worker.name")
            if worker is None and not waiting_said and not _online_workers(client, pool):
                log.warning("placed stage %s: no worker is online on work pool %r; the run waits for one", stage, pool)
                waiting_said = True
            if worker is not None and worker not in _online_workers(client, pool):
                message = (
                    f"placed stage {stage} on work pool {pool!r}, flow run {run.name!r} ({run.id}): its worker "
                    f"{worker!r} went offline (stopped sending heartbeats) while the run was {run.state_name}"
                )
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                raise PlacedStageFailed(message)
            time.sleep(poll_seconds)


def _online_workers(client: Any, pool: str) -> set[str]:
    """Names of the pool's workers the server counts as online."""
    return {w.name for w in client.read_workers_for_work_pool(pool, limit=200) if w.status.value == "ONLINE"}


__all__ = [
    "ENTRYPOINT",
    "FLOW_NAME",
    "STAGE_TASKS",
    "PlacedRun",
    "PlacedStageFailed",
    "PlacementError",
    "check_placement",
    "decode_parameters",
    "deployment_name",
    "encode_parameters",
    "place_stage",
    "placed_stage",
    "wait_for_placed_run",
]
