"""A passing run hands its model over: a model card next to it in the store whose every figure equals the artifact
it came from, and `finetune export` writing a self-contained folder that loads offline and still prompts as
training did.

One tiny flow run (configs/tiny.yaml passes its gate) against a fresh store: the session's `tiny_run`, which the
tests here only read (exports go to folders of their own).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from finetune.cli import main
from pipeline.models import IGNORE_INDEX, LATEST_PASSING
from pipeline.store import StoreSettings, open_store

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def passing_run(tiny_run):
    """(store folder, store, run summary) of one passing tiny run: the session's (tests/conftest.py)."""
    assert tiny_run.summary["passed"] is True
    return tiny_run.store, open_store(StoreSettings(uri=str(tiny_run.store))), tiny_run.summary


def _artifact_json(store, summary, stage: str, name: str, last: bool = False):
    """A JSON file of the run's artifact for `stage` (label prefix), read from its hash-verified folder."""
    entries = [e for e in summary["stages"] if e["stage"].startswith(stage)]
    entry = entries[-1] if last else entries[0]
    return json.loads((store.fetch(store.open_ref(entry["uri"])) / name).read_text(encoding="utf-8"))


def _sections(card: str) -> tuple[dict, dict[str, str]]:
    """(YAML metadata, {section heading: its text}) of a model card."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, flags=re.S)
    assert match, "the card does not start with YAML metadata between --- lines"
    parts = re.split(r"^## (.+)$", match.group(2), flags=re.M)
    return yaml.safe_load(match.group(1)), dict(zip(parts[1::2], parts[2::2]))


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: its rows (header and separator left out), each a list of cells."""
    tables, current = [], None
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current = [*(current or []), [cell.strip() for cell in line.strip().strip("|").split(" | ")]]
        elif current is not None:
            tables.append(current[2:])
            current = None
    return tables


