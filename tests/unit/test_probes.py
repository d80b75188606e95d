"""Moderation probes in categories: sources, seeded selection without near-duplicates of the split, per-category
figures, the near-domain training refusals and the refine change they ask for. No model: fast."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.assets import CHIT_CHAT_TOPICS, chit_chat_prompts, trivia_qa_questions
from pipeline.config import (
    DEFAULT_REFINE_ACTIONS,
    OFFTOPIC_PROBE_CATEGORIES,
    PROBE_CATEGORIES,
    REFINE_CHANGES,
    ConfigError,
    DataConfig,
    DocsSource,
    EvalConfig,
    RefineConfig,
    TemplateConfig,
    load_config,
)
from pipeline.docs_source import (
    NEAR_DOMAIN_PROBE_PACKAGES,
    NEAR_DOMAIN_TRAIN_PACKAGES,
    PROBE_PHRASINGS,
    QUESTION_PHRASINGS,
    REFUSAL,
    documented_objects,
    package_questions,
    same_package,
)
from pipeline.prompts import render_prompt
from pipeline.rows import normalise_text
from tasks.collect import read_docs_source
from tasks.evaluate import (
    NearDuplicates,
    jaccard,
    look_counts,
    look_probes,
    probe_candidates,
    seen_questions,
    select_probes,
    summarise,
    taught_packages,
)
from tasks.refine import CHANGES, changes_for, plan_changes

TEMPLATE = TemplateConfig()
COUNTS = {"general_knowledge": 3, "chit_chat": 2, "near_domain": 4, "on_topic": 2}
HAND_PICKED = ["What do you think of Mars?", "Write a short poem about the sea."]


def _words(text: str) -> frozenset[str]:
    return frozenset(normalise_text(text).split())


def _write_split(folder: Path, rows: list[dict]) -> Path:
    """A split folder like the split stage writes (id, source, question, prompt, completion): all rows train,
    the first two also test."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [f"id{i}" for i in range(len(rows))],
            "source": [r["source"] for r in rows],
            "question": [r["question"] for r in rows],
            "prompt": [render_prompt(r["question"], TEMPLATE) for r in rows],
            "completion": [r["answer"] for r in rows],
        }
    )
    pq.write_table(table, folder / "train.parquet")
    pq.write_table(table.slice(0, 2), folder / "test.parquet")
    return folder


@pytest.fixture(scope="module")
def docs_split(tmp_path_factory) -> Path:
    """A small docs-source split: 12 documented more_itertools objects in two phrasings, plus near-domain refusals."""
    source = DocsSource(phrasings=2, max_objects=12, offtopic=0, near_domain=6)
    return _write_split(tmp_path_factory.mktemp("split"), read_docs_source(source))


