"""Stage 3, tokenize: token ids and labels with the model's own tokenizer.

In: the template artifact and `TokenizeConfig` (plus the model, whose tokenizer
decides the ids). Rows are read, tokenized and written `BATCH_ROWS` at a time (one Parquet row group per
batch), so memory stays flat however many rows there are. Out: `tokens.parquet`, unpadded (padding happens per batch at
training time), with `id, source, role, key, question, prompt, completion, input_ids,
labels, prompt_tokens, answer_tokens` (`key` is the normalised question that split
checks for leakage; the two counts are untruncated lengths for the quality report),
and `report.json` with the rows dropped here, by reason, with examples.

Every completion ends with the EOS token so the model learns to stop. A row over
`max_length` is cut (`truncation_side: left`, the default, cuts the prompt from its
start so the answer survives) or dropped (`overlength: drop`). With `labels:
completion`, prompt positions get -100 (no loss); a `text` row has an empty prompt,
so every token of it trains. A row whose answer was cut away entirely is dropped
(`answer_truncated`): it would teach nothing, or only the prompt.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import resolve_model
from pipeline.config import ModelConfig, TokenizeConfig
from pipeline.models import IGNORE_INDEX, load_tokenizer
from pipeline.progress import Progress
from pipeline.rows import BATCH_ROWS, DataError, DropLog, jsonl_batches, question_key
from pipeline.stage import stage_task

if TYPE_CHECKING:  # only annotations: load_tokenizer imports transformers when a tokenize stage runs
    from transformers import PreTrainedTokenizerBase


def truncate_pair(n_prompt: int, n_completion: int, config: TokenizeConfig) -> tuple[int, int]:
    """How many prompt and completion tokens fit in `max_length`: (prompt kept, completion kept).

    'left' keeps the completion's start (up to max_length) and the prompt's end;
    'right' keeps the joined sequence's start, so the completion goes first.
    """
    if config.truncation_side == "left":
        completion = min(n_completion, config.max_length)
        return min(n_prompt, config.max_length - completion), completion
    prompt = min(n_prompt, config.max_length)
    return prompt, min(n_completion, config.max_length - prompt)


def tokenize_pair(
    prompt_ids: list[int], completion_ids: list[int], config: TokenizeConfig
) -> tuple[list[int], list[int]]:
    """Join prompt and completion ids within `max_length`, cut as `truncation_side` says.

    Out: (input_ids, labels). Labels copy the ids, with prompt positions set to
    -100 when only the completion is trained.
    """
    n_prompt, n_completion = truncate_pair(len(prompt_ids), len(completion_ids), config)
    prompt = prompt_ids[len(prompt_ids) - n_prompt :] if config.truncation_side == "left" else prompt_ids[:n_prompt]
    completion = completion_ids[:n_completion]
    input_ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion if config.labels == "completion" else list(input_ids)
    return input_ids, labels


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    A fast (Rust) tokenizer encodes the whole list on every core: the pipeline keeps
    TOKENIZERS_PARALLELISM off so forked workers stay safe, so it is switched on for
    this one call only (the Rust side reads the variable per call). Other tokenizers
    go through the usual `__call__`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        # encode_batch_fast skips character offsets, which nothing here needs.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that builds many lists and frees no cycles.

    Tokenizing allocates a list of ids per text; each few hundred allocations start a
    collection that walks every live row, which cost 5-40% of tokenize_rows in
    bench/data_prep.py. Reference counting still frees everything; cycles made in the
    block (none are) would wait for the next collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("role", pa.string()),
        ("key", pa.string()),
        ("question", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("input_ids", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int64())),
        ("prompt_tokens", pa.int64()),
        ("answer_tokens", pa.int64()),
    ]
)
"""tokens.parquet's columns; spelled out so that every batch (an empty one too) writes the same schema."""
COLUMNS = tuple(SCHEMA.names)


@dataclass
class TokenizeTally:
    """What tokenizing has counted so far, over every batch: rows in and out, truncated, tokens, drops."""

    rows_in: int = 0
    rows: int = 0
    truncated: int = 0
    tokens: int = 0
    drops: DropLog = field(default_factory=DropLog)

    def counts(self) -> dict[str, Any]:
        """Rows in, rows out, rows truncated, `dropped` by reason with `examples` (the stage's report)."""
        return {
            "rows_in": self.rows_in,
            "rows": self.rows,
            "truncated": self.truncated,
            "dropped": dict(self.drops.counts),
            "dropped_no_label": self.drops.counts["answer_truncated"],
            "examples": self.drops.examples,
        }


