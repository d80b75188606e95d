"""The `placement` section and the placed stage's parameters, without a server: config errors name their keys,
credentials never become parameters or job variables, and a stage's parameters survive the trip to another pool
as JSON with the same content key. The runs on real pools are tests/integration/test_placement.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import PLACEABLE_STAGES, ConfigError, load_config
from pipeline.refs import Ref

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
S3 = ["store.uri=s3://bucket/runs"]


def test_a_placed_stage_needs_an_s3_store_and_the_error_names_both_keys():
    with pytest.raises(ConfigError) as error:
        load_config(TINY, ["placement.train.work_pool=gpu"])
    message = str(error.value)
    assert "placement.train" in message and "store.uri='./artifacts'" in message and "s3://" in message
    placed = load_config(TINY, [*S3, "placement.train.work_pool=gpu"]).placement
    assert list(placed.placed) == ["train"] and placed.of("evaluate") is None
    assert placed.train.limits == ["gpu"] and placed.train.slots == 1  # the default limit


def test_no_placement_places_nothing():
    assert load_config(TINY).placement.placed == {}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("placement.trian.work_pool=gpu", "placement.trian: unknown key (did you mean 'train'?)"),
        ("placement.train.pool=gpu", "placement.train.pool: unknown key (did you mean 'work_pool'?)"),
        ("placement.train.slots=0", "placement.train.slots"),
        ("placement.train.concurrency_limit=['gpu', ' ']", "expected concurrency limit names"),
    ],
)
def test_bad_placement_keys_are_named(override: str, expected: str):
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [*S3, "placement.train.work_pool=gpu", override])
    assert expected in str(error.value)


def test_clear_text_credentials_in_job_variables_are_refused_without_showing_them():
    secret = "sEcReT-not-to-be-shown-42"
    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            [*S3, "placement.train.work_pool=gpu", f"placement.train.job_variables={{env: {{HF_TOKEN: {secret}}}}}"],
        )
    message = str(error.value)
    assert "placement.train.job_variables" in message and "env.HF_TOKEN" in message and secret not in message
    # A Prefect Secret block reference is fine: the worker resolves it, only the reference is stored.
    reference = "{{ prefect.blocks.secret.s3-secret-key }}"
    cfg = load_config(
        TINY,
        [
            *S3,
            "placement.train.work_pool=gpu",
            f"placement.train.job_variables={{env: {{AWS_SECRET_ACCESS_KEY: '{reference}', CUDA_VISIBLE_DEVICES: '0'}}}}",
        ],
    )
    assert cfg.placement.train.job_variables["env"]["AWS_SECRET_ACCESS_KEY"] == reference


def test_stage_parameters_travel_as_json_without_credentials_and_keep_the_key():
    from flows.placed import STAGE_TASKS, bound_parameters, decode_parameters, encode_parameters
    from pipeline.stage import open_stage
    from tasks.benchmark import BenchmarkSample

    assert tuple(STAGE_TASKS) == PLACEABLE_STAGES
    cfg = load_config(
        TINY,
        [
            *S3,
            "store.access_key_id=AKIACANARY0000",
            "store.secret_access_key=canary-secret-key-1",
            "store.cache_dir=/somewhere/on/this/machine",
        ],
    )
    split = Ref(kind="split", uri="split/0a1b", sha256="1" * 64, meta={"train_rows": 3})
    tuned = Ref(kind="train", uri="train/2c3d", sha256="2" * 64, meta={"alias": "x"})
    sample = BenchmarkSample(task="arc_easy", seed=0, start=0, end=8)
    calls = {
        "train": dict(split_data=split, config=cfg.train, model=cfg.model, template=cfg.template, store=cfg.store),
        "evaluate": dict(
            split_data=split, config=cfg.eval, model=cfg.model, tuned=None, template=cfg.template, store=cfg.store
        ),
        "benchmark": dict(sample=sample, model=cfg.model, tuned=tuned, store=cfg.store),
    }
    for stage, parameters in calls.items():
        task = STAGE_TASKS[stage]
        sent = json.dumps(encode_parameters(task, bound_parameters(task, parameters)))
        assert "canary" not in sent.lower() and "/somewhere" not in sent, sent
        received = decode_parameters(task, json.loads(sent))
        here, there = (
            open_stage(stage, task.version, bound_parameters(task, parameters)),
            open_stage(stage, task.version, received),
        )
        try:
            assert here.uri == there.uri, stage  # the same content key on the other pool
        finally:
            here.discard()
            there.discard()
        assert received["store"].uri == "s3://bucket/runs" and received["store"].secret_access_key is None
    with pytest.raises(ValueError, match="expected the parameters"):
        decode_parameters(STAGE_TASKS["train"], {"split_data": split.model_dump(mode="json")})


def test_stage_deployments_keep_the_contract():
    """deployments/stages.yaml: one deployment per placeable stage, named after it, of flows/placed.py:placed_stage
    (flow name finetune-stage), no credentials anywhere."""
    from flows.placed import ENTRYPOINT, FLOW_NAME, deployment_name, placed_stage

    assert placed_stage.name == FLOW_NAME == "finetune-stage"
    assert deployment_name("train") == "finetune-stage/train"
    spec = yaml.safe_load((REPO / "deployments" / "stages.yaml").read_text())
    assert [d["name"] for d in spec["deployments"]] == list(PLACEABLE_STAGES)
    assert {d["entrypoint"] for d in spec["deployments"]} == {ENTRYPOINT} == {"flows/placed.py:placed_stage"}
    assert all(d["parameters"] == {} for d in spec["deployments"])


def test_team_configs_load_and_take_a_share_of_the_shared_gpu_limit():
    """deployments/teams/: one config per team, each its own store prefix and a slot of `gpu` and its own limit;
    deployments/teams.yaml: one scheduled deployment per team config."""
    spec = yaml.safe_load((REPO / "deployments" / "teams.yaml").read_text())
    prefixes = set()
    for deployment in spec["deployments"]:
        config = deployment["parameters"]["config_path"]
        team = Path(config).stem
        cfg = load_config(REPO / config)
        prefixes.add(cfg.store.uri)
        assert cfg.store.uri.startswith("s3://") and cfg.store.uri.endswith(f"/{team}")
        assert cfg.placement.train.limits == ["gpu", f"gpu-{team}"]
        assert deployment["schedules"] and deployment["entrypoint"] == "flows/finetune.py:finetune"
    assert len(prefixes) == len(spec["deployments"]) == 2
