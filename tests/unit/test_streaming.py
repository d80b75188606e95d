"""Data preparation streams: its results do not depend on the batch size, and equal the in-memory rules it replaced.

The stages' cores run twice on the same data, once in batches of 3 rows (so every pass crosses many batch
boundaries and the duplicate digests spill to disk many times) and once in one batch; both must give the same
bytes. The rows, the drops by reason and the split membership are also checked against a plain in-memory
reference of the rules collect and split kept before streaming (sets of seen keys, `random.shuffle` of the row
numbers). Also: the on-disk digest log, Parquet read in flat memory, the capped eval subset of training, and the
progress lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, JsonlSource, SplitConfig, TemplateConfig, TokenizeConfig
from pipeline.digests import DigestLog
from pipeline.progress import Progress
from pipeline.rows import DataError, parquet_file, question_key, read_jsonl
from tasks.collect import collect_to, sample_membership, source_rows
from tasks.split import shuffled_order, split_file, split_rows
from tasks.template import template_file, template_rows
from tasks.tokenize import tokenize_file, tokenize_rows
from tasks.validate import quality_report, tokens_quality

BIG = 1 << 30
"""A batch size no test reaches: everything in one batch."""


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.assets import resolve_model
    from pipeline.models import load_tokenizer

    return load_tokenizer(resolve_model("tiny-neox"))


def test_digest_log_finds_repeats_and_counts_exactly_across_spills(tmp_path: Path):
    rng = random.Random(5)
    keys = [str(rng.randint(0, 300)) for _ in range(2000)]
    log = DigestLog(tmp_path / "log", buffer_rows=7)
    for key in keys:
        log.add(hashlib.blake2b(key.encode(), digest_size=16).digest())
    seen: set[str] = set()
    expected = []
    for key in keys:
        expected.append(key in seen)
        seen.add(key)
    assert log.repeats().tolist() == expected and len(log) == 2000
    first = {}
    for position, key in enumerate(keys):
        first.setdefault(key, position)
    # Counter.most_common keeps first-seen order among equal counts; the log must too.
    assert log.most_common(6) == [(count, first[key]) for key, count in Counter(keys).most_common(6)]
    with pytest.raises(ValueError, match="16-byte"):
        log.add(b"short")


@pytest.mark.parametrize("n_rows", [0, 1, 2, 17, 1000])
@pytest.mark.parametrize("seed", [123, 7])
def test_split_order_is_random_shuffle_step_for_step(n_rows: int, seed: int):
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    assert list(shuffled_order(n_rows, seed)) == order


@pytest.mark.parametrize(("n", "k"), [(0, 0), (1, 1), (5, 3), (30, 5), (30, 6), (100, 40), (2000, 9), (2000, 1900)])
def test_collect_draw_is_random_sample_step_for_step(n: int, k: int):
    # Both of CPython's ways (a pool for small populations, a set of picks for large ones) are reached.
    expected, rng = random.Random(f"3:{n}:{k}"), random.Random(f"3:{n}:{k}")
    picks = expected.sample(range(n), k)
    taken = sample_membership(n, k, rng)
    assert np.flatnonzero(taken).tolist() == sorted(picks) and len(taken) == n
    assert rng.random() == expected.random(), "the generator is left where sample leaves it"
    with pytest.raises(ValueError, match="sample size"):
        sample_membership(3, 4, rng)


# --------------------------------------------------------------------------- the in-memory reference


def reference_collect(config: DataConfig, workdir: Path) -> tuple[list[dict], Counter]:
    """Collect's rules as they were in memory: every source's rows in a list, sets of seen keys, the seeded draw."""
    per_source, drops = [], Counter()
    for index, source in enumerate(config.sources):
        result, rows = source_rows(source, index, config, None, workdir)
        per_source.append((result, list(rows)))
        drops.update(result.drops.counts)
    seen_exact, seen_near = set(), set()
    kept_by_source = []
    for result, rows in per_source:
        kept = []
        for row in rows:
            exact = json.dumps({k: v for k, v in row.items() if k not in ("id", "source")}, sort_keys=True)
            near = f"{row.get('role', 'train')}\x1f{question_key(row)}"
            if exact in seen_exact:
                drops["duplicate"] += 1
            elif config.dedupe == "near" and near in seen_near:
                drops["near_duplicate"] += 1
            else:
                kept.append(row)
            seen_exact.add(exact)
            seen_near.add(near)
        kept_by_source.append((result, kept))
    available = sum(len(rows) for result, rows in kept_by_source if result.role == "train")
    out = []
    for result, rows in kept_by_source:
        if result.role == "train" and config.max_rows and available > config.max_rows:
            wanted = int(len(rows) * config.max_rows / available)
            draw = random.Random(f"{config.seed}:{result.index}").sample(range(len(rows)), wanted)
            rows = [rows[i] for i in sorted(draw)]
        out += rows
    return out, drops


def reference_split(table: pa.Table, config: SplitConfig) -> tuple[list[str], list[str]]:
    """Split's rules as they were in memory: (train ids, test ids)."""
    roles, keys, ids = (table.column(c).to_pylist() for c in ("role", "key", "id"))
    if "test" in roles:
        test = [i for i, role in enumerate(roles) if role == "test"]
    else:
        order = list(range(len(ids)))
        n_test = min(len(ids) - 1, max(1, math.ceil(config.test_fraction * len(ids))))
        random.Random(config.seed).shuffle(order)
        test = sorted(order[:n_test])
    test_keys = {keys[i] for i in test}
    train = [i for i in range(len(ids)) if i not in set(test) and keys[i] not in test_keys]
    return [ids[i] for i in train], [ids[i] for i in test]


