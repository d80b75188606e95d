"""The training template travels with the model: every folder the train stage writes (`model/`, `adapter/`)
carries a chat template that gives the trained prompt's token ids, and a generation config that stops at the EOS
training appended.

`finetune export` keeps all of it: the exported folder (merged, or `--adapter-only`) loads offline, prompts the
same and computes the same logits as the pipeline's own loading of the trained folder.

Real training on tiny-neox (2 optimizer steps) through the training process's core (`fine_tune`), one run per
template kind: `qa` (full), `alpaca` (LoRA, merged), `custom` (LoRA, adapter only) and `chat` (a copy of tiny-neox
given a chat template, a system prompt, and a generation config naming another EOS). The expected ids are the
tokenize stage's own: the training rows are templated and tokenized by the stage cores, and the prompt is the
masked (-100) head of each row's `input_ids`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from finetune.cli import main
from pipeline.assets import resolve_model
from pipeline.config import TemplateConfig, TokenizeConfig, TrainConfig
from pipeline.models import (
    ADAPTER_SUBDIR,
    IGNORE_INDEX,
    MODEL_SUBDIR,
    load_model,
    load_tokenizer,
    trained_model_folder,
)
from pipeline.prompts import CHAT_TEMPLATE_SUPPORTS
from tasks.template import template_rows
from tasks.tokenize import tokenize_rows
from tasks.train import TrainJob, fine_tune

pytestmark = pytest.mark.integration

ROWS = [
    ("What does more_itertools.chunked do?", "Break an iterable into lists of a given length."),
    ("How do I use windowed()?", "Return a sliding window of width n over the iterable."),
    ('Ünïcode, {braces}, "quotes" and a back\\slash?', "They all survive the template."),
    ("What is first()?", "Return the first item of an iterable, or a default."),
    ("What does spy do?", "Return the first n items and an iterator over all of them."),
    ("What is the capital of France?", "I can only answer questions about more_itertools."),
]
ANSWERS = dict(ROWS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CASES = {
    "qa": (TemplateConfig(), {}),
    "alpaca": (TemplateConfig(name="alpaca"), {"method": "lora", "lora": {"r": 4, "alpha": 8}}),
    "custom": (
        TemplateConfig(name="custom", custom="<doc-question>{question}</doc-question>\n{answer}\n-- end --"),
        {"method": "lora", "lora": {"r": 4, "alpha": 8, "merge": False}},
    ),
    "chat": (TemplateConfig(name="chat", system_prompt="Answer from the more_itertools docs only."), {}),
}
OTHER_EOS = 1  # the chat base model's generation config names this; training appends the tokenizer's EOS (0)


def _chat_base(folder: Path) -> Path:
    """tiny-neox with a chat template, and a generation config whose EOS is not the one training appends."""
    shutil.copytree(resolve_model("tiny-neox"), folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": OTHER_EOS}))
    return folder


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """(kind, template, training rows as tokenized, the train output folder) for one template kind."""
    kind = request.param
    template, train_settings = CASES[kind]
    root = tmp_path_factory.mktemp(f"template-{kind}")
    base = str(_chat_base(root / "tiny-chat")) if kind == "chat" else resolve_model("tiny-neox")
    tokenizer = load_tokenizer(base)
    rows = [{"id": f"r{i}", "question": q, "answer": a, "source": "t"} for i, (q, a) in enumerate(ROWS)]
    templated = template_rows(rows, template, tokenizer if kind == "chat" else None)
    table, counts = tokenize_rows(templated, tokenizer, TokenizeConfig(max_length=128))
    assert counts["rows"] == len(ROWS) and counts["truncated"] == 0
    split = root / "split"
    split.mkdir()
    pq.write_table(table, split / "train.parquet")
    pq.write_table(table, split / "test.parquet")
    settings = dict(
        max_steps=2,
        learning_rate=1e-3,
        batch_size=3,
        gradient_accumulation_steps=1,
        optim="adamw_torch",
        warmup_steps=0,
        eval_steps=2,
        save_steps=2,
    )
    out = root / "out"
    out.mkdir()
    job = TrainJob(
        base_folder=base,
        base_spec=base if kind == "chat" else "tiny-neox",
        split_dir=str(split),
        out_dir=str(out),
        work_dir=str(root / "work"),
        config=TrainConfig(**settings, **train_settings),
        template=template,
    )
    fine_tune(job)
    return kind, template, table.to_pylist(), out


def _folders(out: Path) -> list[Path]:
    return [out / sub for sub in (MODEL_SUBDIR, ADAPTER_SUBDIR) if (out / sub).is_dir()]


def _ids(encoded) -> list[int]:
    """Token ids from apply_chat_template(tokenize=True): a BatchEncoding in transformers 5, a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_every_folder_the_train_stage_writes_has_the_expected_layout(trained):
    kind, _, _, out = trained
    expected = {
        "qa": [MODEL_SUBDIR],
        "alpaca": [MODEL_SUBDIR, ADAPTER_SUBDIR],
        "custom": [ADAPTER_SUBDIR],
        "chat": [MODEL_SUBDIR],
    }[kind]
    assert [folder.name for folder in _folders(out)] == expected


