"""The `data` section: where the rows come from (file, Hugging Face and docs sources) and which rows are too bad.

A source entry's `kind` picks its class (`Source`, a discriminated union: any file format is a file source;
without a kind, a `path` means a file source and a `dataset` a Hugging Face one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from pipeline.config.base import Section


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
    # le: len(pipeline.docs_source.QUESTION_PHRASINGS) (tests/unit/test_probes.py keeps the two equal).
    phrasings: int = Field(3, ge=1, le=7, description="Question phrasings per documented object.")
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
