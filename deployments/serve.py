"""Serve the `finetune` flow's two deployments (and the promotion smoke test) from this one process; no work pool
or worker needed.

    nightly  runs configs/default.yaml every day at 02:00 UTC (cron "0 2 * * *")
    adhoc    no schedule; runs when triggered (UI, CLI, REST API, Python)

and `smoke-test-promoted-model/on-promotion` (flows/promotion.py), whose trigger is an automation: every
`finetune.model.promoted` event (a passing run moved latest-passing) runs it on the promoted model.

Usage (from any directory: the script moves to the repository root, where flow runs
start, so relative paths such as `configs/tiny.yaml` and `./artifacts` resolve there):

    make server                                    # terminal 1: Prefect server on 127.0.0.1:4200
    make serve                                     # terminal 2: this script
    # or: PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python deployments/serve.py

    # terminal 3: trigger an ad-hoc run
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run 'finetune/adhoc' \\
        -p config_path=configs/tiny.yaml -p 'overrides=["train.max_steps=2"]'

Parameters of both deployments: `config_path` (a YAML run config) and `overrides`
(dotted `key=value` strings, as `--set` takes them on the `finetune` CLI). Flow runs
execute in child processes of this one; stopping it (Ctrl-C) pauses the nightly
schedule until it is served again. For a work pool and workers instead, see
deployments/prefect.yaml and deployments/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python deployments/serve.py` puts deployments/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from prefect import serve  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.finetune import PROMOTED_EVENT, finetune  # noqa: E402
from flows.promotion import smoke_test_promoted  # noqa: E402

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"
NIGHTLY_PARAMETERS = {"config_path": "configs/default.yaml", "overrides": []}


def build_deployments() -> list[RunnerDeployment]:
    """The `nightly` (scheduled, default config) and `adhoc` (unscheduled) deployments of `finetune`."""
    nightly = finetune.to_deployment(
        name="nightly",
        schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],  # `cron=` alone leaves the timezone unset
        parameters=NIGHTLY_PARAMETERS,
        description="The default config, every night at 02:00 UTC.",
        tags=["finetune", "nightly"],
    )
    adhoc = finetune.to_deployment(
        name="adhoc",
        description="On demand: pass config_path and overrides (dotted key=value strings).",
        tags=["finetune", "adhoc"],
    )
    return [nightly, adhoc, on_promotion_deployment()]


ON_PROMOTION_PARAMETERS = {"model": "{{ event.payload.alias }}", "store_uri": "{{ event.payload.store }}"}
"""The smoke test's parameters, rendered from the `finetune.model.promoted` event that triggers it."""


def on_promotion_deployment() -> RunnerDeployment:
    """`smoke-test-promoted-model/on-promotion`: its trigger is an automation that runs it for every
    `finetune.model.promoted` event, on the promoted model (the event's alias) in the event's store."""
    return smoke_test_promoted.to_deployment(
        name="on-promotion",
        description="Answers a few questions with each newly promoted model (the finetune.model.promoted event).",
        tags=["finetune", "promotion"],
        triggers=[
            DeploymentEventTrigger(
                name="smoke-test-on-promotion",
                description="Run the smoke test whenever a fine-tuned model passes every gate and is promoted.",
                expect={PROMOTED_EVENT},
                parameters=ON_PROMOTION_PARAMETERS,
            )
        ],
    )


def main() -> None:
    """Register both deployments with the server at PREFECT_API_URL and run their flow runs until stopped."""
    os.chdir(REPO_ROOT)  # the entrypoint (flows/finetune.py) and the runs' relative paths are taken from here
    serve(*build_deployments())


if __name__ == "__main__":
    main()