def _probes(split_dir: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> list[dict]:
    config = EvalConfig(probe_counts=counts, probe_seed=seed, probe_questions=HAND_PICKED)
    seen, taught = seen_questions(split_dir, TEMPLATE), taught_packages(split_dir)
    return select_probes(probe_candidates(config, taught, seen), config.probe_counts, config.probe_questions, seen)


# --------------------------------------------------------------------------- sources


def test_probe_sources_hold_enough_questions_and_none_from_a_training_source():
    trivia = trivia_qa_questions()
    chat = chit_chat_prompts()
    assert len(trivia) == 7993 and len(chat) >= 300  # far more than the default 30 per category
    assert {p["topic"] for p in chat} <= set(CHIT_CHAT_TOPICS)
    assert not {"coding", "tech_support", "trivia"} & set(CHIT_CHAT_TOPICS)  # software and quiz topics stay out
    assert len({p["question"] for p in chat}) == len(chat)


# --------------------------------------------------------------------------- selection


def test_categories_have_the_configured_sizes_and_the_draw_is_seeded(docs_split):
    probes = _probes(docs_split)
    assert Counter(p["category"] for p in probes) == {**COUNTS, "hand_picked": len(HAND_PICKED)}
    assert all(p["expected"] == ("answer" if p["category"] == "on_topic" else "decline") for p in probes)
    assert {p["source"] for p in probes if p["category"] == "general_knowledge"} == {"trivia_qa"}
    assert all(p["source"].startswith("chatterbot:") for p in probes if p["category"] == "chit_chat")
    assert all(
        p["source"] == "on_topic:more_itertools" and "more_itertools" in p["question"]
        for p in probes
        if p["category"] == "on_topic"
    )
    near = [p for p in probes if p["category"] == "near_domain"]
    assert all(p["source"].removeprefix("near_domain:") in NEAR_DOMAIN_PROBE_PACKAGES for p in near)
    assert _probes(docs_split) == probes  # same seed, same split: same probes
    assert _probes(docs_split, seed=1) != probes


def test_on_topic_probes_ask_about_trained_objects_in_new_phrasings(docs_split):
    questions = [q for q in seen_questions(docs_split, TEMPLATE) if "more_itertools" in q]
    trained = {
        name
        for name, _, _ in documented_objects("more_itertools")
        if any(re.search(rf"(?<!\w){name}(?!\w)", q) for q in questions)
    }
    on_topic = [p["question"] for p in _probes(docs_split, {"on_topic": 8}) if p["category"] == "on_topic"]
    assert len(on_topic) == 8 and len(trained) >= 8
    assert all(any(re.search(rf"(?<!\w){name}(?!\w)", question) for name in trained) for question in on_topic)
    trained_phrasings = {normalise_text(t.split("{")[0]) for t in QUESTION_PHRASINGS}
    assert not any(normalise_text(q).startswith(tuple(trained_phrasings)) for q in on_topic)


def test_no_probe_equals_or_nears_a_split_question_and_a_planted_near_duplicate_is_skipped(docs_split, tmp_path):
    counts = {"general_knowledge": 3}
    first = [p["question"] for p in _probes(docs_split, counts) if p["category"] == "general_knowledge"]
    # Plant a near-duplicate of the first drawn TriviaQA question (one word more, case changed) in the train split.
    planted = first[0].upper() + " please"
    assert jaccard(_words(planted), _words(first[0])) >= 0.8 and normalise_text(planted) != normalise_text(first[0])
    rows = read_docs_source(DocsSource(phrasings=2, max_objects=12, offtopic=0, near_domain=6))
    split = _write_split(tmp_path / "planted", [*rows, {"source": "faq", "question": planted, "answer": "A."}])
    again = [p["question"] for p in _probes(split, counts) if p["category"] == "general_knowledge"]
    assert first[0] not in again and again[:2] == first[1:] and len(again) == 3
    for probe in _probes(split):
        assert not NearDuplicates(seen_questions(split, TEMPLATE)).matches(probe["question"])


def test_select_probes_skips_exact_and_near_duplicates_of_the_split_and_of_each_other():
    seen = ["Which is the largest planet in our solar system?", "Who painted the Mona Lisa?"]
    candidates = {
        "general_knowledge": [
            {"question": "which is the LARGEST planet in the solar system", "source": "t"},  # Jaccard 8/9 to seen[0]
            {"question": "Who painted the Mona Lisa", "source": "t"},  # equal after normalisation
            {"question": "What is the boiling point of water at sea level?", "source": "t"},
            {"question": "What is the boiling point of water at sea level, roughly?", "source": "t"},  # nears the last
            {"question": "Who wrote Hamlet?", "source": "t"},
        ],
        "chit_chat": [{"question": "Who wrote Hamlet?", "source": "c"}, {"question": "Hello there", "source": "c"}],
    }
    probes = select_probes(candidates, {"general_knowledge": 5, "chit_chat": 1}, ["who painted the mona lisa?"], seen)
    assert [(p["category"], p["question"]) for p in probes] == [
        ("general_knowledge", "What is the boiling point of water at sea level?"),
        ("general_knowledge", "Who wrote Hamlet?"),
        ("chit_chat", "Hello there"),
    ]  # a source that runs out gives fewer; the seen hand-picked question is skipped too


def test_templated_probes_about_different_objects_are_all_kept_so_every_phrasing_is_drawn(tmp_path):
    # One wording about two functions is two questions (Jaccard 10/12 would have called them one) ...
    long_wording = [
        {
            "question": f"Is there a quick way to get started with {name} from more_itertools?",
            "source": "t",
            "subject": name,
        }
        for name in ("chunked", "windowed", "chunked")
    ]
    kept = select_probes({"on_topic": long_wording}, {"on_topic": 3}, [], seen=[])
    assert [p["question"].split()[-3] for p in kept] == ["chunked", "windowed"]  # ...and the same question once
    # ...so a draw spans every probe phrasing, the long ones too (the near test kept about 1 in 100 of those).
    whole_package = _write_split(tmp_path, read_docs_source(DocsSource(phrasings=1, offtopic=0, near_domain=0)))
    on_topic = [p["question"] for p in _probes(whole_package, {"on_topic": 60}) if p["category"] == "on_topic"]
    prefixes = [normalise_text(t.split("{")[0]) for t in PROBE_PHRASINGS]
    drawn = Counter(next(i for i, pre in enumerate(prefixes) if normalise_text(q).startswith(pre)) for q in on_topic)
    assert len(on_topic) == 60 and set(drawn) == set(range(len(PROBE_PHRASINGS)))
    assert min(drawn.values()) >= 4, drawn  # 10 each expected from a uniform draw


def test_near_duplicates_find_every_match_a_plain_scan_finds():
    assert NearDuplicates(["alpha beta gamma delta"]).matches("Alpha beta gamma delta epsilon")  # 4/5: the boundary
    assert not NearDuplicates(["alpha beta gamma"]).matches("alpha beta gamma delta")  # 3/4
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(12)]
    texts = [" ".join(rng.sample(vocabulary, rng.randint(3, 8))) for _ in range(400)]
    index = NearDuplicates(texts)
    queries = [" ".join(rng.sample(vocabulary, rng.randint(3, 8))) for _ in range(400)]
    plain = [any(jaccard(_words(q), _words(t)) >= 0.8 for t in texts) for q in queries]
    assert [index.matches(q) for q in queries] == plain and 10 < sum(plain) < 390  # both outcomes occur


