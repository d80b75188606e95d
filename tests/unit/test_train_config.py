"""TrainConfig: the seeds' values are the defaults, the demo configs keep theirs, bad values fail before any work,
and the config reaches the Trainer's arguments unchanged."""

import pytest

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.models import UnsupportedPrecision, training_precision
from pipeline.refs import content_key
from tasks.train import train, training_arguments


def test_defaults_are_the_seeds_values():
    config = TrainConfig()
    assert (config.learning_rate, config.epochs, config.max_steps) == (1e-5, 1.0, None)
    assert (config.batch_size, config.gradient_accumulation_steps, config.optim) == (1, 4, "adafactor")
    assert (config.warmup_steps, config.eval_steps, config.save_steps, config.logging_steps) == (1, 120, 120, 1)
    assert config.best_model_at_end and config.save_total_limit == 1
    assert (config.method, config.dtype, config.gradient_checkpointing, config.num_processes) == (
        "full",
        "auto",
        False,
        1,
    )


@pytest.mark.parametrize(
    "path, expected",
    [
        (
            "configs/default.yaml",
            dict(
                max_steps=60,
                learning_rate=3e-5,  # 5e-5 forgot ARC-Easy (configs/default.yaml says how this was chosen)
                batch_size=8,
                gradient_accumulation_steps=1,
                optim="adamw_torch_fused",
                warmup_steps=5,
            ),
        ),
        (
            "configs/tiny.yaml",
            dict(
                max_steps=4,
                learning_rate=1e-3,
                batch_size=8,
                gradient_accumulation_steps=1,
                optim="adamw_torch",
                warmup_steps=0,
            ),
        ),
    ],
)
def test_demo_configs_keep_the_values_they_were_tuned_with(path, expected):
    train = load_config(path).train
    assert {key: getattr(train, key) for key in expected} == expected


@pytest.mark.parametrize("steps", [0, -5])
def test_max_steps_zero_or_negative_is_a_config_error(steps):
    with pytest.raises(ConfigError, match=rf"train\.max_steps: Input should be greater than 0 \(found {steps}\)"):
        load_config(None, [f"train.max_steps={steps}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lora.r=0", r"train\.lora\.r: Input should be greater than 0"),
        ("train.lora.dropout=1.0", r"train\.lora\.dropout: Input should be less than 1"),
        ("train.lora.target_modules=[]", r"train\.lora\.target_modules: List should have at least 1 item"),
        ("train.method=adapters", r"train\.method: Input should be 'full', 'lora' or 'qlora'"),
        ("train.dtype=float8", r"train\.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_bad_training_values_name_key_and_expectation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_checkpoints_must_line_up_with_evaluations_for_the_best_model():
    with pytest.raises(
        ConfigError, match=r"train: expected save_steps to be a multiple of eval_steps \(20\).*found save_steps=30"
    ):
        load_config(None, ["train.eval_steps=20", "train.save_steps=30"])
    assert load_config(None, ["train.eval_steps=20", "train.save_steps=30", "train.best_model_at_end=false"])


def test_dataset_name_is_not_part_of_the_content_key():
    one, other = TrainConfig(dataset_name="faq"), TrainConfig(dataset_name="docs")
    version = train.version  # the train stage's code version (pipeline.code_version)
    assert content_key("train", version, {"config": one}) == content_key("train", version, {"config": other})
    three_steps = TrainConfig(max_steps=3)
    assert content_key("train", version, {"config": one}) != content_key("train", version, {"config": three_steps})


def test_trainer_arguments_carry_the_config(tmp_path):
    args = training_arguments(TrainConfig(), str(tmp_path), "cpu", "fp32")
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (1e-5, 1.0, -1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.optim.value) == (1, 4, "adafactor")
    assert (args.warmup_steps, args.eval_steps, args.save_steps, args.logging_steps) == (1, 120, 120, 1)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert args.save_total_limit == 1 and args.seed == 42 and args.include_num_input_tokens_seen == "non_padding"
    tuned = training_arguments(
        TrainConfig(max_steps=7, gradient_checkpointing=True, num_processes=2), str(tmp_path), "cpu", "bf16"
    )
    assert tuned.max_steps == 7 and tuned.bf16 and tuned.ddp_backend is None  # gloo only inside a torchrun launch
    assert getattr(tuned, "activation_checkpointing", None) or tuned.gradient_checkpointing


def test_precision_follows_the_device():
    assert training_precision("auto", "cpu") == "fp32"
    assert training_precision("bfloat16", "cpu") == "bf16"
    with pytest.raises(UnsupportedPrecision, match="float16 needs a CUDA GPU, found device 'cpu'"):
        training_precision("float16", "cpu")
