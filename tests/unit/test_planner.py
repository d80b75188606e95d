"""The memory planner: sizes parse as promised, parameter counts are exact, the seeds' table holds
(one 16 GB V100: a 7B model for inference, only about a 1B model for full fine-tuning), and the activation
count matches what autograd saves. The estimate against measured peaks is in
tests/integration/test_planner_measured.py (it trains real models)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from finetune.cli import main
from pipeline.planner import (
    PlannerError,
    TrainingSetup,
    activation_values_per_token,
    estimate_training,
    format_plan,
    make_plan,
    model_shape,
    parse_memory,
)

GB, GiB = 10**9, 2**30
# Llama-2-7B and TinyLlama-1.1B dimensions (their hub config.json files), built here without the hub.
LLAMA_7B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
)
TINYLLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
)


@pytest.fixture(scope="module")
def llama_7b():
    return model_shape(LlamaConfig(**LLAMA_7B), name="llama-2-7b")


@pytest.fixture(scope="module")
def tinyllama_1b():
    return model_shape(LlamaConfig(**TINYLLAMA_1B), name="tinyllama-1.1b")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GB", 16 * GB),
        ("16GiB", 16 * GiB),
        ("24G", 24 * GiB),
        ("512MiB", 512 * 2**20),
        ("1.5 TB", 1_500_000_000_000),
        ("2048", 2048),
        ("16gb", 16 * GB),
    ],
)
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_a_bad_memory_size_says_what_is_accepted():
    with pytest.raises(PlannerError, match=r"expected a number with an optional unit like 16GB.*found '16XB'"):
        parse_memory("16XB")


def test_parameter_counts_are_exact(llama_7b, tinyllama_1b):
    assert llama_7b.parameters == 6_738_415_616  # Llama-2-7B
    assert tinyllama_1b.parameters == 1_100_048_384  # TinyLlama-1.1B
    pythia = model_shape(
        GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
            rotary_pct=0.25,
        )
    )
    assert pythia.parameters == 70_426_624  # Pythia-70m (docs/assets.md)
    assert llama_7b.gated_mlp and not pythia.gated_mlp


def test_lora_trainable_parameters_match_peft():
    # The pipeline's LoRA (q, k, v, o at r=8) on SmolLM2-135M trains 921,600 parameters (peft's count in a real run).
    setup = TrainingSetup(method="lora", lora_r=8)
    assert estimate_training(model_shape("smollm2-135m-instruct"), setup).trainable_parameters == 921_600
    assert estimate_training(model_shape("tiny-neox"), setup).trainable_parameters == 4_096


def test_a_config_json_path_works(tmp_path):
    LlamaConfig(**TINYLLAMA_1B).save_pretrained(tmp_path)
    assert model_shape(tmp_path / "config.json").parameters == 1_100_048_384


# --------------------------------------------------------------------------- the seeds' table


def test_7b_inference_fits_a_16gb_v100_in_fp16(llama_7b):
    plan = make_plan(
        llama_7b, TrainingSetup(batch_size=1, seq_len=512), parse_memory("16GB"), inference_dtype="float16"
    )
    assert plan.inference_fits
    assert 12.5 * GiB < plan.inference.total < 13.5 * GiB  # 13.5 GB of weights plus a small KV cache


def test_7b_full_fine_tuning_with_adamw_does_not_fit(llama_7b):
    plan = make_plan(
        llama_7b, TrainingSetup(method="full", optimizer="adamw", precision="bfloat16"), parse_memory("16GB")
    )
    assert not plan.training_fits
    assert plan.training.total > 3 * parse_memory(
        "16GB"
    )  # 2 (weights) + 2 (gradients) + 4 (moments) bytes per parameter
    assert {o.changes[0].name for o in plan.single_changes if o.fits} == set()  # no single change is enough
    assert "LoRA" in [c.name for c in plan.fewest_changes.changes]


def test_1b_full_fine_tuning_with_adamw_fits(tinyllama_1b):
    # The seeds' "about 1B" assumes 16-bit weights; in float32 the same run needs about 18 GB.
    setup = TrainingSetup(method="full", optimizer="adamw", precision="bfloat16", batch_size=1, seq_len=512)
    assert make_plan(tinyllama_1b, setup, parse_memory("16GB")).training_fits
    in_float32 = make_plan(tinyllama_1b, TrainingSetup(method="full", precision="float32"), parse_memory("16GB"))
    assert not in_float32.training_fits
    fixes = {o.changes[0].name: o for o in in_float32.single_changes}
    assert fixes["LoRA"].fits and fixes["LoRA"].estimate.total < in_float32.training.total / 2


def test_the_advice_names_pipeline_settings(llama_7b):
    text = format_plan(make_plan(llama_7b, TrainingSetup(batch_size=4, seq_len=1024), parse_memory("16GB")))
    assert "DOES NOT FIT" in text and "train.method=lora" in text and "train.gradient_checkpointing=true" in text
    assert "not a pipeline setting" not in text


def test_a_7b_model_on_a_16gb_card_is_told_to_set_model_dtype(llama_7b):
    # float32 weights alone (27 GB) exceed the card, so every plan that fits loads them in 16-bit: model.dtype.
    plan = make_plan(llama_7b, TrainingSetup(method="lora", seq_len=512), parse_memory("16GB"))
    assert not plan.training_fits
    fewest = plan.fewest_changes
    assert "model.dtype=bfloat16" in [c.setting for c in fewest.changes]
    assert fewest.setup.precision == "bfloat16" and fewest.fits
    alone = {o.changes[0].setting: o for o in plan.single_changes}
    assert not any(o.fits for setting, o in alone.items() if setting != "model.dtype=bfloat16")
    assert alone["model.dtype=bfloat16"].estimate.total < plan.training.total / 1.8
    assert "\n  model.dtype=bfloat16" in format_plan(plan)


def test_the_estimate_follows_the_weights_dtype(tinyllama_1b):
    # The planner's precision is what model.dtype and train.dtype configure (finetune.probe.pipeline_dtypes):
    # 16-bit weights halve weights and gradients, and AdamW's moments, which torch keeps in the weights' dtype.
    in_32, in_16 = (
        estimate_training(tinyllama_1b, TrainingSetup(precision=precision, seq_len=128))
        for precision in ("float32", "bfloat16")
    )
    for part in ("weights", "gradients", "optimizer state"):
        assert in_16.components[part] * 2 == in_32.components[part], part
    mixed = estimate_training(tinyllama_1b, TrainingSetup(precision="mixed", seq_len=128))
    assert mixed.components["weights"] == 1.5 * in_32.components["weights"]  # float32 weights + 16-bit copies


def test_lora_checkpointing_and_smaller_batches_shrink_the_estimate(tinyllama_1b):
    base = TrainingSetup(batch_size=8, seq_len=1024)
    full = estimate_training(tinyllama_1b, base).total
    for smaller in (
        TrainingSetup(method="lora", batch_size=8, seq_len=1024),
        TrainingSetup(batch_size=1, seq_len=1024),
        TrainingSetup(batch_size=8, seq_len=1024, gradient_checkpointing=True),
    ):
        assert estimate_training(tinyllama_1b, smaller).total < full


# --------------------------------------------------------------------------- the activation count


def saved_values_per_token_per_layer(config, batch=2, seq=64) -> float:
    """Values autograd saves for one decoder layer per token, from saved_tensors_hooks (2-layer minus 1-layer model)."""

    def saved(layers: int) -> int:
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            return tensor

        ids = torch.randint(0, config.vocab_size, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, labels=ids)
        return sum(size for pointer, size in storages.items() if pointer not in params)

    return (saved(2) - saved(1)) / (batch * seq * 4)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=1000
        ),
        GPTNeoXConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4, vocab_size=1000),
    ],
    ids=["llama", "gpt_neox"],
)
def test_activation_count_matches_what_autograd_saves(config):
    measured = saved_values_per_token_per_layer(config)
    estimated = activation_values_per_token(model_shape(config), seq_len=64)
    assert abs(estimated / measured - 1) < 0.10, (estimated, measured)


# --------------------------------------------------------------------------- the command


def test_plan_command_for_a_7b_config(tmp_path, capsys):
    LlamaConfig(**LLAMA_7B).save_pretrained(tmp_path)
    code = main(["plan", str(tmp_path / "config.json"), "--device-memory", "16GB", "--precision", "bfloat16", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    assert plan["inference"]["fits"] is True and plan["training"]["fits"] is False
    assert plan["model"]["parameters"] == 6_738_415_616


def test_plan_command_rejects_a_bad_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "tiny-neox", "--device-memory", "sixteen"])
    assert exit_info.value.code == 2
    assert "--device-memory" in capsys.readouterr().err


def test_plan_command_reports_an_unknown_model(capsys):
    assert main(["plan", "./no/such/model"]) == 2
    assert "Unknown model" in capsys.readouterr().err