# --------------------------------------------------------------------------- phrasings and package sets


def test_on_topic_probe_phrasings_share_no_template_with_the_training_phrasings():
    assert not set(PROBE_PHRASINGS) & set(QUESTION_PHRASINGS)
    for package, name, kind in [("more_itertools", "chunked", "function"), ("json", "JSONDecoder", "class")]:
        fields = {"package": package, "name": name, "qualname": f"{package}.{name}", "kind": kind}
        for probe in PROBE_PHRASINGS:
            for train in QUESTION_PHRASINGS:
                asked, trained = probe.format(**fields), train.format(**fields)
                assert normalise_text(asked) != normalise_text(trained)
                assert jaccard(_words(asked), _words(trained)) < 0.8, (asked, trained)


def test_the_phrasings_setting_admits_exactly_the_phrasings_there_are():
    DocsSource(phrasings=len(QUESTION_PHRASINGS))
    with pytest.raises(ValueError):
        DocsSource(phrasings=len(QUESTION_PHRASINGS) + 1)


def test_near_domain_package_sets_are_disjoint_and_leave_out_the_taught_package():
    train, probe = ({p.split(".")[0] for p in ps} for ps in (NEAR_DOMAIN_TRAIN_PACKAGES, NEAR_DOMAIN_PROBE_PACKAGES))
    assert not train & probe
    taught = {DocsSource().package} | {
        s.package for s in load_config("configs/default.yaml").data.sources if isinstance(s, DocsSource)
    }
    for package in (*NEAR_DOMAIN_TRAIN_PACKAGES, *NEAR_DOMAIN_PROBE_PACKAGES):
        assert not any(same_package(package, t) for t in taught), package
    # A taught package that is in a set is skipped there.
    assert not any(
        q["package"] == "json"
        for q in package_questions(NEAR_DOMAIN_PROBE_PACKAGES, PROBE_PHRASINGS, "s", skip=["json"])
    )


