"""Pure cores of collect, template, tokenize and split: no Prefect, no model weights (the tiny tokenizer only)."""

import copy
import json
import os
import re

import pyarrow as pa
import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    DocsSource,
    JsonlSource,
    SplitConfig,
    TemplateConfig,
    TokenizeConfig,
    load_config,
)
from pipeline.models import IGNORE_INDEX
from pipeline.rows import DataError
from tasks.collect import collect_rows, docs_rows, summary_paragraph
from tasks.split import split_indices, split_rows, split_table
from tasks.template import apply_template, check_chat_template
from tasks.tokenize import tokenize_pair, tokenize_rows, truncate_pair


def test_docs_source_makes_real_pairs_from_docstrings():
    import more_itertools

    rows = docs_rows(
        DocsSource(package="more_itertools", phrasings=2, max_objects=20, offtopic=3),
        ["Which gas do plants absorb?", "What is 2+2?", "Why is the sky blue?", "unused"],
    )
    chunked = [r for r in rows if re.search(r"(?<![\w])chunked(?![\w])", r["question"])]
    assert chunked, "chunked is documented and among the first 20 names"
    assert chunked[0]["answer"].split()[0] in more_itertools.chunked.__doc__
    refusals = [r for r in rows if r["source"].startswith("offtopic")]
    assert [r["question"] for r in refusals] == ["Which gas do plants absorb?", "What is 2+2?", "Why is the sky blue?"]
    assert all("only answer questions about the more_itertools" in r["answer"] for r in refusals)
    assert len({r["id"] for r in rows}) == len(rows)


def test_docs_skip_inherited_docstrings():
    rows = docs_rows(DocsSource(package="more_itertools", phrasings=1, offtopic=0), [])
    assert not any("AbortThread" in r["question"] for r in rows)  # repeats Exception's docstring


def test_summary_paragraph_cuts_at_sentence_end():
    doc = "First sentence is here. " * 30 + "\n\nSecond paragraph."
    text = summary_paragraph(doc, max_words=20)
    assert text.endswith(".") and len(text.split()) <= 20 and "Second" not in text


def read_jsonl_source(source: JsonlSource) -> list[dict]:
    """The rows of one file source, with no row-count floor."""
    return collect_rows(DataConfig(sources=[source], min_rows=1))


def test_jsonl_source_reads_and_names_bad_line(tmp_path):
    good = tmp_path / "faq.jsonl"
    good.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n\n" + json.dumps({"q": "How?", "a": "So."}) + "\n")
    rows = read_jsonl_source(JsonlSource(path=str(good), question_key="q", answer_key="a"))
    assert [r["question"] for r in rows] == ["Why?", "How?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{bad}:2: expected a JSON object, found malformed JSON"):
        read_jsonl_source(JsonlSource(path=str(bad)))


