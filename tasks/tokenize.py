"""Stage 3, tokenize: token ids and labels with the model's own tokenizer.

In: the template artifact and `TokenizeConfig` (plus the model, whose tokenizer
decides the ids). Out: `tokens.parquet` with `id, prompt, completion,
input_ids, labels`, unpadded (padding happens per batch at training time).
Every completion ends with the EOS token so the model learns to stop. When a pair
is longer than `max_length`, the prompt is cut from the left so the answer survives.
With `labels: completion`, prompt positions get -100 (no loss); rows left with no
trainable label token are dropped and counted.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from pipeline.config import ModelConfig, StoreConfig, TokenizeConfig
from pipeline.models import load_tokenizer
from pipeline.assets import resolve_model
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task
from tasks.collect import read_jsonl

VERSION = "1"
IGNORE_INDEX = -100


def tokenize_pair(prompt_ids: list[int], completion_ids: list[int], config: TokenizeConfig) -> tuple[list[int], list[int]]:
    """Join prompt and completion ids within `max_length`, cutting the prompt from the left first.

    Out: (input_ids, labels). Labels copy the ids, with prompt positions set to
    -100 when only the completion is trained.
    """
    completion_ids = completion_ids[: config.max_length]
    room = config.max_length - len(completion_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - room :] if room > 0 else []
    input_ids = prompt_ids + completion_ids
    if config.labels == "completion":
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    else:
        labels = list(input_ids)
    return input_ids, labels


def tokenize_rows(rows: list[dict], tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig) -> tuple[pa.Table, dict]:
    """Tokenize every templated row in two batched tokenizer calls.

    Out: the Arrow table and counts (rows in, rows out, dropped with no label token,
    rows truncated).
    """
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([row["completion"] for row in rows], add_special_tokens=False)["input_ids"]
    columns: dict[str, list] = {"id": [], "prompt": [], "completion": [], "input_ids": [], "labels": []}
    dropped = truncated = 0
    for row, prompt_ids, completion_ids in zip(rows, prompts, completions):
        full_completion = completion_ids + [tokenizer.eos_token_id]
        input_ids, labels = tokenize_pair(prompt_ids, full_completion, config)
        truncated += len(prompt_ids) + len(full_completion) > config.max_length
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        for name, value in (("id", row["id"]), ("prompt", row["prompt"]), ("completion", row["completion"]),
                            ("input_ids", input_ids), ("labels", labels)):
            columns[name].append(value)
    counts = {"rows_in": len(rows), "rows": len(columns["id"]), "dropped_no_label": dropped, "truncated": truncated}
    return pa.table(columns), counts


@stage_task("tokenize", version=VERSION)
def tokenize(templated: Ref, config: TokenizeConfig, model: ModelConfig, store: StoreConfig) -> Ref:
    """Tokenize the templated rows into `tokens.parquet`; returns the artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    rows = read_jsonl(stage.fetch(templated) / "rows.jsonl")
    tokenizer = load_tokenizer(resolve_model(model.name), trust_remote_code=model.trust_remote_code)
    table, counts = tokenize_rows(rows, tokenizer, config)
    pq.write_table(table, stage.dir / "tokens.parquet")
    lengths = [len(ids) for ids in table.column("input_ids").to_pylist()]
    return stage.commit(meta={**counts, "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1)})
