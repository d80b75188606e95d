"""The one configuration tree of the pipeline.

In: a YAML file (e.g. `configs/default.yaml`) and dotted overrides
(`train.max_steps=20`). Out: a validated, frozen `PipelineConfig`, or a
`ConfigError` that lists every problem at once (key, what was expected, what was
found) before any work starts. Each stage receives only its own section, and that
section (with the stage's inputs) is what its content key hashes.

Modules: `base` (`Section`, `ConfigError`), the sections by topic: `data` (the sources), `preparation`
(template, tokenize, split), `training` (model, train, LoRA), `evaluation` (eval, benchmark, the metric and
probe names), `gates` (gates, elo, refine), `placement` (which
stages run on another work pool), `run` (store, sweep and the whole `PipelineConfig`); and `loading`
(YAML, --set overrides, error messages). This module re-exports their public names.
"""

from __future__ import annotations

from pipeline.config.base import ConfigError, Section
from pipeline.config.data import (
    FILE_KINDS,
    DataConfig,
    DocsSource,
    FileSource,
    HFSource,
    JsonlSource,
    RecordSource,
    Source,
    SourceBase,
)
from pipeline.config.evaluation import (
    BENCHMARK_METRICS,
    BENCHMARK_TASKS,
    DEFAULT_PROBE_COUNTS,
    DEFAULT_PROBES,
    EVAL_METRICS,
    HAND_PICKED_PROBES,
    OFFTOPIC_PROBE_CATEGORIES,
    PROBE_CATEGORIES,
    BenchmarkConfig,
    EvalConfig,
)
from pipeline.config.gates import (
    DEFAULT_REFINE_ACTIONS,
    ELO_METRIC_JUDGES,
    REFINE_CHANGES,
    EloConfig,
    Gate,
    RefineConfig,
    import_function,
)
from pipeline.config.loading import (
    apply_override,
    deep_merge,
    format_validation_error,
    load_config,
    parse_override,
    yaml_problem,
)
from pipeline.config.placement import (
    DEFAULT_CONCURRENCY_LIMIT,
    PLACEABLE_STAGES,
    PlacementConfig,
    StagePlacement,
)
from pipeline.config.preparation import TEMPLATE_FIELDS, SplitConfig, TemplateConfig, TokenizeConfig
from pipeline.config.run import SWEEP_TRAIN_METRICS, PipelineConfig, StoreConfig, SweepConfig
from pipeline.config.training import LoraConfig, ModelConfig, TrainConfig

__all__ = [
    "BENCHMARK_METRICS",
    "BENCHMARK_TASKS",
    "DEFAULT_CONCURRENCY_LIMIT",
    "DEFAULT_PROBES",
    "DEFAULT_PROBE_COUNTS",
    "DEFAULT_REFINE_ACTIONS",
    "ELO_METRIC_JUDGES",
    "EVAL_METRICS",
    "FILE_KINDS",
    "HAND_PICKED_PROBES",
    "OFFTOPIC_PROBE_CATEGORIES",
    "PLACEABLE_STAGES",
    "PROBE_CATEGORIES",
    "REFINE_CHANGES",
    "SWEEP_TRAIN_METRICS",
    "TEMPLATE_FIELDS",
    "BenchmarkConfig",
    "ConfigError",
    "DataConfig",
    "DocsSource",
    "EloConfig",
    "EvalConfig",
    "FileSource",
    "Gate",
    "HFSource",
    "JsonlSource",
    "LoraConfig",
    "ModelConfig",
    "PipelineConfig",
    "PlacementConfig",
    "RecordSource",
    "RefineConfig",
    "Section",
    "Source",
    "SourceBase",
    "SplitConfig",
    "StagePlacement",
    "StoreConfig",
    "SweepConfig",
    "TemplateConfig",
    "TokenizeConfig",
    "TrainConfig",
    "apply_override",
    "deep_merge",
    "format_validation_error",
    "import_function",
    "load_config",
    "parse_override",
    "yaml_problem",
]