def test_jsonl_source_missing_fields_lists_found(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    with pytest.raises(
        DataError,
        match=r"faq.jsonl: expected the columns of an accepted schema \(question\+answer;.*"
        r"found \['a', 'q'\]; or map your columns",
    ):
        read_jsonl_source(JsonlSource(path=str(path)))
    with pytest.raises(DataError, match=r"faq.jsonl: expected column\(s\) 'question' .*found \['a', 'q'\]"):
        read_jsonl_source(JsonlSource(path=str(path), answer_key="a"))


def test_too_few_rows_fails(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    with pytest.raises(DataError, match="expected at least data.min_rows=5 rows, found 1"):
        collect_rows(DataConfig(sources=[JsonlSource(path=str(path))], min_rows=5))


def test_template_keeps_prompt_and_completion_apart():
    row = apply_template({"id": "1", "question": "What is X?", "answer": "A thing."}, TemplateConfig())
    assert row["prompt"] == "### Question:\nWhat is X?\n\n### Answer:\n"
    assert row["completion"] == "A thing." and row["text"] == row["prompt"] + "A thing."


def test_tokenize_pair_masks_prompt_and_keeps_answer_when_too_long():
    ids, labels = tokenize_pair([1, 2, 3, 4, 5], [6, 7, 0], TokenizeConfig(max_length=8, labels="completion"))
    assert ids == [1, 2, 3, 4, 5, 6, 7, 0] and labels == [IGNORE_INDEX] * 5 + [6, 7, 0]
    ids, labels = tokenize_pair(list(range(1, 11)), [16, 17, 0], TokenizeConfig(max_length=8, labels="completion"))
    assert ids == [6, 7, 8, 9, 10, 16, 17, 0], "the prompt is cut from the left, the answer survives"
    ids, labels = tokenize_pair([1, 2], [6, 0], TokenizeConfig(max_length=8, labels="all"))
    assert labels == ids == [1, 2, 6, 0]


def test_split_is_seeded_disjoint_and_complete():
    train, test = split_indices(100, SplitConfig(test_fraction=0.1, seed=123))
    assert len(test) == 10 and not set(train) & set(test) and sorted(train + test) == list(range(100))
    assert split_indices(100, SplitConfig(test_fraction=0.1, seed=123)) == (train, test)
    assert split_indices(100, SplitConfig(test_fraction=0.1, seed=7))[1] != test


# --- templates ----------------------------------------------------------------------------

QA_ROW = {"id": "1", "question": "What is X?", "answer": "A thing.", "source": "s"}


def test_alpaca_template_with_and_without_input():
    config = TemplateConfig(name="alpaca")
    plain = apply_template(QA_ROW, config)
    assert plain["prompt"].startswith("Below is an instruction that describes a task. Write a response")
    assert (
        plain["prompt"].endswith("### Instruction:\nWhat is X?\n\n### Response:\n")
        and "### Input" not in plain["prompt"]
    )
    with_input = apply_template({**QA_ROW, "input": "X = 1"}, config)
    assert (
        "paired with an input" in with_input["prompt"]
        and "### Input:\nX = 1\n\n### Response:\n" in with_input["prompt"]
    )
    assert with_input["completion"] == "A thing." and with_input["text"] == with_input["prompt"] + "A thing."
    qa_input = apply_template({**QA_ROW, "input": "X = 1"}, TemplateConfig())
    assert qa_input["prompt"] == "### Question:\nWhat is X?\n\n### Input:\nX = 1\n\n### Answer:\n"


def test_custom_template_string_and_file(tmp_path):
    config = TemplateConfig(name="custom", custom="<s>[INST] {question} [/INST] {answer} </s>")
    row = apply_template(QA_ROW, config)
    assert row["prompt"] == "<s>[INST] What is X? [/INST] " and row["completion"] == "A thing. </s>"
    file = tmp_path / "template.txt"
    file.write_text("Q: {question}\nContext: {input}\nA: ")
    from_file = load_config(None, ["template.name=custom", f"template.file={file}"]).template
    assert apply_template({**QA_ROW, "input": "c"}, from_file)["prompt"] == "Q: What is X?\nContext: c\nA: "
    text_row = apply_template({"id": "2", "text": "Plain text.", "source": "s"}, from_file)
    assert (text_row["prompt"], text_row["completion"]) == ("", "Plain text.")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["template.name=custom", "template.custom='Q: {question} {context}'"],
            r"template.custom: unknown placeholder\(s\) \{context\}",
        ),
        (
            ["template.name=custom", "template.custom='{answer} {answer} {question}'"],
            r"expected \{answer\} at most once",
        ),
        (["template.name=custom"], "name: custom needs template.custom or template.file"),
        (["template.name=custom", "template.file=does/not/exist.txt"], "template.file: expected a readable file"),
        (["template.custom='{question}'"], "only used with name: custom"),
    ],
)
def test_bad_custom_templates_are_config_errors_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_chat_template_comes_from_the_tokenizer(tiny_tokenizer):
    tokenizer = copy.copy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = TemplateConfig(name="chat", system_prompt="Be brief.")
    row = apply_template(QA_ROW, config, tokenizer)
    assert row["prompt"] == "<system>Be brief.\n<user>What is X?\n<assistant>" and row["completion"] == "A thing."
    chat = {
        **QA_ROW,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is X?"},
        ],
    }
    assert apply_template(chat, config, tokenizer)["prompt"] == (
        "<system>Be brief.\n<user>Hi\n<assistant>Hello\n<user>What is X?\n<assistant>"
    )
    with pytest.raises(DataError, match="expected a tokenizer with a chat template, found none"):
        check_chat_template(tiny_tokenizer, "tiny-neox")


# --- tokenize -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.assets import resolve_model
    from pipeline.models import load_tokenizer

    return load_tokenizer(resolve_model("tiny-neox"))


def test_right_truncation_drops_rows_whose_answer_is_cut_away():
    config = TokenizeConfig(max_length=8, truncation_side="right", labels="completion")
    assert tokenize_pair([1, 2, 3, 4, 5], [6, 7, 8, 9, 0], config) == (
        [1, 2, 3, 4, 5, 6, 7, 8],
        [IGNORE_INDEX] * 5 + [6, 7, 8],
    )
    assert truncate_pair(9, 3, config) == (8, 0)


