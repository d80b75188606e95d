"""model.dtype and train.method=qlora: the default keeps every content key's config, bad combinations fail at
load time naming both keys, what a machine lacks (CUDA, bitsandbytes, float16 kernels) fails before any work with
exit code 2, and autocast follows 16-bit weights."""

import importlib.util

import pytest

from finetune.cli import main
from finetune.probe import pipeline_dtypes
from pipeline.config import ConfigError, ModelConfig, TrainConfig, load_config
from pipeline.models import MissingRequirement, UnsupportedPrecision, check_training_device, training_precision
from pipeline.refs import content_key


def test_the_default_dtype_leaves_the_model_section_and_its_keys_unchanged():
    # Stages hash the model section: at the default float32 it must dump exactly as before the field existed.
    assert ModelConfig().model_dump(mode="json") == {"name": "smollm2-135m-instruct", "trust_remote_code": False}
    before = {"model": {"name": "tiny-neox", "trust_remote_code": False}}
    assert content_key("train", "v", {"model": ModelConfig(name="tiny-neox")}) == content_key("train", "v", before)
    assert content_key("train", "v", {"model": ModelConfig(name="tiny-neox", dtype="bfloat16")}) != content_key(
        "train", "v", before
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.dtype=float16"],
            r"model\.dtype=float16 with train\.method=full: .*expected train\.method lora or qlora",
        ),
        (
            ["model.dtype=bfloat16", "train.dtype=float16"],
            r"train\.dtype=float16 over model\.dtype=bfloat16 weights: expected train\.dtype auto, float32 or bfloat16",
        ),
        (["model.dtype=fp8"], r"model\.dtype: Input should be 'float32', 'bfloat16' or 'float16' \(found 'fp8'\)"),
        (["train.method=qlora4"], r"train\.method: Input should be 'full', 'lora' or 'qlora'"),
    ],
)
def test_combinations_that_cannot_train_fail_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", overrides)


def test_autocast_follows_16_bit_weights():
    assert training_precision("auto", "cpu") == "fp32"  # float32 weights on a CPU: as before
    assert training_precision("auto", "cpu", "bfloat16") == "bf16"
    assert training_precision("float32", "cpu", "bfloat16") == "fp32"  # pure bfloat16, no autocast
    with pytest.raises(UnsupportedPrecision, match="model.dtype: float16 needs a CUDA GPU, found device 'cpu'"):
        training_precision("auto", "cpu", "float16")


def test_bfloat16_trains_on_a_cpu_but_float16_does_not():
    check_training_device(ModelConfig(dtype="bfloat16"), TrainConfig(), "cpu")
    with pytest.raises(UnsupportedPrecision, match=r"model\.dtype: float16 needs a CUDA GPU, found device 'cpu'"):
        check_training_device(ModelConfig(dtype="float16"), TrainConfig(method="lora"), "cpu")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_qlora_names_both_requirements_this_machine_lacks():
    with pytest.raises(MissingRequirement) as error:
        check_training_device(ModelConfig(dtype="bfloat16"), TrainConfig(method="qlora"), "cpu")
    message = str(error.value)
    assert "train.method: qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels), found device 'cpu'" in message
    assert "needs the bitsandbytes package, found it not installed" in message
    assert "pip install -e '.[qlora]' (bitsandbytes>=0.46.1)" in message
    # On a CUDA machine without the package only the package is missing.
    with pytest.raises(MissingRequirement) as on_gpu:
        check_training_device(ModelConfig(dtype="bfloat16"), TrainConfig(method="qlora"), "cuda")
    assert "CUDA GPU" not in str(on_gpu.value) and "bitsandbytes package" in str(on_gpu.value)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and __import__("torch").cuda.is_available(),
    reason="this machine can run QLoRA",
)
def test_run_refuses_qlora_here_before_any_work(tmp_path, capsys):
    store = tmp_path / "store"
    code = main(
        [
            "run",
            "--config",
            "configs/tiny.yaml",
            "--set",
            "train.method=qlora",
            "--set",
            "model.dtype=bfloat16",
            "--set",
            f"store.uri={store}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:\nconfigs/tiny.yaml: train.method: qlora needs")
    assert not store.exists()  # nothing ran, nothing was written


def test_the_probe_trains_what_the_planner_assumed():
    assert pipeline_dtypes("float32") == ("float32", "float32")
    assert pipeline_dtypes("mixed") == ("float32", "bfloat16")
    assert pipeline_dtypes("bfloat16") == ("bfloat16", "auto")