def write_sources(folder: Path) -> tuple[Path, Path]:
    """A train export with exact and near duplicates, empty answers and a too-long one; a second export that
    repeats some of the first (duplicates across sources) and adds its own rows."""
    rng = random.Random(3)
    records = []
    for i in range(150):
        question, answer = f"How does feature {rng.randint(0, 90)} work?", f"It works in way {i % 40}."
        if i % 13 == 12:
            question = question.upper().replace("?", " ?!")  # the same question after normalisation
        if i % 17 == 16:
            answer = " "
        records.append({"question": question, "answer": "word " * 600 if i == 99 else answer})
    first, second = folder / "a.jsonl", folder / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    more = records[:30:3] + [{"question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in range(40)]
    second.write_text("".join(json.dumps(r) + "\n" for r in more), encoding="utf-8")
    return first, second


def prepare(config: DataConfig, tokenizer, folder: Path, batch_rows: int) -> dict:
    """collect -> template -> tokenize -> validate -> split through the streaming cores, `batch_rows` at a time."""
    folder.mkdir()
    collect_report = collect_to(config, folder / "rows.jsonl", buffer_rows=batch_rows)
    template_file(folder / "rows.jsonl", folder / "templated.jsonl", TemplateConfig())
    tally = tokenize_file(
        folder / "templated.jsonl", folder / "tokens.parquet", tokenizer, TokenizeConfig(max_length=24)
    )
    quality, _ = tokens_quality(collect_report, tally.counts(), folder / "tokens.parquet", batch_rows)
    figures = split_file(folder / "tokens.parquet", folder, SplitConfig(test_fraction=0.2), batch_rows)
    return {"collect": collect_report, "tokenize": tally.counts(), "quality": quality, "split": figures}


@pytest.mark.parametrize("second_role", ["train", "test"], ids=["random split", "fixed test source"])
def test_streamed_preparation_equals_one_batch_and_the_in_memory_rules(tiny_tokenizer, tmp_path: Path, second_role):
    first, second = write_sources(tmp_path)
    config = DataConfig(
        sources=[JsonlSource(path=str(first)), JsonlSource(path=str(second), role=second_role)],
        min_rows=1,
        max_bad_fraction=1.0,
        max_chars=2000,
        max_rows=120 if second_role == "train" else None,
        # exact: repeated questions stay, so the random split has leakage to remove too
        dedupe="exact" if second_role == "train" else "near",
    )
    streamed = prepare(config, tiny_tokenizer, tmp_path / "streamed", batch_rows=3)
    whole = prepare(config, tiny_tokenizer, tmp_path / "whole", batch_rows=BIG)
    assert streamed == whole
    for name in ("rows.jsonl", "templated.jsonl"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    for name in ("tokens.parquet", "train.parquet", "test.parquet"):
        assert pq.read_table(tmp_path / "streamed" / name).equals(pq.read_table(tmp_path / "whole" / name)), name

    # Rows and drops by reason equal the in-memory rules collect kept before streaming.
    rows, drops = reference_collect(config, tmp_path)
    assert read_jsonl(tmp_path / "streamed" / "rows.jsonl") == rows
    assert streamed["collect"]["dropped"] == dict(drops) and drops["duplicate"]
    assert {"empty", "too_long"} <= set(drops) and (drops["near_duplicate"] > 0) == (config.dedupe == "near")
    if second_role == "train":
        assert streamed["collect"]["not_drawn"] > 0, "max_rows must cut, so the draw is exercised"

    # The in-memory helpers are the same cores on one batch.
    templated = template_rows(rows, TemplateConfig())
    table, counts = tokenize_rows(templated, tiny_tokenizer, TokenizeConfig(max_length=24))
    assert table.equals(pq.read_table(tmp_path / "streamed" / "tokens.parquet"))
    assert counts == streamed["tokenize"] and counts["truncated"] > 0
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    assert quality_report(streamed["collect"], counts, columns) == streamed["quality"]
    train, test, figures = split_rows(table, SplitConfig(test_fraction=0.2), batch_rows=3)
    assert figures == streamed["split"]

    # Split membership equals the in-memory rules (seeded shuffle of row numbers, leakage by normalised question).
    train_ids, test_ids = reference_split(table, SplitConfig(test_fraction=0.2))
    streamed_train = pq.read_table(tmp_path / "streamed" / "train.parquet").column("id").to_pylist()
    streamed_test = pq.read_table(tmp_path / "streamed" / "test.parquet").column("id").to_pylist()
    assert (streamed_train, streamed_test) == (train_ids, test_ids)
    assert (train.column("id").to_pylist(), test.column("id").to_pylist()) == (train_ids, test_ids)
    assert figures["leakage_removed"] == table.num_rows - len(train_ids) - len(test_ids) > 0


def test_a_malformed_line_deep_in_a_large_file_is_named(tmp_path: Path):
    path = tmp_path / "large.jsonl"
    good = "".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(20_000))
    path.write_text(good + '{"question": "broken", \n' + good[:200], encoding="utf-8")
    with pytest.raises(DataError, match=r"large\.jsonl:20001: expected a JSON object, found malformed JSON"):
        collect_to(DataConfig(sources=[JsonlSource(path=str(path))]), tmp_path / "rows.jsonl")


def test_parquet_files_are_read_holding_one_row_group_not_every_one_read_so_far(tmp_path: Path):
    # pyarrow's default reader (pre_buffer=True) keeps the compressed bytes of every row group it has read until
    # the file object goes: reading a file batch by batch then costs the file's size (0.35 KiB a row of
    # tokens.parquet). The stages read through `parquet_file`, whose memory is one row group whatever the length.
    rng = np.random.default_rng(0)
    path = tmp_path / "rows.parquet"
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for _ in range(48):  # 48 row groups of 256 KiB that do not compress
            writer.write_table(pa.table({"text": [rng.bytes(4096).hex() for _ in range(32)]}))
    size, reader = path.stat().st_size, parquet_file(path)
    before, held, rows = pa.total_allocated_bytes(), 0, 0
    for batch in reader.iter_batches(batch_size=32):
        held, rows = max(held, pa.total_allocated_bytes() - before), rows + batch.num_rows
    assert rows == 48 * 32 and held < size / 6, (held, size)


def test_training_time_evaluation_uses_a_seeded_capped_subset_in_file_order(tmp_path: Path):
    from tasks.train import training_rows

    ids = [[i, i + 1] for i in range(50)]
    pq.write_table(pa.table({"input_ids": ids, "labels": ids}), tmp_path / "test.parquet")
    subset = training_rows(tmp_path / "test.parquet", 10, seed=1)
    firsts = [row["input_ids"][0] for row in subset]
    assert len(subset) == 10 and firsts == sorted(firsts) and len(set(firsts)) == 10
    assert training_rows(tmp_path / "test.parquet", 10, seed=1) == subset, "the same rows at every evaluation"
    assert training_rows(tmp_path / "test.parquet", 10, seed=2) != subset
    assert training_rows(tmp_path / "test.parquet", 100, seed=1) == training_rows(tmp_path / "test.parquet")


def test_progress_reports_how_far_how_fast_and_the_end():
    lines: list[str] = []
    progress = Progress("tokenize", 10, log=lines.append, every=0)
    progress.advance(3)
    progress.advance(7)
    progress.finish()
    assert lines[0].startswith("tokenize: 3/10 rows (30%), ") and "rows/s, ~" in lines[0]
    assert lines[-1].startswith("tokenize: 10/10 rows (100%)") and lines[-1].endswith("(done)")
    quiet: list[str] = []
    unknown = Progress("collect", log=quiet.append, every=3600)
    unknown.advance(5)
    unknown.finish()
    assert quiet == [quiet[0]] and quiet[0].startswith("collect: 5 rows, ")
