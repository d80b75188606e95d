"""The data stages as real Prefect tasks: a CSV with a byte-order mark and ';' is read, the data stages write the
quality report, and the quality gate stops a run whose rows are cut away.

Bad data files are refused by the collect stage itself in tests/unit/test_collect_bad_input.py (no Prefect
needed); `finetune run` exiting 2 on them, once per kind of error, is tests/reliability/test_bad_input.py.
"""

import gzip
import json

import pytest

from pipeline.config import StoreConfig, load_config
from pipeline.rows import DataError
from pipeline.store import open_store
from tasks.collect import collect, source_fingerprints
from tasks.split import split
from tasks.template import template
from tasks.tokenize import tokenize
from tasks.validate import validate

pytestmark = [
    pytest.mark.flow,
    # the stage tasks run here on their own, outside a flow run, which Prefect's log handler remarks on
    pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning"),
]

GOOD = [{"question": f"What does function number {i} do?", "answer": f"It returns {i}."} for i in range(30)]


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(folder, name, content):
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def test_csv_with_bom_and_semicolons_is_read(prefect_harness, tmp_path):
    rows = "".join(f'{r["question"]};"{r["answer"]}; really"\n' for r in GOOD)
    path = write(tmp_path, "faq.csv", ("\ufeffquestion;answer\n" + rows).encode("utf-8"))
    config = load_config(None, [f"data.sources=[{{kind: file, path: '{path}'}}]"])
    ref = collect(config=config.data, store=StoreConfig(uri=str(tmp_path / "store")))
    assert ref.meta["rows"] == 30 and ref.meta["dropped"] == {}
    first = json.loads(
        (open_store(StoreConfig(uri=str(tmp_path / "store"))).fetch(ref) / "rows.jsonl").read_text().splitlines()[0]
    )
    assert first["question"] == GOOD[0]["question"] and first["answer"] == "It returns 0.; really"


def data_stages(config, store):
    """collect -> template -> tokenize -> validate -> split as the flow runs them; out: the Refs by stage."""
    collected = collect(config=config.data, store=store, fingerprints=source_fingerprints(config.data))
    templated = template(collected=collected, config=config.template, model=config.model, store=store)
    tokenized = tokenize(templated=templated, config=config.tokenize, model=config.model, store=store)
    validated = validate(collected=collected, tokenized=tokenized, config=config.data, store=store)
    return {
        "collect": collected,
        "validate": validated,
        "split": split(tokenized=tokenized, config=config.split, store=store),
    }


def test_data_stages_write_the_quality_report_and_remove_leakage(prefect_harness, tmp_path):
    from prefect.artifacts import Artifact

    train = write(
        tmp_path, "train.jsonl.gz", gzip.compress(jsonl(GOOD + GOOD[:2] + [{"question": "?", "answer": " "}]).encode())
    )
    test = write(tmp_path, "test.jsonl", jsonl(GOOD[:3]))
    config = load_config("configs/tiny.yaml", [f"data.sources=[{{path: '{train}'}}, {{path: '{test}', role: test}}]"])
    store = StoreConfig(uri=str(tmp_path / "store"))
    refs = data_stages(config, store)
    quality = json.loads((open_store(store).fetch(refs["validate"]) / "quality.json").read_text())
    assert quality["dropped"] == {"duplicate": 2, "empty": 1} and quality["rows_by_role"] == {"train": 30, "test": 3}
    assert quality["tokens"]["answer"]["count"] == 33
    assert quality["top_answers"] == [{"text": f"It returns {i}.", "count": 2} for i in range(3)]  # train + test
    assert (open_store(store).fetch(refs["validate"]) / "token_lengths.png").stat().st_size > 1000
    assert refs["split"].meta["leakage_removed"] == 3 and refs["split"].meta["test_rows"] == 3
    assert "| reason | rows | example |" in Artifact.get("data-quality").data
    edited = write(tmp_path, "test.jsonl", jsonl(GOOD[:4]))
    config = load_config("configs/tiny.yaml", [f"data.sources=[{{path: '{train}'}}, {{path: '{edited}', role: test}}]"])
    assert data_stages(config, store)["split"].meta["test_rows"] == 4, "an edited file is collected again, not Cached"


def test_quality_gate_stops_a_run_whose_answers_are_cut_away(prefect_harness, tmp_path):
    long_questions = [{**r, "question": r["question"] * 20} for r in GOOD[:15]]
    path = write(tmp_path, "faq.jsonl", jsonl(long_questions + GOOD[15:]))
    config = load_config(
        "configs/tiny.yaml",
        [f"data.sources=[{{path: '{path}'}}]", "tokenize.max_length=32", "tokenize.truncation_side=right"],
    )
    store = StoreConfig(uri=str(tmp_path / "store"))
    with pytest.raises(DataError, match=r"found 15 of 30 \(50%\) after collect and tokenize:\n  answer_truncated: 15"):
        data_stages(config, store)
    artifacts = open_store(store)
    assert artifacts.list("tokenize") and artifacts.list("validate") == [] and artifacts.list("split") == []
