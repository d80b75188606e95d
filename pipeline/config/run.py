"""The whole run: `store` (where artifacts go), `sweep` (a grid of runs) and `PipelineConfig`, the tree itself."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.config.base import Section
from pipeline.config.data import DataConfig
from pipeline.config.evaluation import BENCHMARK_METRICS, EVAL_METRICS, BenchmarkConfig, EvalConfig
from pipeline.config.gates import EloConfig, Gate, RefineConfig
from pipeline.config.placement import PlacementConfig
from pipeline.config.preparation import SplitConfig, TemplateConfig, TokenizeConfig
from pipeline.config.training import ModelConfig, TrainConfig
from pipeline.store import StoreSettings


class StoreConfig(StoreSettings):
    """Where artifacts go: a local folder or s3://bucket/prefix (credentials from the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SWEEP_TRAIN_METRICS = ("test_loss", "final_train_loss", "mean_train_loss")
"""Figures of the train stage's report a sweep can plot (train.<name>)."""


class SweepConfig(Section):
    """A grid of fine-tuning runs for `finetune sweep` (flows/sweep.py): every combination of the lists below.

    Each grid point runs the fine-tuning flow with its values as overrides. Stages whose
    inputs a point does not change (collect, template, tokenize, validate, split and the
    base model's evaluation and benchmark) come back Cached after the first point. An
    empty list means "the value the config already has". With train.max_steps set, every
    point trains the same number of steps (a fixed compute budget, so a smaller share is
    repeated more often); with epochs, steps grow with the share.
    """

    fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        min_length=1,
        description="Shares of the train split (train.train_fraction), each in (0, 1]; nested: a smaller share is "
        "a subset of a larger one.",
    )
    models: list[str] = Field(
        default_factory=list, description="Base models (aliases, hub ids, folders); empty: model.name."
    )
    methods: list[Literal["full", "lora", "qlora"]] = Field(
        default_factory=list, description="Training methods; empty: train.method."
    )
    learning_rates: list[float] = Field(
        default_factory=list, description="Peak learning rates; empty: train.learning_rate."
    )
    metric: str = Field(
        "eval.similarity_mean",
        description="The learning curve's y axis: eval.<metric>, benchmark.<task>.<acc|acc_norm> or "
        f"train.<{'|'.join(SWEEP_TRAIN_METRICS)}>.",
    )
    max_points: int = Field(24, ge=1, description="Refuse a grid of more points than this (each point is a whole run).")
    refine: bool = Field(
        False,
        description="Let a point whose gates fail loop back into data preparation (refine.max_rounds). Off: one "
        "round per point, so every point trains on exactly the data its share says.",
    )

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, fractions: list[float]) -> list[float]:
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"expected fractions in (0, 1], found {bad}")
        return sorted(set(fractions))

    @field_validator("learning_rates")
    @classmethod
    def _positive_rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if r <= 0]
        if bad:
            raise ValueError(f"expected learning rates above 0, found {bad}")
        return list(dict.fromkeys(rates))

    @field_validator("models")
    @classmethod
    def _named_models(cls, models: list[str]) -> list[str]:
        if any(not m.strip() for m in models):
            raise ValueError(f"expected model names, found an empty one in {models}")
        return list(dict.fromkeys(models))

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        parts = metric.split(".")
        ok = (
            (parts[0] == "eval" and len(parts) == 2 and parts[1] in EVAL_METRICS)
            or (parts[0] == "benchmark" and len(parts) == 3 and parts[2] in BENCHMARK_METRICS)
            or (parts[0] == "train" and len(parts) == 2 and parts[1] in SWEEP_TRAIN_METRICS)
        )
        if not ok:
            raise ValueError(
                f"expected eval.<{'|'.join(EVAL_METRICS)}>, benchmark.<task>.<{'|'.join(BENCHMARK_METRICS)}> or "
                f"train.<{'|'.join(SWEEP_TRAIN_METRICS)}>, found {metric!r}"
            )
        return metric

    @model_validator(mode="after")
    def _grid_not_too_large(self) -> SweepConfig:
        points = (
            len(self.fractions)
            * max(1, len(self.models))
            * max(1, len(self.methods))
            * max(1, len(self.learning_rates))
        )
        if points > self.max_points:
            raise ValueError(f"expected at most max_points={self.max_points} grid points, found {points}")
        return self


class PipelineConfig(Section):
    """The whole run: one section per stage plus the model and the store."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    gates: list[Gate] = Field(default_factory=list)
    gates_confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Confidence of every gate's two-sided interval. The run passes only when every gate passes "
        "(an intersection of tests: no correction across gates is needed for that claim); a benchmark gate's "
        "looks at a growing sample share it (Bonferroni: each look uses 1 - (1 - confidence) / looks).",
    )
    gates_on_inconclusive: Literal["fail", "pass"] = Field(
        "fail",
        description="What a gate that is still inconclusive when no more items can be added counts as (the whole "
        "benchmark split used, or an evaluation gate, whose test set is fixed). "
        "The report says which gates it decided.",
    )
    elo: EloConfig = Field(default_factory=EloConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _sweep_metric_is_benchmarked(self) -> PipelineConfig:
        parts = self.sweep.metric.split(".")
        if parts[0] == "benchmark" and parts[1] not in self.benchmark.tasks:
            raise ValueError(
                f"sweep.metric {self.sweep.metric!r} names task {parts[1]!r}, "
                f"expected one of benchmark.tasks {self.benchmark.tasks}"
            )
        return self

    @model_validator(mode="after")
    def _weights_and_training_agree(self) -> PipelineConfig:
        # Checks of the config alone; what the machine must have (CUDA, bitsandbytes) is checked before a run starts
        # (pipeline.models.check_training_device), since a config may be validated on another machine.
        weights, method, autocast = self.model.dtype, self.train.method, self.train.dtype
        if weights == "float16" and method == "full":
            raise ValueError(
                "model.dtype=float16 with train.method=full: float16 training needs loss scaling, which needs "
                "float32 trainable weights (torch refuses to unscale float16 gradients); expected "
                "train.method lora or qlora, or model.dtype bfloat16"
            )
        if weights != "float32" and autocast not in ("auto", "float32", weights):
            raise ValueError(
                f"train.dtype={autocast} over model.dtype={weights} weights: expected train.dtype auto, float32 "
                f"or {weights}"
            )
        return self

    @model_validator(mode="after")
    def _placed_stages_reach_the_store(self) -> PipelineConfig:
        placed = list(self.placement.placed)
        if placed and not self.store.uri.startswith("s3://"):
            keys = ", ".join(f"placement.{stage}" for stage in placed)
            raise ValueError(
                f"{keys}: a placed stage runs on another machine and needs a store every work pool can reach, "
                f"expected store.uri=s3://bucket/prefix, found store.uri={self.store.uri!r} (a local folder)"
            )
        return self

    @model_validator(mode="after")
    def _gates_name_benchmarked_tasks(self) -> PipelineConfig:
        for gate in self.gates:
            parts = gate.metric.split(".")
            if parts[0] == "benchmark" and parts[1] not in self.benchmark.tasks:
                raise ValueError(
                    f"gate metric {gate.metric!r} names task {parts[1]!r}, "
                    f"expected one of benchmark.tasks {self.benchmark.tasks}"
                )
        return self