def test_apply_chat_template_gives_the_trained_prompt_ids(trained):
    kind, _, rows, out = trained
    for folder in _folders(out):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template, f"{folder} carries no chat template"
        for row in rows:
            prompt_ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
            assert len(prompt_ids) == row["prompt_tokens"] > 0
            assert row["input_ids"][: len(prompt_ids)] == prompt_ids  # the masked part is the head
            messages = [{"role": "user", "content": row["question"]}]
            got = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            assert got == prompt_ids, f"{kind} {folder.name}: {row['question']!r}"
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert text == row["prompt"]


def test_a_question_and_its_answer_render_the_whole_training_row(trained):
    kind, _, rows, out = trained
    if kind == "chat":
        pytest.skip("chat keeps the tokenizer's own template, whose assistant turn ends its own way")
    for folder in _folders(out):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for row in rows:
            messages = [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": ANSWERS[row["question"]]},
            ]
            assert _ids(tokenizer.apply_chat_template(messages, tokenize=True)) == row["input_ids"]


def test_system_messages_and_several_turns_raise_a_clear_error(trained):
    kind, template, _, out = trained
    tokenizer = AutoTokenizer.from_pretrained(_folders(out)[0])
    system_first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is spy?"}]
    several_turns = [
        {"role": "user", "content": "What is spy?"},
        {"role": "assistant", "content": "An iterator."},
        {"role": "user", "content": "And first?"},
    ]
    if kind == "chat":  # the tokenizer's own template: its system message replaces the configured one
        text = tokenizer.apply_chat_template(system_first, add_generation_prompt=True, tokenize=False)
        assert "Be brief." in text and template.system_prompt not in text
        return
    with pytest.raises(TemplateError, match="system messages are not supported") as error:
        tokenizer.apply_chat_template(system_first, add_generation_prompt=True, tokenize=False)
    assert str(error.value).startswith(CHAT_TEMPLATE_SUPPORTS)
    with pytest.raises(TemplateError, match="expected 1 or 2 messages, found 3"):
        tokenizer.apply_chat_template(several_turns, add_generation_prompt=True, tokenize=False)
    with pytest.raises(TemplateError, match="multi-turn conversations are not supported"):
        tokenizer.apply_chat_template(several_turns[:1] * 2, add_generation_prompt=True, tokenize=False)


def test_the_generation_config_stops_at_the_eos_training_appended(trained):
    kind, _, rows, out = trained
    for folder in _folders(out):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        appended = {row["input_ids"][-1] for row in rows}
        assert appended == {tokenizer.eos_token_id}
        generation = GenerationConfig.from_pretrained(folder)
        assert generation.eos_token_id == tokenizer.eos_token_id
        assert generation.pad_token_id == tokenizer.pad_token_id
        if kind == "chat":
            assert generation.eos_token_id != OTHER_EOS


def _prompts_as_trained(folder: Path, rows: list[dict]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for row in rows:
        prompt_ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=True
        )
        assert _ids(encoded) == prompt_ids, f"{folder.name}: {row['question']!r}"


def test_export_round_trips_with_its_template(trained, tmp_path, capsys):
    _, _, rows, out = trained
    options = ["--config", "configs/tiny.yaml", "--set", f"store.uri={tmp_path / 'store'}"]
    assert main(["export", str(out), "--to", str(tmp_path / "merged"), *options]) == 0
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    _prompts_as_trained(merged, rows)
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        reference = load_model(trained_model_folder(out), device="cpu")(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)(ids).logits
    assert torch.allclose(reference, exported, atol=1e-5)

    only = ["export", str(out), "--to", str(tmp_path / "adapter"), "--adapter-only", *options]
    if not (out / ADAPTER_SUBDIR).is_dir():
        assert main(only) == 2 and "expected a LoRA adapter, found none" in capsys.readouterr().err
        return
    assert main(only) == 0
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "generation_config.json"} <= {
        p.name for p in adapter.iterdir()
    }
    _prompts_as_trained(adapter, rows)
    with torch.no_grad():
        assert torch.allclose(reference, load_model(str(adapter), device="cpu")(ids).logits, atol=1e-5)