def test_each_later_look_adds_new_probes_doubling_every_category(docs_split):
    counts = {"general_knowledge": 3, "chit_chat": 2, "near_domain": 3, "on_topic": 2}
    config = EvalConfig(probe_counts=counts, probe_questions=HAND_PICKED)
    seen, taught = seen_questions(docs_split, TEMPLATE), taught_packages(docs_split)
    first = _probes(docs_split, counts)  # what the evaluate stage asks at look 1, hand-picked included
    second, third = (look_probes(config, taught, seen, look) for look in (2, 3))
    assert Counter(p["category"] for p in second) == counts  # look 2 doubles each count: as many again
    assert Counter(p["category"] for p in third) == {c: 2 * n for c, n in counts.items()}
    asked = [p["question"] for p in first + second + third]
    assert len(asked) == len(set(asked)), "a later look only adds questions never asked"
    grown = select_probes(probe_candidates(config, taught, seen), look_counts(counts, 3), [], seen)
    assert {p["question"] for p in grown} == set(asked) - set(HAND_PICKED), "looks 1-3 are the first 4x draw"
    assert not {normalise_text(q) for q in asked} & {normalise_text(q) for q in seen}
    with pytest.raises(ValueError, match="look 1 is the evaluate stage's"):
        look_probes(config, taught, seen, 1)


def test_a_long_draw_asks_each_object_again_in_another_wording():
    once = list(package_questions(["more_itertools"], PROBE_PHRASINGS, "s"))
    thrice = list(package_questions(["more_itertools"], PROBE_PHRASINGS, "s", wordings=3))
    assert thrice[: len(once)] == once and len(thrice) == 3 * len(once)  # the first pass is unchanged
    by_object: dict[str, list[str]] = {}
    for q in thrice:
        by_object.setdefault(q["name"], []).append(q["question"])
    assert all(len(set(asked)) == 3 for asked in by_object.values()), "three different wordings of each object"
    assert len(list(package_questions(["more_itertools"], PROBE_PHRASINGS, "s", wordings=99))) == 6 * len(once)


# --------------------------------------------------------------------------- the docs source's near-domain refusals


def test_docs_source_emits_near_domain_refusal_rows_in_the_training_phrasings():
    rows = read_docs_source(DocsSource(phrasings=2, max_objects=3, offtopic=0, near_domain=7))
    near = [r for r in rows if r["source"] == "near_domain:more_itertools"]
    assert len(near) == 7 and len({r["question"] for r in near}) == 7
    assert all(r["answer"] == REFUSAL.format(package="more_itertools") for r in near)
    packages = [
        next(p for p in NEAR_DOMAIN_TRAIN_PACKAGES if re.search(rf"(?<![\w.]){re.escape(p)}(?=[.;, ])", r["question"]))
        for r in near
    ]
    assert len(set(packages)) == 7  # round-robin: a short draw spans the packages
    templates = [normalise_text(t.split("{")[0]) for t in QUESTION_PHRASINGS[:2]]
    assert all(normalise_text(r["question"]).startswith(tuple(templates)) for r in near)


def test_a_taught_training_package_gets_no_near_domain_questions_about_itself():
    rows = read_docs_source(DocsSource(package="csv", phrasings=1, offtopic=0, near_domain=40))
    assert not [r for r in rows if r["source"].startswith("near_domain") and "csv" in r["question"]]


# --------------------------------------------------------------------------- figures


def test_summarise_gives_per_category_refusal_rates_and_counts():
    rows = [
        {
            "category": "ok",
            "categories": "",
            "offtopic_question": False,
            "declined": flag,
            "exact_match": False,
            "similarity": 0.5,
            "rouge_l": 0.5,
            "token_f1": 0.5,
            "length_ratio": 1.0,
            "repetition": 0.0,
            "empty": False,
            "answer": "a b",
        }
        for flag in (True, False, False, False)
    ]
    declined = {
        "general_knowledge": [True, True, True, False],
        "chit_chat": [True, True],
        "near_domain": [False, True],
        "on_topic": [True, False, False, False, False],
        "hand_picked": [True],
    }
    probes = [{"category": c, "declined": d} for c, flags in declined.items() for d in flags]
    summary = summarise(rows, probes, 0)
    assert summary["refusal_rate"] == pytest.approx(7 / 9)  # every off-topic probe, hand-picked included
    assert summary["refusal_rate.general_knowledge"] == 0.75 and summary["refusal_rate.chit_chat"] == 1.0
    assert summary["refusal_rate.near_domain"] == 0.5 and summary["refusal_rate.hand_picked"] == 1.0
    assert "refusal_rate.on_topic" not in summary
    assert summary["false_refusal_rate"] == 0.2 and summary["false_refusal_rate_test"] == 0.25
    assert summary["probe_counts"] == {
        "general_knowledge": {"n": 4, "declined": 3},
        "chit_chat": {"n": 2, "declined": 2},
        "near_domain": {"n": 2, "declined": 1},
        "on_topic": {"n": 5, "declined": 1},
        "hand_picked": {"n": 1, "declined": 1},
    }
    assert set(OFFTOPIC_PROBE_CATEGORIES) - {"hand_picked"} <= set(PROBE_CATEGORIES)
    no_on_topic = summarise(rows, [p for p in probes if p["category"] != "on_topic"], 0)
    assert "false_refusal_rate" not in no_on_topic  # nothing measured: left out, not 0


