"""The Python API: the whole flow in three lines.

    from finetune import FineTuner
    ft = FineTuner("smollm2-135m-instruct")
    ft.load_data("faq.jsonl", input_key="question", output_key="answer"); report = ft.train(); ft.evaluate()

`FineTuner` only builds the same config overrides the CLI takes and runs the same
Prefect flow, so caching, artifacts and the Prefect UI are exactly those of
`finetune run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import load_config


@dataclass(frozen=True)
class RunReport:
    """What a run produced: whether every gate passed, the model's location, metrics and verdicts."""

    passed: bool
    model_uri: str
    store: str
    metrics: dict[str, dict[str, float]]
    verdicts: list[dict[str, Any]]
    stages: list[dict[str, Any]] = field(repr=False)

    @property
    def model_path(self) -> str:
        """Where the fine-tuned model folder is (a local path, or an s3:// location)."""
        return f"{self.store.rstrip('/')}/{self.model_uri}"


class FineTuner:
    """Fine-tune `model` (an alias, hub id or local folder) with the pipeline's flow.

    `config` is an optional YAML file to start from (the built-in defaults otherwise);
    `overrides` are dotted `key=value` strings as on the command line. Credentials
    (`store.access_key_id`, `store.secret_access_key`) given to `set` go to the
    environment, as with the CLI, so they never reach the flow run's parameters.
    """

    def __init__(
        self, model: str = "smollm2-135m-instruct", config: str | Path | None = None, overrides: list[str] | None = None
    ):
        self.config_path = str(config) if config is not None else None
        from finetune.cli import secrets_to_environment

        self.overrides = [*secrets_to_environment(list(overrides or [])), f"model.name={json.dumps(model)}"]
        self.report: RunReport | None = None
        load_config(self.config_path, self.overrides)  # fail now, not after a long wait

    def load_data(self, path: str | Path, input_key: str = "question", output_key: str = "answer") -> FineTuner:
        """Train on a JSON Lines file whose records hold `input_key` and `output_key`; returns self."""
        source = {"kind": "jsonl", "path": str(path), "question_key": input_key, "answer_key": output_key}
        return self.set(**{"data.sources": [source]})

    def set(self, **dotted: Any) -> FineTuner:
        """Override config values by dotted key, e.g. `ft.set(**{"train.max_steps": 20})`; returns self."""
        from finetune.cli import secrets_to_environment

        added = [f"{key}={json.dumps(value)}" for key, value in dotted.items()]  # JSON is valid YAML: types survive
        # Credentials go to the environment boto3 reads, never into flow parameters (the Prefect UI shows those).
        self.overrides += secrets_to_environment(added)
        load_config(self.config_path, self.overrides)
        return self

    def train(self) -> RunReport:
        """Run the whole flow (cached stages are reused) and return its report; gates decide `passed`."""
        from flows.finetune import GatesFailed, finetune

        state = finetune(config_path=self.config_path, overrides=self.overrides, return_state=True)
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, GatesFailed):
            outcome = outcome.summary
        elif isinstance(outcome, BaseException):
            raise outcome
        self.report = RunReport(
            passed=outcome["passed"],
            model_uri=outcome["model_uri"],
            store=outcome["store"],
            metrics=outcome["metrics"],
            verdicts=outcome["verdicts"],
            stages=outcome["stages"],
        )
        return self.report

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of the base and the fine-tuned model (runs `train()` first when needed)."""
        report = self.report or self.train()
        return report.metrics
