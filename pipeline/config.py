"""The one configuration tree of the pipeline.

In: a YAML file (e.g. `configs/default.yaml`) and dotted overrides
(`train.max_steps=20`). Out: a validated, frozen `PipelineConfig`, or a
`ConfigError` that lists every problem at once (key, what was expected, what was
found) before any work starts. Each stage receives only its own section, and that
section (with the stage's inputs) is what its content key hashes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.store import StoreSettings

EVAL_METRICS = ("exact_match", "similarity_mean")
BENCHMARK_METRICS = ("acc", "acc_norm")


class ConfigError(ValueError):
    """A config that cannot run. The message lists every problem, one per line."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """Which causal language model to fine-tune."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="An alias (smollm2-135m-instruct, tiny-neox), a Hugging Face hub id or a local folder.",
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with a hub model. Off unless you trust its author."
    )


class JsonlSource(Section):
    """Question/answer pairs from a JSON Lines file (one object per line)."""

    kind: Literal["jsonl"] = "jsonl"
    path: str = Field(description="Path to a .jsonl file.")
    question_key: str = Field("question", description="Field holding the question.")
    answer_key: str = Field("answer", description="Field holding the answer.")
    limit: int | None = Field(None, gt=0, description="Read at most this many rows.")


class DocsSource(Section):
    """Question/answer pairs made from an installed package's docstrings, plus off-topic refusals.

    Each public function or class becomes several questions ("What does `pkg.f` do?")
    answered by the first paragraph of its docstring. Off-topic questions (ARC train
    questions, never ARC test) are answered with a polite refusal, which teaches the
    model to stay on the package.
    """

    kind: Literal["docs"] = "docs"
    package: str = Field("more_itertools", description="Importable name of an installed package.")
    phrasings: int = Field(3, ge=1, le=6, description="Question phrasings per documented object.")
    max_objects: int | None = Field(None, gt=0, description="Use at most this many documented objects.")
    max_answer_words: int = Field(60, gt=5, description="Cut docstring answers to this many words (at a sentence end).")
    offtopic: int = Field(60, ge=0, description="Number of off-topic questions answered with a refusal.")


Source = Annotated[Union[JsonlSource, DocsSource], Field(discriminator="kind")]


class DataConfig(Section):
    """Where the instruction/answer pairs come from."""

    sources: list[Source] = Field(default_factory=lambda: [DocsSource()], min_length=1)
    min_rows: int = Field(20, ge=1, description="Fail the run when fewer rows than this remain.")


class TemplateConfig(Section):
    """How a pair becomes a prompt and a completion."""

    name: Literal["qa"] = Field("qa", description="'qa': '### Question:\\n{question}\\n\\n### Answer:\\n' then the answer.")


class TokenizeConfig(Section):
    """Turning text into token ids with the model's own tokenizer."""

    max_length: int = Field(256, ge=8, description="Longest sequence in tokens; longer prompts are cut from the left.")
    labels: Literal["all", "completion"] = Field(
        "completion", description="'completion': loss on the answer only; 'all': on every token."
    )


class SplitConfig(Section):
    """Holding out a test set."""

    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation.")
    seed: int = Field(123, description="Shuffle seed.")


class TrainConfig(Section):
    """Hugging Face Trainer settings (full fine-tuning)."""

    max_steps: int = Field(60, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    optim: Literal["adamw_torch", "adafactor", "sgd"] = Field("adamw_torch", description="Optimizer name as the Trainer spells it.")
    seed: int = Field(42, description="Seed for initialisation-free randomness: data order, dropout.")


class EvalConfig(Section):
    """Generating answers for the test split and scoring them."""

    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer in tokens.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")
    limit: int | None = Field(None, gt=0, description="Score at most this many test rows.")


class BenchmarkConfig(Section):
    """General-skill benchmark through lm-eval, to catch forgetting."""

    tasks: list[Literal["arc_easy", "arc_challenge"]] = Field(default_factory=lambda: ["arc_easy"])
    limit: int | None = Field(100, gt=0, description="Questions per task; None for the whole test split.")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)


class Gate(Section):
    """One check on the run's metrics.

    Absolute: `metric op value` on the fine-tuned model. With `relative_to_base`,
    the check is on `fine-tuned - base` (e.g. ARC may drop by at most 0.02:
    metric benchmark.arc_easy.acc_norm, op >=, value -0.02, relative_to_base true).
    """

    metric: str = Field(description="eval.exact_match, eval.similarity_mean or benchmark.<task>.<acc|acc_norm>.")
    op: Literal[">=", "<="] = ">="
    value: float
    relative_to_base: bool = False

    @model_validator(mode="after")
    def _known_metric(self) -> "Gate":
        parts = self.metric.split(".")
        ok = (parts[0] == "eval" and len(parts) == 2 and parts[1] in EVAL_METRICS) or (
            parts[0] == "benchmark" and len(parts) == 3 and parts[2] in BENCHMARK_METRICS
        )
        if not ok:
            raise ValueError(
                f"expected eval.<{'|'.join(EVAL_METRICS)}> or benchmark.<task>.<{'|'.join(BENCHMARK_METRICS)}>,"
                f" found {self.metric!r}"
            )
        return self

    def describe(self) -> str:
        """Human-readable form, e.g. 'eval.similarity_mean - base >= 0.05'."""
        lhs = f"{self.metric} - base" if self.relative_to_base else self.metric
        return f"{lhs} {self.op} {self.value:g}"


class RefineConfig(Section):
    """The bounded loop back into data preparation when gates fail."""

    max_rounds: int = Field(1, ge=1, le=10, description="Rounds of collect..gate at most.")


class StoreConfig(StoreSettings):
    """Where artifacts go: a local folder or s3://bucket/prefix (credentials from the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    refine: RefineConfig = Field(default_factory=RefineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _gates_name_benchmarked_tasks(self) -> "PipelineConfig":
        for gate in self.gates:
            parts = gate.metric.split(".")
            if parts[0] == "benchmark" and parts[1] not in self.benchmark.tasks:
                raise ValueError(
                    f"gate metric {gate.metric!r} names task {parts[1]!r}, expected one of benchmark.tasks {self.benchmark.tasks}"
                )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'train.max_steps=20' into (['train', 'max_steps'], 20); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value, found no '='")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
        raise ConfigError(f"--set {text!r}: expected a dotted key like train.max_steps, found {key!r}")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set `value` at the dotted `path` inside a nested dict/list tree (numeric parts index lists)."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(path)}: expected a list index below {len(node)}, found {part!r}")
    return int(part)


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: '<source>: <dotted key>: <what was expected> (found <value>)'."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(p) for p in problem["loc"] if not str(p).startswith(("function-", "tagged-union")))
        found = problem.get("input")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        shown = "" if isinstance(found, (dict, list)) and problem["type"] != "extra_forbidden" else f" (found {found!r})"
        if "found" in message:
            shown = ""
        lines.append(f"{source}: {key or '<top>'}: {message}{shown}")
    return "\n".join(lines)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`: nested mappings merge, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None), apply dotted overrides, validate.

    Raises ConfigError naming the file, each bad key, what was expected and what was found.
    """
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top, found {type(loaded).__name__}")
        tree = loaded or {}
    # Overrides apply on top of the defaults, so `data.sources.0.limit=5` works when the
    # file leaves `data` out.
    tree = deep_merge(PipelineConfig().model_dump(mode="python"), tree)
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
