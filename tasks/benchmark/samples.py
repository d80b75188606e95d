"""The nested question samples: a task's questions in one seeded order, each look a longer prefix of it.

A `BenchmarkSample` is the slice of that order one stage run scores; `benchmark_looks` gives the slices each look
adds, so a growing sample scores only its new questions.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import BenchmarkConfig


def question_order(size: int, seed: int) -> list[int]:
    """Document ids 0..size-1 in a seeded random order; every look takes a prefix, so samples are nested."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order


class BenchmarkSample(BaseModel):
    """The questions one benchmark stage run scores: positions [start, end) of a task's seeded question order.

    A look at n questions is the first n of that order, so a larger look adds only
    positions after the earlier ones, each slice its own stored artifact (computed once
    per model and reused by every later look and run).
    """

    model_config = ConfigDict(frozen=True)

    task: str
    seed: int
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    num_fewshot: int = 0
    batch_size: int = 16

    def doc_ids(self, size: int) -> list[int]:
        """The scored split's document ids in this slice, ascending (lm-eval scores them in its own order)."""
        return sorted(question_order(size, self.seed)[self.start : self.end])


def benchmark_looks(config: BenchmarkConfig, sizes: dict[str, int]) -> list[list[BenchmarkSample]]:
    """The slices each look adds, per task: look k covers positions [size_{k-1}, size_k) of each task's order.

    In: the benchmark config and each task's split size. Sizes beyond a task's split are cut to it; a look
    that adds nothing for any task is dropped, so the last look is the whole split only when 'all' (or a
    size at least the split's) is configured.
    """
    looks: list[list[BenchmarkSample]] = []
    done = {task: 0 for task in config.tasks}
    for size in config.sample_sizes:
        added = []
        for task in config.tasks:
            end = sizes[task] if size == "all" else min(int(size), sizes[task])
            if end > done[task]:
                added.append(
                    BenchmarkSample(
                        task=task,
                        seed=config.sample_seed,
                        start=done[task],
                        end=end,
                        num_fewshot=config.num_fewshot,
                        batch_size=config.batch_size,
                    )
                )
                done[task] = end
        if added:
            looks.append(added)
    return looks
