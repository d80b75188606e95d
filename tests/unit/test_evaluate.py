"""The evaluate stage's core: metrics, categories, probes and batched generation on the tiny model (bad input: test_eval_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.answers import CATEGORIES
from pipeline.assets import resolve_model
from pipeline.config import EVAL_METRICS, EvalConfig, TemplateConfig
from pipeline.docs_source import REFUSAL
from pipeline.models import load_model, load_tokenizer
from pipeline.prompts import render_prompt
from tasks.evaluate import (
    RefusalDetector,
    categorise,
    cut_at_stop,
    evaluate_model,
    exact_match,
    generate_answers,
    left_pad,
    length_ratio,
    load_encoder,
    mask_subjects,
    question_of,
    refusal_by_rules,
    repetition,
    rouge_l,
    select_probes,
    summarise,
    token_f1,
    write_outputs,
)

TEMPLATE = TemplateConfig()
DOC_ANSWER = "Break an iterable into lists of length n."
OFFTOPIC_ANSWER = REFUSAL.format(package="more_itertools")


# --------------------------------------------------------------------------- per-answer metrics


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert exact_match("  Break an ITERABLE into lists of length n ", DOC_ANSWER)
    assert not exact_match("Break an iterable into lists", DOC_ANSWER)


def test_token_f1_and_rouge_l_reward_overlap():
    assert token_f1(DOC_ANSWER, DOC_ANSWER) == pytest.approx(1.0)
    assert token_f1("lists of length n", DOC_ANSWER) == pytest.approx(2 * 1.0 * (4 / 8) / (1.0 + 4 / 8))
    assert token_f1("", DOC_ANSWER) == 0.0
    full, partial, none = rouge_l([DOC_ANSWER, "an iterable into lists", "pancakes"], [DOC_ANSWER] * 3)
    assert full == pytest.approx(1.0) and 0.0 < partial < 1.0 and none == 0.0


def test_length_ratio_and_repetition():
    assert length_ratio("a b", "a b c d") == 0.5
    assert length_ratio("a b", "") == 2.0  # a one-word floor keeps it finite
    assert repetition("a b c a b c", n=3) == pytest.approx(0.25)
    assert repetition("the cat sat on the mat", n=3) == 0.0
    assert repetition("yes yes yes yes yes yes", n=3) == pytest.approx(0.75)
    assert repetition("too short", n=3) == 0.0


def test_refusal_rules_catch_polite_declines_only():
    assert refusal_by_rules(OFFTOPIC_ANSWER)
    assert refusal_by_rules("Sorry, but I can\u2019t help with that.")
    assert not refusal_by_rules(DOC_ANSWER)
    assert not refusal_by_rules("Mars is the fourth planet from the Sun.")


def test_an_answer_naming_the_taught_package_is_not_a_refusal_but_a_paraphrased_refusal_is():
    # Measured with all-MiniLM-L6-v2 before the mask: these answers reached 0.60-0.71 cosine to the trained
    # refusal on the package name alone (threshold 0.6), so false_refusal_rate counted them as declines.
    answers = [
        "more_itertools.chunked breaks an iterable into lists of length n.",
        "You can use more_itertools.peekable to look ahead in an iterator.",
        "This function is part of the more_itertools Python package and returns items.",
    ]
    refusal = REFUSAL.format(package="more_itertools")
    unmasked = RefusalDetector(load_encoder(), [refusal], threshold=0.6)
    masked = RefusalDetector(load_encoder(), [refusal], threshold=0.6, subjects=["more_itertools"])
    assert all(unmasked(answers)[0]), "the unmasked cosine should reproduce the false refusals"
    declined, cosine = masked([*answers, refusal, "Sorry, I only know about the more_itertools package."])
    assert declined == [False, False, False, True, True]
    assert max(cosine[:3]) < 0.6 <= cosine[3]  # the last one is declined by the keyword rules


def test_mask_subjects_replaces_the_package_and_its_dotted_names_only():
    text = "Use more_itertools.chunked, not more_itertools_extra or os.path; more_itertools is fine."
    assert mask_subjects(text, ["more_itertools"]) == "Use it, not more_itertools_extra or os.path; it is fine."


def _flags(**changes):
    signals = dict(
        offtopic_question=False,
        declined=False,
        answer="some answer",
        ratio=1.0,
        repeated=0.0,
        similarity=0.8,
        config=EvalConfig(),
    )
    return categorise(**{**signals, **changes})


def test_categories_follow_their_priority():
    assert _flags() == []
    assert _flags(answer="", ratio=0.0, similarity=0.0) == ["too_short", "off_topic"]
    assert _flags(ratio=0.1) == ["too_short"]
    assert _flags(ratio=5.0, repeated=0.6) == ["repetitive", "too_long"]
    assert _flags(declined=True) == ["off_topic"]
    assert _flags(similarity=0.05) == ["off_topic"]
    assert _flags(offtopic_question=True, declined=False, ratio=9.0) == ["not_declined"]
    assert _flags(offtopic_question=True, declined=True) == []


def test_summary_rates_sum_to_one_and_refusal_rate_comes_from_probes():
    rows = [
        {
            "category": "ok",
            "categories": "",
            "offtopic_question": False,
            "declined": False,
            "exact_match": True,
            "similarity": 0.9,
            "rouge_l": 1.0,
            "token_f1": 1.0,
            "length_ratio": 1.0,
            "repetition": 0.0,
            "empty": False,
            "answer": "a b",
        },
        {
            "category": "too_short",
            "categories": "too_short,repetitive",
            "offtopic_question": False,
            "declined": True,
            "exact_match": False,
            "similarity": 0.1,
            "rouge_l": 0.0,
            "token_f1": 0.0,
            "length_ratio": 0.0,
            "repetition": 0.5,
            "empty": True,
            "answer": "",
        },
        {
            "category": "not_declined",
            "categories": "not_declined",
            "offtopic_question": True,
            "declined": False,
            "exact_match": False,
            "similarity": 0.2,
            "rouge_l": 0.0,
            "token_f1": 0.0,
            "length_ratio": 2.0,
            "repetition": 0.0,
            "empty": False,
            "answer": "x y z w",
        },
    ]
    probes = [
        {"category": "general_knowledge", "declined": True},
        {"category": "chit_chat", "declined": False},
        {"category": "near_domain", "declined": True},
        {"category": "hand_picked", "declined": True},
        {"category": "on_topic", "declined": True},
        {"category": "on_topic", "declined": False},
    ]
    summary = summarise(rows, probes, 2)
    assert sum(summary[f"{c}_rate"] for c in CATEGORIES) == pytest.approx(1.0)
    assert summary["refusal_rate"] == 0.75  # the off-topic probes only
    assert summary["false_refusal_rate"] == 0.5  # one of the two on_topic probes declined
    assert summary["false_refusal_rate_test"] == 0.5  # one of the two on-topic test answers declined
    assert summary["repetition_rate"] == pytest.approx(1 / 3) and summary["empty_rate"] == pytest.approx(1 / 3)
    assert summary["excluded_empty_target"] == 2 and summary["offtopic_questions"] == 1
    assert set(EVAL_METRICS) <= set(summary)
    assert "refusal_rate" not in summarise(rows, [], 0)  # nothing measured: left out, not 0


# --------------------------------------------------------------------------- probes and test rows


def test_probes_skip_seen_questions_and_keep_hand_picked_last():
    candidates = {"general_knowledge": [{"question": f"Trivia question {i}?", "source": "trivia_qa"} for i in range(5)]}
    seen = ["trivia question 0", "What do you think of Mars?"]  # a training row and a test row
    probes = select_probes(candidates, {"general_knowledge": 2}, ["What do you think of Mars?", "Hi there?"], seen)
    assert [p["question"] for p in probes] == ["Trivia question 1?", "Trivia question 2?", "Hi there?"]
    assert [p["category"] for p in probes] == ["general_knowledge", "general_knowledge", "hand_picked"]
    assert {p["expected"] for p in probes} == {"decline"}


def test_question_is_recovered_from_the_templated_prompt():
    assert question_of(render_prompt("What is `x`?", TEMPLATE), TEMPLATE) == "What is `x`?"
    assert question_of("free text prompt", TEMPLATE) == "free text prompt"


def _write_split(folder: Path, targets: list[str], questions: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    questions = questions or [f"What does `more_itertools.f{i}` do?" for i in range(len(targets))]
    table = pa.table(
        {
            "id": [f"id{i}" for i in range(len(targets))],
            "source": ["docs:more_itertools"] * len(targets),
            "prompt": [render_prompt(q, TEMPLATE) for q in questions],
            "completion": targets,
        }
    )
    pq.write_table(table, folder / "test.parquet")
    pq.write_table(table.slice(0, 1), folder / "train.parquet")
    return folder


# --------------------------------------------------------------------------- generation on the tiny model


def test_left_pad_and_cut_at_stop():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 5, 2, 9], {2}) == [4, 5] and cut_at_stop([4, 5], {2}) == [4, 5]


@pytest.fixture(scope="module")
def tiny():
    folder = resolve_model("tiny-neox")
    return load_model(folder, device="cpu"), load_tokenizer(folder, padding_side="left")


def test_batched_answers_equal_one_at_a_time_greedy_answers(tiny):
    model, tokenizer = tiny
    prompts = [
        render_prompt(q, TEMPLATE)
        for q in [
            "What does `more_itertools.chunked` do?",
            "Hi?",
            "Explain the more_itertools function `windowed` please.",
            "What is the purpose of `first`?",
            "Why?",
        ]
    ]
    assert generate_answers(model, tokenizer, [], max_new_tokens=8, batch_size=3) == []
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(answer and "### Question" not in answer for answer in batched)  # the prompt was stripped
    penalised = generate_answers(model, tokenizer, prompts[:2], max_new_tokens=8, batch_size=2, repetition_penalty=1.3)
    assert len(penalised) == 2


def test_evaluate_model_scores_test_questions_and_probes(tmp_path):
    questions = ["What does `more_itertools.chunked` do?", "What do you think of Jupiter?", "Tell me about `windowed`."]
    split_dir = _write_split(tmp_path / "split", [DOC_ANSWER, OFFTOPIC_ANSWER, ""], questions)
    counts = {"general_knowledge": 2, "chit_chat": 1, "near_domain": 1, "on_topic": 1}
    config = EvalConfig(
        max_new_tokens=6,
        probe_max_new_tokens=2,
        batch_size=4,
        probe_counts=counts,
        probe_questions=["What do you think of Mars?"],
    )
    result = evaluate_model(resolve_model("tiny-neox"), split_dir, config, TEMPLATE)
    tokenizer = load_tokenizer(resolve_model("tiny-neox"))
    tokens = [len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in result.rows + result.probes]
    assert max(tokens[2:]) < max(tokens[:2])  # probes stop at probe_max_new_tokens, test answers go on to 6
    assert [r["question"] for r in result.rows] == questions[:2]
    assert [r["offtopic_question"] for r in result.rows] == [False, True]
    assert result.summary["excluded_empty_target"] == 1 and result.summary["n"] == 2
    assert [p["category"] for p in result.probes] == [
        "general_knowledge",
        "general_knowledge",
        "chit_chat",
        "near_domain",
        "on_topic",
        "hand_picked",
    ]
    assert "chunked" in result.probes[4]["question"]  # the one documented object the split asks about
    assert result.summary["probe_counts"]["general_knowledge"]["n"] == 2
    write_outputs(result, tmp_path)
    written = pq.read_table(tmp_path / "probes.parquet").to_pylist()
    expected = [(p["category"], p["expected"]) for p in written]
    assert expected[-2:] == [("on_topic", "answer"), ("hand_picked", "decline")]
    assert set(EVAL_METRICS) <= set(result.summary)
    assert all(r["category"] in CATEGORIES for r in result.rows)
    assert result.summary["answers_per_second"] > 0