def _fig(cell: str, value) -> bool:
    """The card's cell shows `value`: an integer exactly, a float to the 6 decimals the card keeps."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return cell == str(value)
    if isinstance(value, int):
        return cell == str(value)
    return float(cell) == round(float(value), 6)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


@pytest.fixture(scope="module")
def card(passing_run):
    _, store, summary = passing_run
    return store.get_bytes(summary["card"]).decode("utf-8")


def test_the_card_sits_next_to_the_model_which_stays_untouched(passing_run, card):
    _, store, summary = passing_run
    train_uri = summary["model_uri"].rsplit("/", 1)[0]
    assert summary["card"] == f"cards/{train_uri.split('/')[1]}/README.md"
    assert json.loads(store.get_bytes(LATEST_PASSING))["card"] == summary["card"]
    assert store.is_intact(train_uri)  # every file still matches the manifest it was committed with
    assert "README.md" not in json.dumps(store.read_manifest(train_uri)["files"])
    facts = json.loads(store.get_bytes(summary["card"].replace("README.md", "card.json")))
    assert facts["train_uri"] == train_uri and facts["model_uri"] == summary["model_uri"]


def test_the_card_metadata_is_hugging_face_model_card_yaml(passing_run, card):
    _, store, summary = passing_run
    metadata, sections = _sections(card)
    collect_report = _artifact_json(store, summary, "collect", "report.json")
    assert metadata["base_model"] == "tiny-neox"
    assert metadata["library_name"] == "transformers"
    assert {"finetune-pipeline", "template-qa", "full-fine-tune"} <= set(metadata["tags"])
    assert metadata["datasets"] == [source["source"] for source in collect_report["sources"]]
    train_report = _artifact_json(store, summary, "train", "report.json")
    assert f"\n# {train_report['alias']}\n" in card
    assert list(sections) == [
        "Intended use and limits",
        "Training data",
        "Training",
        "Evaluation",
        "How to use",
        "Lineage",
    ]
    assert "raises an error for a system message or several turns" in sections["Intended use and limits"]
    assert f"finetune serve {train_report['alias']}" in sections["How to use"]


def test_every_figure_in_the_card_equals_the_artifact_it_came_from(passing_run, card):
    store_dir, store, summary = passing_run
    _, sections = _sections(card)
    collect_report = _artifact_json(store, summary, "collect", "report.json")
    tokenize_report = _artifact_json(store, summary, "tokenize", "report.json")
    quality = _artifact_json(store, summary, "validate", "quality.json")
    train_config = _artifact_json(store, summary, "train", "train_config.json")
    train_report = _artifact_json(store, summary, "train", "report.json")
    verdicts = _artifact_json(store, summary, "gate", "verdicts.json", last=True)
    metrics = _artifact_json(store, summary, "gate", "metrics.json", last=True)
    pointer = json.loads(store.get_bytes(LATEST_PASSING))

    sources, data = _tables(sections["Training data"])
    assert sources == [
        [s["source"], s["role"], s["schema"], str(s["rows_read"]), str(s["rows_kept"]), _counts(s["dropped"])]
        for s in collect_report["sources"]
    ]
    data = dict(data)
    expected = {
        "rows read": collect_report["rows_read"],
        "rows kept by collect": collect_report["rows"],
        "not drawn (source weights)": collect_report["not_drawn"],
        "rows kept by tokenize": tokenize_report["rows"],
        "truncated": tokenize_report["truncated"],
        "dropped share": quality["dropped_share"],
        "duplicate rate": quality["duplicate_rate"],
    }
    assert all(_fig(data[name], value) for name, value in expected.items()), (data, expected)
    assert data["dropped by collect"] == _counts(collect_report["dropped"])
    assert data["dropped by tokenize"] == _counts(tokenize_report["dropped"])
    assert data["rows by role"] == ", ".join(f"{r}: {n}" for r, n in quality["rows_by_role"].items())
    assert len(data) == len(expected) + 3

    (training,) = _tables(sections["Training"])
    assert training and all(_fig(value, train_report[name]) for name, value in training), training
    block = re.search(r"```yaml\n(.*?)```", sections["Training"], flags=re.S).group(1)
    assert yaml.safe_load(block) == train_config["train"]

    gates, points, benchmarks = _tables(sections["Evaluation"])
    assert len(gates) == len(verdicts["verdicts"]) >= 1
    for row, verdict in zip(gates, verdicts["verdicts"]):
        name, estimate, low, high, n, confidence, method, decision = row
        assert name == verdict["gate"] and method == verdict["method"] and decision == verdict["decision"]
        for cell, key in ((estimate, "estimate"), (low, "low"), (high, "high"), (n, "n"), (confidence, "confidence")):
            assert _fig(cell, verdict[key]), (key, cell, verdict[key])
    assert [row[0] for row in points] == list(metrics["fine_tuned"])
    for metric, base, tuned in points:
        assert _fig(base, metrics["base"][metric]) and _fig(tuned, metrics["fine_tuned"][metric]), metric
    tuned_benchmarks = [e for e in summary["stages"] if e["stage"].startswith("benchmark (fine-tuned")]
    assert len(benchmarks) == len(tuned_benchmarks)
    for row, entry in zip(benchmarks, tuned_benchmarks):
        results = json.loads((store.fetch(store.open_ref(entry["uri"])) / "results.json").read_text())
        task, figures = next(iter(results["tasks"].items()))
        sample = results["sample"]
        assert row == [
            task,
            f"{sample['start']}-{sample['end']}",
            str(figures["n_samples"]),
            str(figures["num_fewshot"]),
            figures["dataset"],
            results["lm_eval_version"],
        ]

    lineage, stages = _tables(sections["Lineage"])
    assert dict(lineage) == {
        "store": f"`{store.uri}`",
        "model": f"`{summary['model_uri']}`",
        "config": "`configs/tiny.yaml`",
        "overrides": f"`store.uri={store_dir}`",
        "flow run": f"`{pointer['flow_run_id']}`",
        "round": "1",
    }
    assert pointer["flow_run_id"]
    assert [row[0] for row in stages] == [e["stage"] for e in summary["stages"]]
    for (_, uri, sha256), entry in zip(stages, summary["stages"]):
        assert uri == f"`{entry['uri']}`" and sha256 == f"`{store.open_ref(entry['uri']).sha256}`"


# --------------------------------------------------------------------------- finetune export


def _export(store_dir: Path, *args: str) -> int:
    return main(["export", *args, "--config", "configs/tiny.yaml", "--set", f"store.uri={store_dir}"])


@pytest.fixture(scope="module")
def exported(passing_run, tmp_path_factory):
    store_dir, _, _ = passing_run
    folder = tmp_path_factory.mktemp("exported") / "model"
    assert _export(store_dir, "latest-passing", "--to", str(folder)) == 0
    return folder


def test_export_writes_a_self_contained_folder(passing_run, exported, card):
    store_dir, store, summary = passing_run
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja", "README.md"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pkl", "manifest.json"))}
    assert (exported / "README.md").read_text(encoding="utf-8") == card
    for path in exported.iterdir():  # no path back into the store or this machine's caches
        if path.suffix in (".json", ".jinja"):
            text = path.read_text(encoding="utf-8")
            assert str(store_dir) not in text and ".cache" not in text, path.name
    stored = store.fetch(store.open_ref(summary["model_uri"].rsplit("/", 1)[0])) / "model" / "model.safetensors"
    original, copied = load_file(stored), load_file(exported / "model.safetensors")
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)


def test_the_exported_folder_loads_offline_and_prompts_as_training_did(passing_run, exported):
    _, store, summary = passing_run
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert GenerationConfig.from_pretrained(exported).eos_token_id == tokenizer.eos_token_id
    tokens = next(e for e in summary["stages"] if e["stage"] == "tokenize")
    rows = pq.read_table(store.fetch(store.open_ref(tokens["uri"])) / "tokens.parquet").to_pylist()
    for row in rows[:25]:
        prompt = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=True
        )
        assert list(encoded["input_ids"]) == prompt, row["question"]
    with torch.no_grad():
        assert model(torch.tensor([prompt])).logits.shape[-1] == model.config.vocab_size


def test_export_casts_to_the_asked_dtype(passing_run, tmp_path):
    store_dir, _, _ = passing_run
    assert _export(store_dir, "latest-passing", "--to", str(tmp_path / "bf16"), "--dtype", "bf16") == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["latest-passing", "--adapter-only"], "expected a LoRA adapter, found none"),
        (["no_such_model_1_steps_20000101T000000Z"], "Trained models in the store"),
    ],
)
def test_export_refuses_what_it_cannot_write(passing_run, tmp_path, capsys, args, message):
    store_dir, _, _ = passing_run
    assert _export(store_dir, *args, "--to", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_never_writes_over_a_folder(passing_run, tmp_path, capsys):
    store_dir, _, _ = passing_run
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert _export(store_dir, "latest-passing", "--to", str(tmp_path / "busy")) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".busy-partial-")]
