"""The config tree: every shipped YAML loads, overrides apply, bad values fail with key/expected/found."""

from pathlib import Path

import pytest

from finetune.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml"}


def test_dotted_overrides_apply_with_yaml_types():
    config = load_config(
        None,
        [
            "train.max_steps=7",
            "train.learning_rate=3e-4",
            "benchmark.tasks=[arc_easy, arc_challenge]",
            "data.sources.0.phrasings=2",
        ],
    )
    assert config.train.max_steps == 7
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.benchmark.tasks == ["arc_easy", "arc_challenge"]
    assert config.data.sources[0].phrasings == 2


def test_all_problems_reported_at_once_with_key_expected_found(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 0\n  lerning_rate: 0.1\nsplit:\n  test_fraction: 1.5\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert f"{bad}: train.max_steps: Input should be greater than 0 (found 0)" in message
    assert "train.lerning_rate: unknown key" in message
    assert "split.test_fraction: Input should be less than 1 (found 1.5)" in message


def test_gate_on_unknown_metric_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"gates\.0: expected eval\.<exact_match\|similarity_mean\|.*> or benchmark\.<task>.*found 'eval\.bleu'",
    ):
        load_config(None, ["gates=[{metric: eval.bleu, value: 0.5}]"])


def test_gate_on_task_not_benchmarked_is_a_config_error():
    with pytest.raises(ConfigError, match="names task 'arc_challenge', expected one of benchmark.tasks"):
        load_config(None, ["gates=[{metric: benchmark.arc_challenge.acc, value: 0.1}]"])


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["train.max_steps"])


def test_cli_exits_2_on_config_error_before_any_work(tmp_path, capsys):
    code = main(
        ["run", "--config", "configs/tiny.yaml", "--set", "train.max_steps=-1", "--set", f"store.uri={tmp_path}/store"]
    )
    assert code == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_cli_exits_2_on_missing_config_file(capsys):
    assert main(["validate", "--config", "does/not/exist.yaml"]) == 2
    assert "does/not/exist.yaml: config file not found" in capsys.readouterr().err