def tokenize_rows(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig
) -> tuple[pa.Table, dict]:
    """Tokenize every templated row in two batched tokenizer calls, in memory (the stage streams `tokenize_file`).

    Out: the Arrow table (`SCHEMA`) and counts: rows in, rows out, rows truncated, and
    `dropped` by reason (over_length with `overlength: drop`; answer_truncated), with
    `examples` of each.
    """
    tally = TokenizeTally()
    with cyclic_gc_paused():
        table = tokenize_batch(rows, tokenizer, config, tally)
    return table, tally.counts()


def tokenize_file(
    templated: Path,
    target: Path,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    batch_rows: int = BATCH_ROWS,
) -> TokenizeTally:
    """Tokenize the templated JSON Lines rows of `templated` into the Parquet file `target`, `batch_rows` at a time.

    The same core as `tokenize_rows`, per batch; the output does not depend on `batch_rows`. Out: the tally.
    """
    tally, progress = TokenizeTally(), Progress("tokenize", unit="rows")
    with pq.ParquetWriter(target, SCHEMA) as writer:
        for rows in jsonl_batches(templated, batch_rows):
            with cyclic_gc_paused():
                writer.write_table(tokenize_batch(rows, tokenizer, config, tally))
            progress.advance(len(rows))
    progress.finish()
    return tally


def tokenize_batch(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig, tally: TokenizeTally
) -> pa.Table:
    """One batch of templated rows as a table of `SCHEMA` (two batched tokenizer calls); counts go to `tally`."""
    prompts = encode_texts(tokenizer, [row["prompt"] for row in rows])
    completions = encode_texts(tokenizer, [row["completion"] for row in rows])
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    lists = [columns[name] for name in COLUMNS]
    drops, eos = tally.drops, tokenizer.eos_token_id
    tally.rows_in += len(rows)
    for row, prompt_ids, completion_ids in zip(rows, prompts, completions):
        full_completion = [*completion_ids, eos]
        length = len(prompt_ids) + len(full_completion)
        if length > config.max_length:
            if config.overlength == "drop":
                drops.add(
                    "over_length",
                    f"row {row['id']}: expected at most tokenize.max_length={config.max_length} tokens, found {length}",
                )
                continue
            tally.truncated += 1
        if truncate_pair(len(prompt_ids), len(full_completion), config)[1] == 0:
            drops.add(
                "answer_truncated",
                f"row {row['id']}: the prompt's {len(prompt_ids)} tokens "
                f"fill tokenize.max_length={config.max_length}, no answer token is left",
            )
            continue
        input_ids, labels = tokenize_pair(prompt_ids, full_completion, config)
        tally.tokens += len(input_ids)
        # Plain appends: this loop runs once per row and dominates the stage's time after the tokenizer.
        values = (
            row["id"],
            row.get("source", ""),
            row.get("role", "train"),
            question_key(row),
            row.get("question", ""),
            row["prompt"],
            row["completion"],
            input_ids,
            labels,
            len(prompt_ids),
            len(completion_ids),
        )
        for column, value in zip(lists, values):
            column.append(value)
    tally.rows += len(columns["id"])
    return pa.table(columns, schema=SCHEMA)


@stage_task("tokenize")
def tokenize(templated: Path, config: TokenizeConfig, model: ModelConfig, out: Path) -> dict[str, Any]:
    """Tokenize the templated rows into `out/tokens.parquet` (+ `report.json`); returns the figures."""
    tokenizer = load_tokenizer(resolve_model(model.name), trust_remote_code=model.trust_remote_code)
    tally = tokenize_file(templated / "rows.jsonl", out / "tokens.parquet", tokenizer, config)
    counts = tally.counts()
    if tally.rows == 0:
        raise DataError(
            f"tokenize: expected rows left after tokenization, found none of {tally.rows_in}: "
            f"{counts['dropped']}; raise tokenize.max_length or use truncation_side: left"
        )
    report = {**counts, "max_length": config.max_length}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = {key: value for key, value in counts.items() if key != "examples"}
    return {**meta, "mean_tokens": round(tally.tokens / max(tally.rows, 1), 1)}
