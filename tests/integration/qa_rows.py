"""Training rows for tests that train a real model: short random question/answer pairs over a small vocabulary,
tokenized as the tokenize stage does (prompt masked, EOS after the answer), so a few steps visibly lower the loss."""

from __future__ import annotations

import random

import pyarrow as pa

WORDS = [
    "chunk", "window", "batch", "iterate", "flatten", "group", "pair", "split",
    "merge", "zip", "cycle", "repeat", "take", "drop", "first", "last",
]  # fmt: skip


def qa_table(tokenizer, n: int, rng: random.Random) -> pa.Table:
    """`n` templated question/answer rows as a split file holds them: `input_ids` and `labels` (prompt -100)."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 16)))
        prompt = tokenizer(f"### Question:\n{question}\n\n### Answer:\n", add_special_tokens=False)["input_ids"]
        completion = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        columns["input_ids"].append(prompt + completion)
        columns["labels"].append([-100] * len(prompt) + completion)
    return pa.table(columns)
