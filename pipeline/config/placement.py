"""The `placement` section: which heavy stages run as their own flow run on another Prefect work pool.

In: for each placeable stage (`train`, `evaluate`, `benchmark`) that should leave the flow's process, a work pool,
optional job variables and the global concurrency limits that ration it. Out: a validated `PlacementConfig`; a
stage left out runs in the flow's process as before. How a placed stage runs is flows/placed.py; the deployments
it runs through are deployments/stages.yaml.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from pipeline.config.base import Section

PLACEABLE_STAGES = ("train", "evaluate", "benchmark")
"""The stages that may run on another work pool (the heavy ones: a GPU helps them)."""

DEFAULT_CONCURRENCY_LIMIT = "gpu"
"""The Prefect global concurrency limit a placed stage takes a slot of unless its placement names others."""

CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)
"""Names of job variables that hold credentials (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""

TEMPLATE_REFERENCE = re.compile(r"^\s*\{\{\s*prefect\.(blocks|variables)\.[\w.-]+\s*\}\}\s*$")
"""A Prefect block or variable reference ('{{ prefect.blocks.secret.s3-key }}'): the worker resolves it when it
starts the run, so only the reference is stored on the server."""


def credential_keys(value: Any, path: str = "") -> list[str]:
    """The dotted paths inside `value` (job variables) whose key names a credential and whose value is given in
    clear text rather than as a Prefect block or variable reference."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            clear_text = not isinstance(item, (dict, list)) and not (
                isinstance(item, str) and TEMPLATE_REFERENCE.match(item)
            )
            if clear_text and CREDENTIAL_NAME.search(str(key)):
                found.append(where)
            found += credential_keys(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += credential_keys(item, f"{path}.{index}")
    return found


class StagePlacement(Section):
    """Where one stage runs: a flow run of the deployment `finetune-stage/<stage>` on `work_pool`."""

    work_pool: str = Field(
        min_length=1,
        description="The Prefect work pool the stage runs on (e.g. gpu). The deployment finetune-stage/<stage> "
        "must be registered on this pool (deployments/stages.yaml); the run checks it before any work starts.",
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables for the stage's flow runs, laid over the deployment's and the pool's "
        "(e.g. {env: {CUDA_VISIBLE_DEVICES: '0'}} on a process pool, or a Kubernetes pool's resources). They are "
        "stored on the Prefect server and shown in the UI: never credentials. A credential-named key "
        "(*SECRET*, *TOKEN*, *PASSWORD*, *ACCESS_KEY*, ...) may only hold a Prefect Secret block reference "
        "('{{ prefect.blocks.secret.<name> }}'), which the worker resolves.",
    )
    concurrency_limit: str | list[str] | None = Field(
        DEFAULT_CONCURRENCY_LIMIT,
        description="The Prefect global concurrency limit(s) the stage holds a slot of while it runs, so N runs "
        "share K GPUs: a run that finds no free slot waits for one. Several names hold a slot of each (a shared "
        "'gpu' limit and a team's own share). null: no limit (a pool without GPUs). Every limit must exist and "
        "be active on the server (`prefect gcl create gpu --limit <number of GPUs>`).",
    )
    slots: int = Field(
        1, ge=1, description="Slots the stage occupies on each limit (the GPUs one run of it uses, e.g. 2 for DDP)."
    )

    @field_validator("job_variables")
    @classmethod
    def _no_credentials(cls, variables: dict[str, Any]) -> dict[str, Any]:
        found = credential_keys(variables)
        if found:
            raise ValueError(
                f"expected no credentials in job variables (they are stored on the Prefect server and shown in "
                f"the UI), found a clear-text value under {found}; give the worker's environment the credential, "
                "or reference a Prefect Secret block: '{{ prefect.blocks.secret.<name> }}'"
            )
        return variables

    @field_validator("concurrency_limit")
    @classmethod
    def _named_limits(cls, limit: str | list[str] | None) -> str | list[str] | None:
        names = [limit] if isinstance(limit, str) else (limit or [])
        if any(not name.strip() for name in names):
            raise ValueError(f"expected concurrency limit names, found an empty one in {limit!r}")
        return limit

    @property
    def limits(self) -> list[str]:
        """The concurrency limit names as a list (empty: none)."""
        if self.concurrency_limit is None:
            return []
        return [self.concurrency_limit] if isinstance(self.concurrency_limit, str) else list(self.concurrency_limit)


class PlacementConfig(Section):
    """Which heavy stages run as their own flow run on another work pool; a stage left out runs in the flow's
    process. A placed stage takes and returns the same Refs and keeps the same content key: when its artifact is
    already in the store, no run is started on its pool. Every pool must reach the store, so placement needs an
    S3 store (store.uri=s3://...)."""

    train: StagePlacement | None = Field(None, description="Where the train stage runs (e.g. {work_pool: gpu}).")
    evaluate: StagePlacement | None = Field(
        None, description="Where both evaluate stage runs (base and fine-tuned) run."
    )
    benchmark: StagePlacement | None = Field(None, description="Where every benchmark slice runs.")

    def of(self, stage: str) -> StagePlacement | None:
        """The placement of `stage`, or None when it runs in the flow's process."""
        return getattr(self, stage) if stage in PLACEABLE_STAGES else None

    @property
    def placed(self) -> dict[str, StagePlacement]:
        """{stage: placement} of every placed stage."""
        return {stage: place for stage in PLACEABLE_STAGES if (place := getattr(self, stage)) is not None}