# --------------------------------------------------------------------------- config and refine


def test_probe_counts_are_validated_by_category_name():
    assert EvalConfig().probe_counts == {c: 30 for c in PROBE_CATEGORIES}
    assert EvalConfig(probe_counts={"chit_chat": 2}).probe_counts == {
        **dict.fromkeys(PROBE_CATEGORIES, 0),
        "chit_chat": 2,
    }
    with pytest.raises(ConfigError, match=r"eval.probe_counts: expected probe categories .*unknown key.*\['trivia'\]"):
        load_config(None, ["eval.probe_counts.trivia=3"])
    with pytest.raises(ConfigError, match=r"eval.probe_counts.chit_chat: Input should be greater than or equal to 0"):
        load_config(None, ["eval.probe_counts.chit_chat=-1"])
    with pytest.raises(ConfigError, match=r"eval.probes was replaced by eval.probe_counts"):
        load_config(None, ["eval.probes=20"])
    assert load_config("configs/tiny.yaml").eval.probe_counts == {c: 2 for c in PROBE_CATEGORIES}


def test_a_near_domain_failure_asks_for_more_near_domain_refusals():
    assert "more_near_domain_refusals" in REFINE_CHANGES and set(REFINE_CHANGES) == set(CHANGES)
    assert changes_for("eval.refusal_rate.near_domain", DEFAULT_REFINE_ACTIONS) == ["more_near_domain_refusals"]
    assert changes_for("eval.refusal_rate.chit_chat", DEFAULT_REFINE_ACTIONS) == ["more_refusals"]
    assert changes_for("eval.refusal_rate", DEFAULT_REFINE_ACTIONS) == ["more_refusals"]
    assert changes_for("benchmark.arc_easy.acc_norm", DEFAULT_REFINE_ACTIONS) == ["replay_general"]
    assert changes_for("eval.unknown", DEFAULT_REFINE_ACTIONS) == []
    data = DataConfig(sources=[DocsSource(near_domain=40), DocsSource(package="json", near_domain=0)])
    overrides, why = CHANGES["more_near_domain_refusals"](data)
    assert overrides == ["data.sources.0.near_domain=70", "data.sources.1.near_domain=30"] and why
    assert CHANGES["more_near_domain_refusals"](DataConfig(sources=[DocsSource(near_domain=150)]))[0] == [
        "data.sources.0.near_domain=225"
    ]


def test_false_refusals_ask_for_fewer_near_domain_refusals_unless_the_near_domain_gate_asked_for_more():
    data = DataConfig(sources=[DocsSource(near_domain=150, phrasings=3), DocsSource(package="json", near_domain=5)])
    assert CHANGES["fewer_near_domain_refusals"](data)[0] == ["data.sources.0.near_domain=112"]
    false_refusals = {"gate": "false", "metric": "eval.false_refusal_rate", "decision": "fail"}
    near_domain = {"gate": "near", "metric": "eval.refusal_rate.near_domain", "decision": "fail"}
    alone = plan_changes([false_refusals], data, RefineConfig())
    assert [c["change"] for c in alone] == ["fewer_near_domain_refusals"]
    both = plan_changes([near_domain, false_refusals], data, RefineConfig())
    # The two gates pull near_domain both ways: the first gate's change keeps the key.
    assert [(c["gate"], c["change"]) for c in both] == [("near", "more_near_domain_refusals")]
    similarity = {"gate": "sim", "metric": "eval.similarity_mean", "decision": "fail"}
    shared_key = RefineConfig(actions={**DEFAULT_REFINE_ACTIONS, "eval.similarity_mean": ["more_near_domain_refusals"]})
    assert [c["gate"] for c in plan_changes([similarity, false_refusals], data, shared_key)] == ["sim"]
