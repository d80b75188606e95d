"""Benchmark: data preparation throughput (template + tokenize + split), in rows per second.

Measures the pipeline's own pure cores -- `apply_template` per row, `tokenize_rows`,
`split_table` with the default `TemplateConfig`/`TokenizeConfig`/`SplitConfig`
(max_length 256) -- against "the seeds' way" measured in the same run: the
DeepLearning.AI/Lamini "Finetuning LLMs" course recipe,
`datasets.Dataset.from_list(rows).map(fn, batched=True, batch_size=1)` where `fn`
tokenizes each example twice (once padded to find its length, once truncated to
min(length, 256)), then `train_test_split(test_size=0.1, shuffle=True, seed=123)`.

Both use the model's own tokenizer on the same deterministically generated
question/answer rows (random.Random(0)). The seeds' way is slow, so it runs on the
first `--baseline-rows` rows; the comparison is in rows/s, so the ratio stays fair.
Both are warmed up on 100 rows first; datasets caching is disabled for the baseline.
Each is timed `--repeat` times and the best time counts (as `timeit` does: noise
only ever adds time on a shared machine).

A third line is the ceiling: one pass of the same Rust tokenizer over the rows' full
texts on every core and nothing else (no template, labels, table or split). No
preparation that uses the model's own tokenizer can beat it, so its ratio bounds
what any target can ask of this machine.

Run from the repository root:

    .venv/bin/python bench/data_prep.py [--rows 20000] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import datasets
from transformers import PreTrainedTokenizerBase

from pipeline.assets import resolve_model
from pipeline.config import SplitConfig, TemplateConfig, TokenizeConfig
from pipeline.models import load_tokenizer
from pipeline.prompts import QA_PROMPT
from tasks.split import split_table
from tasks.template import apply_template
from tasks.tokenize import encode_texts, tokenize_rows

TARGET_RATIO = 20.0
WARMUP_ROWS = 100
MAX_LENGTH = 256

WORDS = [
    "model", "data", "token", "batch", "layer", "answer", "question", "pipeline", "store", "flow", "task", "gate",
    "config", "prompt", "loss", "train", "test", "split", "tokenizer", "vector", "weight", "gradient", "schedule",
    "worker", "bucket", "artifact", "manifest", "hash", "cache", "refine", "round", "metric", "benchmark", "accuracy",
    "the", "a", "of", "to", "in", "and", "for", "with", "on", "how", "why", "when", "what", "which", "does", "can",
    "should", "every", "each", "first", "last", "small", "large", "fast", "slow", "quickly", "carefully", "again",
    "never", "always", "before", "after", "between", "under", "over", "python", "function", "class", "module",
    "package", "string", "list", "number", "error", "value", "key", "file", "folder",
]  # fmt: skip


def sentence(rng: random.Random, n_words: int, end: str) -> str:
    """A capitalised sentence of `n_words` words drawn from WORDS, ending with `end`."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + end


def answer_text(rng: random.Random) -> str:
    """An answer of 5-80 words, written as sentences of 5-15 words."""
    remaining, parts = rng.randint(5, 80), []
    while remaining > 0:
        n = min(remaining, rng.randint(5, 15))
        parts.append(sentence(rng, n, "."))
        remaining -= n
    return " ".join(parts)


def make_rows(n_rows: int) -> list[dict]:
    """`n_rows` collected rows `{"id", "question", "answer"}`, the same for every run."""
    rng = random.Random(0)
    return [
        {"id": f"q{i}", "question": sentence(rng, rng.randint(4, 20), "?"), "answer": answer_text(rng)}
        for i in range(n_rows)
    ]


def pipeline_prep(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> int:
    """Template, tokenize and split through the pipeline's cores; returns rows in train + test."""
    templated = [apply_template(row, TemplateConfig()) for row in rows]
    table, _counts = tokenize_rows(templated, tokenizer, TokenizeConfig(max_length=MAX_LENGTH))
    train, test = split_table(table, SplitConfig())
    return train.num_rows + test.num_rows


def seeds_prep(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> int:
    """The course's way: Dataset.map one example at a time, tokenizing twice, then train_test_split."""

    def tokenize_function(examples: dict) -> dict:
        text = QA_PROMPT.format(question=examples["question"][0]) + examples["answer"][0]
        tokenized = tokenizer(text, return_tensors="np", padding=True)
        max_length = min(tokenized["input_ids"].shape[1], MAX_LENGTH)
        tokenizer.truncation_side = "left"
        return tokenizer(text, return_tensors="np", truncation=True, max_length=max_length)

    dataset = datasets.Dataset.from_list(rows).map(tokenize_function, batched=True, batch_size=1)
    split = dataset.train_test_split(test_size=0.1, shuffle=True, seed=123)
    return split["train"].num_rows + split["test"].num_rows


def tokenizer_only(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> int:
    """The ceiling: one parallel pass of the tokenizer over each row's full QA text; returns rows encoded."""
    texts = [QA_PROMPT.format(question=row["question"]) + row["answer"] for row in rows]
    return len(encode_texts(tokenizer, texts))


def timed(
    prep: Callable[[list[dict], PreTrainedTokenizerBase], int],
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    repeat: int,
) -> float:
    """Best of `repeat` timings of `prep` on `rows`, in seconds, after a warm-up on WARMUP_ROWS rows."""
    prep(rows[:WARMUP_ROWS], tokenizer)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        produced = prep(rows, tokenizer)
        best = min(best, time.perf_counter() - started)
        if produced != len(rows):
            raise RuntimeError(f"{prep.__name__}: expected {len(rows)} rows out, found {produced}")
    return best


def main(argv: list[str] | None = None) -> int:
    """Run both preparations, print rows, seconds, rows/s, the ratio and the verdict; 0 on PASS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows for the pipeline cores")
    parser.add_argument("--baseline-rows", type=int, default=2_000, help="rows for the seeds' way (it is slow)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or hub id")
    parser.add_argument("--repeat", type=int, default=3, help="timings per side; the best counts")
    args = parser.parse_args(argv)

    datasets.disable_caching()
    datasets.disable_progress_bars()
    folder = resolve_model(args.model)
    # Two tokenizers: the seeds' function mutates its own (truncation_side).
    pipeline_tokenizer, seeds_tokenizer = load_tokenizer(folder), load_tokenizer(folder)
    rows = make_rows(max(args.rows, args.baseline_rows, WARMUP_ROWS))

    results = {}
    for name, prep, tokenizer, n_rows in (
        ("pipeline cores", pipeline_prep, pipeline_tokenizer, args.rows),
        ("seeds' way", seeds_prep, seeds_tokenizer, args.baseline_rows),
        ("tokenizer only", tokenizer_only, pipeline_tokenizer, args.rows),
    ):
        seconds = timed(prep, rows[:n_rows], tokenizer, args.repeat)
        results[name] = n_rows / seconds
        print(f"{name:15} {n_rows:7d} rows {seconds:8.2f} s {n_rows / seconds:10.0f} rows/s")
    ratio = results["pipeline cores"] / results["seeds' way"]
    ceiling = results["tokenizer only"] / results["seeds' way"]
    print(
        f"ratio (pipeline rows/s / seeds' rows/s): {ratio:.1f}x  [model {args.model}, max_length {MAX_LENGTH}, "
        f"best of {args.repeat}]"
    )
    print(f"ceiling (tokenizer only / seeds'): {ceiling:.1f}x; the pipeline reaches {ratio / ceiling:.0%} of it")
    print(f"target >= {TARGET_RATIO:g}x: {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