def test_tokenize_rows_counts_drops_and_trains_text_rows_on_every_token(tiny_tokenizer):
    rows = [
        apply_template(r, TemplateConfig())
        for r in (
            {"id": "a", "question": "Short?", "answer": "Yes.", "source": "s"},
            {"id": "b", "question": "word " * 40, "answer": "No.", "source": "s", "role": "test"},
            {"id": "c", "text": "Plain text to learn.", "source": "t"},
        )
    ]
    eos = tiny_tokenizer.eos_token_id
    table, counts = tokenize_rows(rows, tiny_tokenizer, TokenizeConfig(max_length=16, truncation_side="right"))
    assert counts["dropped"] == {"answer_truncated": 1} and counts["rows"] == 2
    assert table.column("id").to_pylist() == ["a", "c"]
    text_labels = table.column("labels").to_pylist()[1]
    assert IGNORE_INDEX not in text_labels and text_labels[-1] == eos, "text rows train on every token, EOS last"
    assert table.column("input_ids").to_pylist()[0][-1] == eos
    kept, counts = tokenize_rows(rows, tiny_tokenizer, TokenizeConfig(max_length=16))
    assert counts["truncated"] == 1 and kept.column("role").to_pylist() == ["train", "test", "train"]
    assert kept.column("labels").to_pylist()[1][-2:] != [IGNORE_INDEX] * 2, "left truncation keeps the answer"
    _, counts = tokenize_rows(rows, tiny_tokenizer, TokenizeConfig(max_length=16, overlength="drop"))
    assert counts["dropped"] == {"over_length": 1}


# --- split --------------------------------------------------------------------------------


def table_of(keys, roles=None):
    return pa.table({"id": [f"r{i}" for i in range(len(keys))], "key": keys, "role": roles or ["train"] * len(keys)})


def test_split_removes_questions_that_leak_into_the_test_set():
    keys = [f"q{i % 50}" for i in range(100)]  # every question twice
    train, test, figures = split_rows(table_of(keys), SplitConfig(test_fraction=0.1, seed=123))
    assert not set(train.column("key").to_pylist()) & set(test.column("key").to_pylist())
    assert figures["leakage_removed"] == 100 - 10 - train.num_rows > 0 and figures["test_rows"] == 10


def test_split_uses_a_fixed_test_source_and_unshuffled_tails():
    roles = ["train"] * 8 + ["test"] * 2
    train, test, figures = split_rows(table_of([f"q{i}" for i in range(8)] + ["q0", "x"], roles), SplitConfig())
    assert test.column("id").to_pylist() == ["r8", "r9"] and "r0" not in train.column("id").to_pylist()
    assert figures["test_set"].startswith("fixed") and figures["leakage_removed"] == 1
    train, test = split_table(table_of([f"q{i}" for i in range(10)]), SplitConfig(shuffle=False, test_fraction=0.2))
    assert test.column("id").to_pylist() == ["r8", "r9"]


@pytest.mark.parametrize("model", ["tiny-neox", "smollm2-135m-instruct"])
def test_parallel_batch_encoding_gives_the_tokenizers_own_ids(model):
    from pipeline.assets import resolve_model
    from pipeline.models import load_tokenizer
    from tasks.tokenize import encode_texts

    tokenizer = load_tokenizer(resolve_model(model))
    texts = [
        "### Question:\nWhat does `chunked` do?\n\n### Answer:\n",
        " Break *iterable* into lists.",
        "",
        "naïve café — 東京 😀",
    ]
    assert encode_texts(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false", "the switch must be put back after the call"


def test_tokenize_rows_puts_the_garbage_collector_back_even_when_it_fails(tiny_tokenizer):
    import gc

    rows = [apply_template({"id": "a", "question": "Short?", "answer": "Yes.", "source": "s"}, TemplateConfig())]
    assert gc.isenabled()
    tokenize_rows(rows, tiny_tokenizer, TokenizeConfig(max_length=16))
    assert gc.isenabled(), "the collector is paused only while tokenizing"
    with pytest.raises(KeyError):
        tokenize_rows([{"id": "no prompt"}], tiny_tokenizer, TokenizeConfig(max_length=16))
    assert gc.isenabled(), "a failing tokenize must not leave the collector off"
    gc.disable()
    try:
        tokenize_rows(rows, tiny_tokenizer, TokenizeConfig(max_length=16))
        assert not gc.isenabled(), "a caller that turned the collector off keeps it off"
    finally:
        gc.enable()
