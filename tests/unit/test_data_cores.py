"""Pure cores of collect, template, tokenize and split: no Prefect, no model weights."""

import json

import pytest

from pipeline.config import DataConfig, DocsSource, JsonlSource, SplitConfig, TemplateConfig, TokenizeConfig
from tasks.collect import DataError, collect_rows, docs_rows, read_jsonl_source, summary_paragraph
from tasks.split import split_indices
from tasks.template import apply_template
from tasks.tokenize import IGNORE_INDEX, tokenize_pair


def test_docs_source_makes_real_pairs_from_docstrings():
    import more_itertools

    rows = docs_rows(DocsSource(package="more_itertools", phrasings=2, max_objects=20, offtopic=3),
                     ["Which gas do plants absorb?", "What is 2+2?", "Why is the sky blue?", "unused"])
    chunked = [r for r in rows if "more_itertools.chunked" in r["question"] or "`chunked`" in r["question"]]
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


def test_jsonl_source_reads_and_names_bad_line(tmp_path):
    good = tmp_path / "faq.jsonl"
    good.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n\n" + json.dumps({"q": "How?", "a": "So."}) + "\n")
    rows = read_jsonl_source(JsonlSource(path=str(good), question_key="q", answer_key="a"))
    assert [r["question"] for r in rows] == ["Why?", "How?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        read_jsonl_source(JsonlSource(path=str(bad)))


def test_jsonl_source_missing_fields_lists_found(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    with pytest.raises(DataError, match=r"faq.jsonl:1: expected fields 'question' and 'answer', found \['a', 'q'\]"):
        read_jsonl_source(JsonlSource(path=str(path)))


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
