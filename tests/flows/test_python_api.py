"""The three-line Python API runs the same flow: same artifacts, same caching, a report with the model and metrics."""

import json
import os

import pytest

from finetune import FineTuner
from pipeline.config import ConfigError, DocsSource
from pipeline.store import StoreSettings, open_store
from tasks.collect import docs_rows

pytestmark = pytest.mark.flow


@pytest.fixture
def faq(tmp_path):
    """A JSON Lines FAQ with the team's own field names, made from real docstrings."""
    path = tmp_path / "faq.jsonl"
    rows = docs_rows(DocsSource(package="more_itertools", phrasings=1, max_objects=40, offtopic=0), [])
    path.write_text("".join(json.dumps({"prompt_text": r["question"], "reply": r["answer"]}) + "\n" for r in rows))
    return path


def test_three_lines_train_and_evaluate(prefect_harness, faq, tmp_path):
    store = tmp_path / "store"
    ft = FineTuner("tiny-neox", config="configs/tiny.yaml", overrides=[f"store.uri={store}"])
    ft.load_data(faq, input_key="prompt_text", output_key="reply")
    report = ft.train()
    metrics = ft.evaluate()

    assert report.passed is True
    assert set(metrics) == {"base", "fine_tuned", "intervals"} and "eval.similarity_mean" in metrics["fine_tuned"]
    assert metrics["intervals"]["eval.similarity_mean"]["difference"]["n"] > 0
    artifacts = open_store(StoreSettings(uri=str(store)))
    assert artifacts.exists(f"{report.model_uri}/model.safetensors")
    collected = next(e for e in report.stages if e["stage"] == "collect")
    assert collected["meta"]["sources"] == ["jsonl:faq.jsonl"]

    again = FineTuner("tiny-neox", config="configs/tiny.yaml", overrides=[f"store.uri={store}"])
    assert {e["state"] for e in again.load_data(faq, "prompt_text", "reply").train().stages} == {"Cached"}


def test_bad_settings_fail_at_once_not_after_training():
    with pytest.raises(ConfigError, match="train.max_steps"):
        FineTuner("tiny-neox").set(**{"train.max_steps": 0})


def test_credentials_set_through_the_api_stay_out_of_the_parameters(monkeypatch):
    from finetune import FineTuner

    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # recorded, so put back after the test
        monkeypatch.setenv(variable, "placeholder")
    ft = FineTuner("tiny-neox", config="configs/tiny.yaml", overrides=["store.access_key_id=AKIACANARYAPI0000"])
    ft.set(**{"store.secret_access_key": "canary-api-secret"})
    assert not any("canary" in o.lower() for o in ft.overrides), ft.overrides
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "canary-api-secret"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIACANARYAPI0000"
