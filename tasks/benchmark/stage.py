"""The benchmark stage body: score one slice of a task's questions with lm-eval, write per-question rows and scores.

`benchmark` is the stage task (name "benchmark"): the base model when `tuned` is None, else the fine-tuned one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ModelConfig
from pipeline.stage import Artifact, stage_task
from tasks.benchmark.harness import run_benchmark
from tasks.benchmark.samples import BenchmarkSample
from tasks.benchmark.task_files import METRICS, task_size

log = logging.getLogger(__name__)


ITEM_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("doc", pa.string()),
        ("gold", pa.int64()),
        ("acc", pa.float64()),
        ("acc_norm", pa.float64()),
        ("loglikelihoods", pa.list_(pa.float64())),
    ]
)


@stage_task("benchmark")
def benchmark(sample: BenchmarkSample, model: ModelConfig, tuned: Artifact | None, out: Path) -> dict[str, Any]:
    """Score the fine-tuned model (or the base model when `tuned` is None) on one slice of a task's questions.

    Out: `items.parquet` (one row per question: doc_id, doc, gold, acc, acc_norm, the choices'
    log-likelihoods) and `results.json` (the slice's means, lm-eval and task versions, the model) in
    `out`; returns the slice's figures.
    """
    from pipeline.assets import arc_data_dir, resolve_model
    from pipeline.models import trained_model_folder

    data_dir = arc_data_dir()
    doc_ids = sample.doc_ids(task_size(sample.task, data_dir))
    folder = trained_model_folder(tuned.path) if tuned is not None else resolve_model(model.name)
    log.info(
        "benchmark %s: %d questions (positions %d-%d of the seeded order)",
        sample.task,
        len(doc_ids),
        sample.start,
        sample.end,
    )
    result = run_benchmark(
        folder,
        [sample.task],
        limit=None,
        num_fewshot=sample.num_fewshot,
        batch_size=sample.batch_size,
        data_dir=data_dir,
        trust_remote_code=model.trust_remote_code,
        doc_ids=doc_ids,
    )
    items = result.pop("items")[sample.task]
    result["model"] = "fine-tuned" if tuned is not None else model.name  # a name, not this machine's cache path
    result["model_ref"] = (
        {"uri": tuned.ref.uri, "sha256": tuned.ref.sha256} if tuned is not None else {"name": model.name}
    )
    result["sample"] = sample.model_dump()
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), out / "items.parquet")
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    scores = result["tasks"][sample.task]
    return {
        "task": sample.task,
        "start": sample.start,
        "end": sample.end,
        "n": len(items),
        **{metric: scores[metric] for metric in METRICS},
    }
