"""The gate stage's core: per-item values, interval verdicts, the round status, side-by-side rows, worst
answers, the Bradley-Terry ranking and the report, on small synthetic `ModelItems`."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pipeline.config import ConfigError, EloConfig, EvalConfig, Gate, load_config
from pipeline.stats import (
    NEWCOMBE_METHOD,
    WILSON_METHOD,
    mcnemar_exact_p,
    paired_binary_difference,
    paired_mean_difference,
    per_look_confidence,
    verdict,
    wilson_interval,
)
from tasks.evaluate import summarise
from tasks.gate import (
    GateMetricMissing,
    ModelItems,
    comparisons,
    decide_gate,
    finalise_decisions,
    gate_estimate,
    growth_kind,
    is_binary,
    item_values,
    make_judge,
    metric_judge,
    plot_comparison,
    plot_intervals,
    rank_versions,
    report_markdown,
    round_status,
    side_by_side,
    similarity_judge,
    to_grow,
    version_labels,
    worst_answers,
)

CONFIDENCE = 0.95
LOOKS = 4  # the default growing sample: 200, 400, 800, all

# --------------------------------------------------------------------------- synthetic items


def _row(
    i: int,
    similarity: float,
    category: str = "ok",
    *,
    prefix: str = "q",
    exact: bool = False,
    categories: str | None = None,
    declined: bool = False,
) -> dict[str, Any]:
    """One answers.parquet row (the columns the gate reads)."""
    return {
        "id": f"{prefix}{i}",
        "question": f"Question {i}?",
        "target": f"target {i}",
        "answer": f"answer {i} ({similarity})",
        "category": category,
        "categories": categories if categories is not None else ("" if category == "ok" else category),
        "exact_match": exact,
        "similarity": similarity,
        "rouge_l": round(similarity / 2, 6),
        "token_f1": round(similarity / 3, 6),
        "length_ratio": 1.0 + similarity,
        "repetition": 0.0,
        "empty": False,
        "declined": declined,
        "offtopic_question": False,
    }


def _answers(sims: list[float], categories: list[str] | None = None, prefix: str = "q") -> list[dict]:
    categories = categories or ["ok"] * len(sims)
    return [_row(i, s, c, prefix=prefix) for i, (s, c) in enumerate(zip(sims, categories))]


def _probes(counts: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Probes keyed by question: per category (declined, asked); on_topic probes expect an answer."""
    probes = {}
    for category, (declined, asked) in counts.items():
        for k in range(asked):
            question = f"{category} probe {k}?"
            probes[question] = {
                "question": question,
                "category": category,
                "expected": "answer" if category == "on_topic" else "decline",
                "declined": k < declined,
            }
    return probes


def _bench(acc_norm: dict[int, int], task: str = "arc_easy") -> dict[str, dict[int, dict[str, Any]]]:
    """Benchmark outcomes {task: {doc_id: row}}; acc is the opposite of acc_norm, so a gate reading the wrong
    column gives a visibly different answer."""
    return {
        task: {
            doc: {"doc_id": doc, "acc": float(1 - right), "acc_norm": float(right)} for doc, right in acc_norm.items()
        }
    }


def _items(answers: list[dict] = (), probes: dict | None = None, benchmark: dict | None = None) -> ModelItems:
    return ModelItems({row["id"]: row for row in answers}, probes or {}, benchmark or {})


def _shuffled(mapping: dict, seed: int) -> dict:
    """The same dict in another insertion order."""
    entries = list(mapping.items())
    random.Random(seed).shuffle(entries)
    return dict(entries)


# 32 off-topic probes, 26 declined (0.8125), and 10 on-topic probes, 3 declined: counting the on-topic ones
# as refusals would give 29/42.
PROBE_COUNTS = {
    "general_knowledge": (9, 10),
    "chit_chat": (10, 10),
    "near_domain": (5, 10),
    "hand_picked": (2, 2),
    "on_topic": (3, 10),
}


# --------------------------------------------------------------------------- per-item values


@pytest.mark.parametrize(
    "metric, binary",
    [
        ("eval.exact_match", True),
        ("eval.refusal_rate", True),
        ("eval.refusal_rate.near_domain", True),
        ("eval.false_refusal_rate", True),
        ("eval.too_long_rate", True),
        ("eval.repetition_rate", True),
        ("eval.similarity_mean", False),
        ("eval.rouge_l", False),
        ("eval.token_f1", False),
        ("eval.length_ratio_mean", False),
        ("benchmark.arc_easy.acc", True),
        ("benchmark.piqa.acc_norm", True),
    ],
)
def test_is_binary_tells_rates_from_means(metric, binary):
    assert is_binary(metric) is binary


def test_refusal_values_come_from_the_right_probes():
    items = _items(probes=_probes(PROBE_COUNTS))
    refusal = item_values("eval.refusal_rate", items)
    assert len(refusal) == 32 and sum(refusal.values()) == 26
    assert all(not q.startswith("on_topic") for q in refusal)
    near = item_values("eval.refusal_rate.near_domain", items)
    assert len(near) == 10 and sum(near.values()) == 5 and all(q.startswith("near_domain") for q in near)
    false_refusal = item_values("eval.false_refusal_rate", items)
    assert len(false_refusal) == 10 and sum(false_refusal.values()) == 3
    assert all(items.probes[q]["expected"] == "answer" for q in false_refusal)


def test_point_figures_equal_the_evaluate_summary_of_the_same_rows():
    """metrics.json (the gate's points) and summary.json (evaluate) must agree on every shared figure."""
    rows = [
        _row(0, 0.9, exact=True),
        _row(1, 0.2, "off_topic"),
        _row(2, 0.1, "too_short", categories="too_short,repetitive"),
        _row(3, 0.5, "too_long"),
        _row(4, 0.7),
        _row(5, 0.3, "repetitive"),
    ]
    rows[2]["empty"], rows[2]["repetition"] = True, 0.4
    probes = _probes(PROBE_COUNTS)
    summary = summarise(rows, list(probes.values()), excluded_empty_target=0)
    points = _items(rows, probes, _bench({0: 1, 1: 0, 2: 1, 3: 1})).points
    shared = [name for name in points if name.removeprefix("eval.") in summary]
    assert len(shared) >= 18
    for name in shared:
        assert points[name] == pytest.approx(summary[name.removeprefix("eval.")]), name
    assert points["benchmark.arc_easy.acc_norm"] == 0.75 and points["benchmark.arc_easy.acc"] == 0.25


def test_point_figures_leave_out_what_was_not_measured():
    points = _items(_answers([0.5, 0.7])).points
    assert points["eval.similarity_mean"] == pytest.approx(0.6)
    assert not any(name.startswith(("eval.refusal_rate", "eval.false_refusal", "benchmark.")) for name in points)


# --------------------------------------------------------------------------- relative gates


def _arc_outcomes() -> tuple[dict[int, int], dict[int, int]]:
    """120 shared questions: base right on the even ids; tuned right & base wrong on 12, the reverse on 24."""
    base = {i: int(i % 2 == 0) for i in range(120)}
    tuned = dict(base)
    for i in range(120):
        if i % 10 == 1:
            tuned[i] = 1
        elif i % 10 in (0, 2):
            tuned[i] = 0
    return tuned, base


def test_a_relative_benchmark_gate_is_the_newcombe_interval_with_mcnemar_on_shared_doc_ids():
    tuned_right, base_right = _arc_outcomes()
    base_with_extra = {**base_right, **{doc: 1 for doc in range(1000, 1080)}}  # questions the tuned lacks
    tuned = _items(benchmark=_bench(_shuffled(tuned_right, 1)))
    base = _items(benchmark=_bench(_shuffled(base_with_extra, 2)))
    gate = Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True)

    result = decide_gate(gate, tuned, base, CONFIDENCE, LOOKS)

    level = per_look_confidence(CONFIDENCE, LOOKS)
    ids = sorted(tuned_right)
    expected = paired_binary_difference([tuned_right[i] for i in ids], [base_right[i] for i in ids], confidence=level)
    assert result["method"] == NEWCOMBE_METHOD
    assert result["n"] == 120, "only the doc ids both models answered pair up"
    assert result["discordant"] == [12, 24] == list(expected.discordant)
    assert (
        result["p_value"]
        == pytest.approx(expected.p_value, abs=1e-6)
        == pytest.approx(mcnemar_exact_p(12, 24), abs=1e-6)
    )
    assert result["estimate"] == pytest.approx(-0.1)
    assert (result["low"], result["high"]) == (
        pytest.approx(expected.low, abs=1e-6),
        pytest.approx(expected.high, abs=1e-6),
    )
    assert result["confidence"] == pytest.approx(level) and result["looks"] == LOOKS
    assert result["verdict"] == verdict(expected, ">=", -0.03)
    assert result["gate"] == "benchmark.arc_easy.acc_norm - base >= -0.03" and result["relative_to_base"] is True
    # the other column of the same questions: acc is 1 - acc_norm here, so the difference flips sign
    acc = decide_gate(
        Gate(metric="benchmark.arc_easy.acc", value=-0.03, relative_to_base=True), tuned, base, CONFIDENCE, LOOKS
    )
    assert acc["estimate"] == pytest.approx(0.1) and acc["discordant"] == [24, 12]


def test_relative_benchmark_pairing_is_by_doc_id_not_by_position():
    rng = random.Random(7)
    outcomes = {doc: rng.randint(0, 1) for doc in range(80)}
    tuned = _items(benchmark=_bench(_shuffled(outcomes, 3)))
    base = _items(benchmark=_bench(_shuffled(outcomes, 4)))
    result = decide_gate(
        Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True), tuned, base, CONFIDENCE, LOOKS
    )
    assert result["discordant"] == [0, 0] and result["p_value"] == 1.0 and result["estimate"] == 0.0
    assert result["n"] == 80


def test_a_relative_continuous_gate_is_the_paired_bootstrap_on_shared_rows():
    rng = random.Random(11)
    tuned_rows = [_row(i, round(rng.uniform(0.3, 0.9), 3)) for i in range(60)]
    base_rows = [_row(i, round(rng.uniform(0.1, 0.7), 3)) for i in range(100)]  # 40 rows the tuned did not answer
    gate = Gate(metric="eval.similarity_mean", value=0.05, relative_to_base=True)

    result = decide_gate(gate, _items(tuned_rows), _items(base_rows), CONFIDENCE, LOOKS)

    keys = sorted((r["id"] for r in tuned_rows), key=str)
    by_id_t, by_id_b = {r["id"]: r for r in tuned_rows}, {r["id"]: r for r in base_rows}
    expected = paired_mean_difference(
        [by_id_t[k]["similarity"] for k in keys], [by_id_b[k]["similarity"] for k in keys], confidence=CONFIDENCE
    )
    assert result["method"] == expected.method and result["method"].startswith("paired bootstrap (BCa")
    assert result["n"] == 60
    assert result["estimate"] == pytest.approx(
        sum(by_id_t[k]["similarity"] - by_id_b[k]["similarity"] for k in keys) / 60, abs=1e-6
    )
    assert (result["low"], result["high"]) == (
        pytest.approx(expected.low, abs=1e-6),
        pytest.approx(expected.high, abs=1e-6),
    )
    assert result["low"] < result["estimate"] < result["high"]
    assert result["p_value"] is None and result["discordant"] is None
    assert result["confidence"] == CONFIDENCE and result["looks"] == 1, "an eval gate has one look"
    # the rows' order in the artifacts does not change anything
    shuffled = decide_gate(
        gate, _items(random.Random(5).sample(tuned_rows, 60)), _items(base_rows[::-1]), CONFIDENCE, LOOKS
    )
    assert shuffled == result


def test_a_relative_binary_eval_gate_pairs_test_rows_by_id():
    tuned = [_row(i, 0.5, exact=i < 30) for i in range(40)]
    base = [_row(i, 0.5, exact=10 <= i < 35) for i in range(40)]
    result = decide_gate(
        Gate(metric="eval.exact_match", value=0.0, relative_to_base=True),
        _items(tuned),
        _items(base[::-1]),
        CONFIDENCE,
        LOOKS,
    )
    assert result["method"] == NEWCOMBE_METHOD and result["discordant"] == [10, 5] and result["n"] == 40
    assert result["p_value"] == pytest.approx(mcnemar_exact_p(10, 5), abs=1e-6) and result["looks"] == 1


# --------------------------------------------------------------------------- absolute gates


def test_an_absolute_refusal_gate_is_wilson_on_the_off_topic_probes_only():
    tuned = _items(_answers([0.5]), _probes(PROBE_COUNTS))
    result = decide_gate(Gate(metric="eval.refusal_rate", value=0.8), tuned, _items(), CONFIDENCE, 1)
    expected = wilson_interval(26, 32, CONFIDENCE)
    assert result["method"] == WILSON_METHOD and result["n"] == 32
    assert result["estimate"] == pytest.approx(26 / 32) == pytest.approx(result["tuned_value"])
    assert (result["low"], result["high"]) == (
        pytest.approx(expected.low, abs=1e-6),
        pytest.approx(expected.high, abs=1e-6),
    )
    assert result["confidence"] == CONFIDENCE and result["looks"] == 1
    assert result["verdict"] == "inconclusive" and result["decision"] == "pending"
    assert isinstance(result["items_to_decide"], int) and result["items_to_decide"] > 32


def test_a_category_refusal_gate_and_the_false_refusal_gate_take_their_own_probes():
    tuned = _items(probes=_probes(PROBE_COUNTS))
    near = decide_gate(Gate(metric="eval.refusal_rate.near_domain", value=0.8), tuned, _items(), CONFIDENCE, 1)
    assert (near["n"], near["estimate"]) == (10, 0.5)
    assert near["low"] == pytest.approx(wilson_interval(5, 10, CONFIDENCE).low, abs=1e-6)
    false_refusal = decide_gate(
        Gate(metric="eval.false_refusal_rate", op="<=", value=0.1), tuned, _items(), CONFIDENCE, 1
    )
    assert (false_refusal["n"], false_refusal["estimate"]) == (10, 0.3)
    assert false_refusal["high"] == pytest.approx(wilson_interval(3, 10, CONFIDENCE).high, abs=1e-6)


def test_an_absolute_continuous_gate_bootstraps_the_tuned_mean():
    sims = [0.2, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.35, 0.45, 0.65]
    result = decide_gate(
        Gate(metric="eval.similarity_mean", value=0.3), _items(_answers(sims)), _items(), CONFIDENCE, LOOKS
    )
    assert result["estimate"] == pytest.approx(sum(sims) / len(sims), abs=1e-6) and result["n"] == 10
    assert result["method"].startswith("paired bootstrap") and result["low"] < result["estimate"] < result["high"]
    assert result["base_value"] is None


# --------------------------------------------------------------------------- verdicts and confidence


@pytest.mark.parametrize(
    "op, where, expected",
    [
        (">=", "below", "pass"),
        (">=", "above", "fail"),
        (">=", "inside", "inconclusive"),
        ("<=", "above", "pass"),
        ("<=", "below", "fail"),
        ("<=", "inside", "inconclusive"),
    ],
)
def test_the_three_verdicts_follow_the_whole_interval(op, where, expected):
    interval = wilson_interval(26, 32, CONFIDENCE)
    threshold = {
        "below": interval.low - 0.01,
        "above": interval.high + 0.01,
        "inside": (interval.low + interval.estimate) / 2,
    }[where]
    result = decide_gate(
        Gate(metric="eval.refusal_rate", op=op, value=threshold),
        _items(probes=_probes(PROBE_COUNTS)),
        _items(),
        CONFIDENCE,
        1,  # one look: the interval is the 95% one above
    )
    assert result["verdict"] == expected
    assert result["decision"] == {"pass": "pass", "fail": "fail", "inconclusive": "pending"}[expected]
    assert result["passed"] is (expected == "pass") and result["decided_by"] == "interval"
    assert (result["items_to_decide"] is None) is (expected != "inconclusive")
    assert result["mde"] > 0


@pytest.mark.parametrize("op", [">=", "<="])
def test_an_interval_touching_the_threshold_passes(op):
    tuned = _answers([0.75, 0.5, 1.0, 0.625])
    base = _answers([0.5, 0.25, 0.75, 0.375])  # every difference exactly 0.25: the interval is [0.25, 0.25]
    result = decide_gate(
        Gate(metric="eval.similarity_mean", op=op, value=0.25, relative_to_base=True),
        _items(tuned),
        _items(base),
        CONFIDENCE,
        LOOKS,
    )
    assert (result["low"], result["high"]) == (0.25, 0.25) and "degenerate" in result["method"]
    assert result["verdict"] == "pass"


def test_benchmark_gates_split_alpha_over_the_looks_and_eval_gates_do_not():
    tuned_right, base_right = _arc_outcomes()
    tuned = _items(_answers([0.6, 0.7, 0.8]), benchmark=_bench(tuned_right))
    base = _items(_answers([0.5, 0.5, 0.5]), benchmark=_bench(base_right))
    bench_gate = Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True)
    eval_gate = Gate(metric="eval.exact_match", value=-0.5, relative_to_base=True)
    four, one = (decide_gate(bench_gate, tuned, base, CONFIDENCE, looks) for looks in (4, 1))
    assert four["confidence"] == pytest.approx(per_look_confidence(CONFIDENCE, 4)) == pytest.approx(0.9875)
    assert one["confidence"] == CONFIDENCE
    assert four["low"] < one["low"] and four["high"] > one["high"], "a per-look interval is wider"
    absolute = decide_gate(Gate(metric="benchmark.arc_easy.acc_norm", value=0.3), tuned, base, CONFIDENCE, 4)
    wilson = wilson_interval(48, 120, per_look_confidence(CONFIDENCE, 4))
    assert absolute["method"] == WILSON_METHOD and absolute["n"] == 120 and absolute["looks"] == 4
    assert (absolute["low"], absolute["high"]) == (
        pytest.approx(wilson.low, abs=1e-6),
        pytest.approx(wilson.high, abs=1e-6),
    )
    for looks in (1, 4):
        result = decide_gate(eval_gate, tuned, base, CONFIDENCE, looks)
        assert result["confidence"] == CONFIDENCE and result["looks"] == 1
    # Probe gates can draw more probes, so they split alpha like a benchmark gate.
    probes = _items(probes=_probes({"near_domain": (20, 30), "on_topic": (3, 30)}))
    for metric in ("eval.refusal_rate", "eval.refusal_rate.near_domain", "eval.false_refusal_rate"):
        result = decide_gate(Gate(metric=metric, value=0.5), probes, probes, CONFIDENCE, 4)
        assert result["looks"] == 4 and result["confidence"] == pytest.approx(0.9875), metric


# --------------------------------------------------------------------------- missing metrics


def test_a_gate_on_an_unmeasured_metric_names_it():
    tuned = _items(_answers([0.5, 0.6]))
    with pytest.raises(
        GateMetricMissing,
        match=r"eval.refusal_rate was not measured for the fine-tuned model "
        r"\(measured: .*eval.exact_match",
    ) as error:
        decide_gate(Gate(metric="eval.refusal_rate", value=0.5), tuned, _items(), CONFIDENCE, LOOKS)
    assert str(error.value).startswith("gate 'eval.refusal_rate >= 0.5'")  # not KeyError's quoted repr
    with pytest.raises(GateMetricMissing, match=r"benchmark.arc_easy.acc_norm was not measured for the base model"):
        decide_gate(
            Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True),
            _items(benchmark=_bench({0: 1})),
            _items(benchmark=_bench({0: 1}, task="piqa")),
            CONFIDENCE,
            LOOKS,
        )
    with pytest.raises(GateMetricMissing, match=r"share no items for benchmark.arc_easy.acc_norm"):
        decide_gate(
            Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True),
            _items(benchmark=_bench({0: 1, 1: 0})),
            _items(benchmark=_bench({2: 1, 3: 0})),
            CONFIDENCE,
            LOOKS,
        )


# --------------------------------------------------------------------------- round status


def _benchmark_verdict(outcome: str) -> dict[str, Any]:
    """A real decide_gate result for a relative ARC gate with the wanted verdict."""
    base = {doc: doc % 2 for doc in range(100)}
    tuned = {
        "pass": {doc: 1 for doc in base},
        "fail": {doc: 0 for doc in base},
        # ten questions each way: the difference is 0 and the interval straddles -0.03
        "inconclusive": {doc: (1 - right if doc < 20 else right) for doc, right in base.items()},
    }[outcome]
    result = decide_gate(
        Gate(metric="benchmark.arc_easy.acc_norm", value=-0.03, relative_to_base=True),
        _items(benchmark=_bench(tuned)),
        _items(benchmark=_bench(base)),
        CONFIDENCE,
        LOOKS,
    )
    assert result["verdict"] == outcome
    return result


def _eval_verdict(outcome: str) -> dict[str, Any]:
    declined = {"pass": 32, "fail": 16, "inconclusive": 26}[outcome]
    result = decide_gate(
        Gate(metric="eval.refusal_rate", value=0.8),
        _items(probes=_probes({"chit_chat": (declined, 32)})),
        _items(),
        CONFIDENCE,
        LOOKS,
    )
    assert result["verdict"] == outcome
    return result


def _settle(verdicts: list[dict], can_grow: bool, on_inconclusive: str) -> str:
    """What the gate stage does with a round's verdicts."""
    if round_status(verdicts, can_grow, on_inconclusive) != "grow":
        finalise_decisions(verdicts, on_inconclusive, can_grow)
    return round_status(verdicts, can_grow, on_inconclusive)


def test_a_benchmark_gate_that_could_grow_is_not_failed_by_the_policy_when_another_gate_ends_the_round():
    # An inconclusive gate on the test answers (fixed items) with policy 'fail' ends the round at look 1; the ARC
    # gate was merely inconclusive on 200 questions, so it must not count as failed (refine would change data for it).
    verdicts = [_benchmark_verdict("inconclusive"), _answer_verdict("inconclusive")]
    assert _settle(verdicts, can_grow=True, on_inconclusive="fail") == "fail"
    assert verdicts[1]["decision"] == "fail" and verdicts[1]["decided_by"] == "gates_on_inconclusive"
    assert verdicts[0]["decision"] == "pending" and not verdicts[0]["passed"]
    from tasks.refine import plan_changes

    planned = plan_changes(verdicts, load_config("configs/tiny.yaml").data, load_config("configs/tiny.yaml").refine)
    assert all(change["gate"] != verdicts[0]["gate"] for change in planned), planned


@pytest.mark.parametrize("on_inconclusive", ["fail", "pass"])
def test_a_failed_gate_fails_the_round_even_when_a_benchmark_gate_could_grow(on_inconclusive):
    verdicts = [_benchmark_verdict("inconclusive"), _eval_verdict("fail")]
    assert round_status(verdicts, can_grow=True) == "fail"
    assert _settle(verdicts, True, on_inconclusive) == "fail"
    assert round_status([_benchmark_verdict("fail"), _benchmark_verdict("inconclusive")], can_grow=True) == "fail"


def test_an_inconclusive_benchmark_gate_grows_while_looks_remain():
    verdicts = [_benchmark_verdict("inconclusive"), _eval_verdict("pass")]
    assert _settle(verdicts, can_grow=True, on_inconclusive="fail") == "grow"
    assert verdicts[0]["decision"] == "pending" and verdicts[0]["decided_by"] == "interval"
    assert verdicts[0]["passed"] is False and verdicts[1]["decision"] == "pass"


@pytest.mark.parametrize("on_inconclusive", ["fail", "pass"])
def test_at_the_last_look_gates_on_inconclusive_decides(on_inconclusive):
    verdicts = [_benchmark_verdict("inconclusive"), _eval_verdict("pass")]
    assert _settle(verdicts, can_grow=False, on_inconclusive=on_inconclusive) == on_inconclusive
    assert verdicts[0]["verdict"] == "inconclusive", "the evidence is still reported as it was"
    assert verdicts[0]["decision"] == on_inconclusive and verdicts[0]["decided_by"] == "gates_on_inconclusive"
    assert verdicts[0]["passed"] is (on_inconclusive == "pass")
    assert verdicts[1]["decided_by"] == "interval", "a decided gate keeps its own verdict"


def _answer_verdict(outcome: str) -> dict[str, Any]:
    """A real decide_gate result for a gate on the test answers (exact match on 40 rows) with the wanted verdict."""
    exact = {"pass": 36, "fail": 4, "inconclusive": 20}[outcome]
    rows = [_row(i, 0.5, exact=i < exact) for i in range(40)]
    result = decide_gate(Gate(metric="eval.exact_match", value=0.5), _items(rows), _items(), CONFIDENCE, LOOKS)
    assert result["verdict"] == outcome
    return result


@pytest.mark.parametrize("on_inconclusive", ["fail", "pass"])
def test_an_inconclusive_gate_on_the_test_answers_never_grows(on_inconclusive):
    verdicts = [_answer_verdict("inconclusive"), _benchmark_verdict("pass")]
    assert round_status(verdicts, can_grow=True) != "grow"
    assert _settle(verdicts, can_grow=True, on_inconclusive=on_inconclusive) == on_inconclusive
    assert verdicts[0]["decided_by"] == "gates_on_inconclusive"


def test_an_inconclusive_probe_gate_grows_the_probes_and_only_them():
    verdicts = [_eval_verdict("inconclusive"), _benchmark_verdict("pass")]
    assert _settle(verdicts, can_grow=True, on_inconclusive="fail") == "grow"
    assert to_grow(verdicts) == ["probes"] and verdicts[0]["decision"] == "pending"
    both = [_eval_verdict("inconclusive"), _benchmark_verdict("inconclusive")]
    assert _settle(both, can_grow=True, on_inconclusive="fail") == "grow" and to_grow(both) == ["benchmark", "probes"]
    # ...but an inconclusive gate on the test answers settles the round first: nothing grows for nothing.
    settled = [_eval_verdict("inconclusive"), _answer_verdict("inconclusive")]
    assert _settle(settled, can_grow=True, on_inconclusive="fail") == "fail"
    last = [_eval_verdict("inconclusive"), _benchmark_verdict("pass")]
    assert _settle(last, can_grow=False, on_inconclusive="fail") == "fail"
    assert last[0]["decided_by"] == "gates_on_inconclusive"
    assert [growth_kind(m) for m in ("eval.refusal_rate.chit_chat", "eval.similarity_mean", "benchmark.x.acc")] == [
        "probes",
        None,
        "benchmark",
    ]


def test_a_round_passes_when_every_gate_passes():
    assert _settle([_benchmark_verdict("pass"), _eval_verdict("pass")], True, "fail") == "pass"
    assert round_status([], can_grow=True) == "pass"


# --------------------------------------------------------------------------- comparisons


def test_comparisons_give_value_and_paired_difference_intervals_for_what_both_models_have():
    tuned_right, base_right = _arc_outcomes()
    tuned = _items(_answers([0.6, 0.7, 0.8, 0.9]), _probes({"chit_chat": (8, 10)}), _bench(tuned_right))
    base = _items(_answers([0.5, 0.5, 0.6, 0.4]), {}, _bench(base_right))
    out = comparisons(tuned, base, CONFIDENCE)
    assert "eval.refusal_rate" not in out, "the base has no probes"
    assert {"eval.similarity_mean", "eval.exact_match", "benchmark.arc_easy.acc", "benchmark.arc_easy.acc_norm"} <= set(
        out
    )
    arc = out["benchmark.arc_easy.acc_norm"]
    assert arc["value"]["method"] == WILSON_METHOD and arc["value"]["estimate"] == pytest.approx(48 / 120, abs=1e-6)
    assert arc["difference"]["method"] == NEWCOMBE_METHOD and arc["difference"]["discordant"] == [12, 24]
    assert out["eval.similarity_mean"]["difference"]["estimate"] == pytest.approx(0.25, abs=1e-6)
    estimate, kind = gate_estimate(
        Gate(metric="eval.similarity_mean", value=0.0, relative_to_base=True), tuned, base, CONFIDENCE
    )
    assert kind == "paired_mean" and estimate.as_dict() == out["eval.similarity_mean"]["difference"]


# --------------------------------------------------------------------------- side by side and worst answers


def test_side_by_side_matches_rows_by_id():
    base = _answers([0.1, 0.2], ["off_topic", "ok"])
    tuned = list(reversed(_answers([0.7, 0.9], ["ok", "too_long"])))
    rows = side_by_side(base, tuned)
    assert [r["question"] for r in rows] == ["Question 1?", "Question 0?"]
    assert rows[0] == {
        "question": "Question 1?",
        "target": "target 1",
        "base_answer": "answer 1 (0.2)",
        "tuned_answer": "answer 1 (0.9)",
        "base_similarity": 0.2,
        "tuned_similarity": 0.9,
        "base_category": "ok",
        "tuned_category": "too_long",
    }


def test_worst_answers_are_the_five_least_similar_per_category():
    rows = _answers([0.5, 0.1, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6], ["off_topic"] * 7 + ["ok"])
    worst = worst_answers(rows)
    assert list(worst) == ["off_topic"]
    assert [r["similarity"] for r in worst["off_topic"]] == [0.05, 0.1, 0.2, 0.3, 0.4]


# --------------------------------------------------------------------------- judges and ranking


def test_metric_judges_win_lose_and_draw_within_the_margin():
    assert similarity_judge({"similarity": 0.9}, {"similarity": 0.1}) == 1.0
    assert similarity_judge({"similarity": 0.1}, {"similarity": 0.9}) == 0.0
    assert similarity_judge({"similarity": 0.51}, {"similarity": 0.50}) == 0.5  # default margin 0.02
    judge = metric_judge("rouge_l", margin=0.1)
    assert judge({"rouge_l": 0.5}, {"rouge_l": 0.45}) == 0.5 and judge({"rouge_l": 0.5}, {"rouge_l": 0.3}) == 1.0
    assert metric_judge("exact_match", margin=0.0)({"exact_match": True}, {"exact_match": False}) == 1.0


def test_ranking_puts_the_version_closer_to_the_targets_first():
    base, round1, round2 = _answers([0.2] * 6), _answers([0.5] * 6), _answers([0.8] * 6)
    table = rank_versions([base, round1, round2], ["base", "round 1", "round 2"])
    assert [r["label"] for r in table] == ["round 2", "round 1", "base"]
    assert [r["rank"] for r in table] == [1, 2, 3]
    assert table[0]["rating"] > table[1]["rating"] > table[2]["rating"]
    assert table[0]["wins"] == 12 and table[-1]["losses"] == 12 and all(r["games"] == 12 for r in table)
    assert table[1]["wins"] == 6 and table[1]["losses"] == 6 and all(r["draws"] == 0 for r in table)
    assert sum(r["rating"] for r in table) == pytest.approx(3000, abs=0.2)  # ratings are relative to a mean of 1000
    for row in table:
        assert row["low"] <= row["rating"] <= row["high"]
    assert [r["mean_similarity"] for r in table] == [0.8, 0.5, 0.2]
    assert rank_versions([base, round1, round2], ["base", "round 1", "round 2"]) == table  # deterministic


def _mixed_versions() -> list[list[dict]]:
    """Three versions that each win some questions: a better one (mean 0.6), two around 0.45."""
    rng = random.Random(3)
    return [_answers([round(rng.uniform(low, low + 0.4), 3) for _ in range(30)]) for low in (0.25, 0.4, 0.25)]


def test_ranking_does_not_depend_on_the_order_of_rows_or_versions():
    """The old sequential Elo moved ratings game by game, so shuffling the questions changed them."""
    versions, labels = _mixed_versions(), ["a", "b", "c"]
    table = rank_versions(versions, labels)
    assert table[0]["label"] == "b" and table[0]["low"] <= table[0]["rating"] <= table[0]["high"]
    assert 0 < table[0]["wins"] < 60 and all(r["games"] == 60 for r in table)
    assert all(r["wins"] + r["draws"] + r["losses"] == r["games"] for r in table)
    for seed in (1, 2, 3):
        shuffled = [random.Random(seed + k).sample(rows, len(rows)) for k, rows in enumerate(versions)]
        assert rank_versions(shuffled, labels) == table
    reversed_table = {r["label"]: r for r in rank_versions(versions[::-1], labels[::-1])}
    for row in table:
        other = reversed_table[row["label"]]
        assert (other["rating"], other["low"], other["high"]) == (
            pytest.approx(row["rating"], abs=0.11),
            pytest.approx(row["low"], abs=0.11),
            pytest.approx(row["high"], abs=0.11),
        )
        assert (other["wins"], other["draws"], other["losses"]) == (row["wins"], row["draws"], row["losses"])


def test_ranking_draws_within_the_margin_and_plays_only_shared_questions():
    a, b = _answers([0.50, 0.50]), _answers([0.51, 0.50, 0.9])
    table = rank_versions([a, b], ["a", "b"])
    assert all(r["games"] == 2 and r["draws"] == 2 for r in table)
    assert [r["rating"] for r in table] == [1000.0, 1000.0] and [r["label"] for r in table] == ["a", "b"]


def test_ranking_takes_any_judge():
    shorter_wins = lambda a, b: 1.0 if len(a["answer"]) < len(b["answer"]) else 0.0  # noqa: E731
    long_answers = [{**r, "answer": r["answer"] * 3} for r in _answers([0.9] * 4)]
    table = rank_versions([long_answers, _answers([0.1] * 4)], ["verbose", "terse"], judge=shorter_wins)
    assert table[0]["label"] == "terse" and table[0]["wins"] == 4
    with pytest.raises(ValueError, match="one label per version"):
        rank_versions([long_answers], ["a", "b"])


def shorter_answer_wins(a: dict, b: dict) -> float:
    """A custom judge named in config as '<this module>:shorter_answer_wins'."""
    return 1.0 if len(a["answer"]) < len(b["answer"]) else 0.0 if len(a["answer"]) > len(b["answer"]) else 0.5


def test_the_config_chooses_the_ranking_judge_a_metric_or_a_function():
    close_but_wordy = [{**r, "rouge_l": 0.1} for r in _answers([0.9] * 4)]  # near the target in meaning only
    far_but_literal = [{**r, "rouge_l": 0.6, "answer": "a"} for r in _answers([0.3] * 4)]
    versions, labels = [close_but_wordy, far_but_literal], ["wordy", "literal"]
    by = lambda judge: rank_versions(versions, labels, make_judge(EloConfig(judge=judge)))[0]["label"]  # noqa: E731
    assert by("similarity") == "wordy" and by("rouge_l") == "literal"
    assert by(f"{__name__}:shorter_answer_wins") == "literal"
    draws = rank_versions(versions, labels, make_judge(EloConfig(judge="rouge_l", draw_margin=0.6)))
    assert all(r["draws"] == 4 for r in draws), "a difference within draw_margin is a draw"


@pytest.mark.parametrize(
    "judge, message",
    [
        (
            "bleu",
            r"elo\.judge: expected one of \['similarity', 'rouge_l', 'token_f1', 'exact_match'\] or 'package\.module:function', found 'bleu'",
        ),
        (
            "no_such_module_xyz:judge",
            r"elo\.judge: expected an importable 'package\.module:function', found 'no_such_module_xyz:judge'",
        ),
        ("json:no_such_function", r"elo\.judge: expected an importable .*found 'json:no_such_function'"),
        ("json:__doc__", r"elo\.judge: expected 'json:__doc__' to name a function, found a str"),
    ],
)
def test_an_unknown_elo_judge_is_a_config_error_before_anything_runs(judge: str, message: str):
    with pytest.raises(ConfigError, match=message):  # the CLI exits 2 on any ConfigError
        load_config(None, [f"elo.judge={judge}"])


def test_config_accepts_new_eval_metrics_and_rejects_unknown_ones_and_tasks():
    load_config(
        None,
        ["gates=[{metric: eval.refusal_rate, value: 0.8}, {metric: eval.false_refusal_rate, op: '<=', value: 0.1}]"],
    )
    with pytest.raises(ConfigError, match="eval.bleu"):
        load_config(None, ["gates=[{metric: eval.bleu, value: 0.1}]"])
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['mmlu'\].*arc_easy.*piqa"):
        load_config(None, ["benchmark.tasks=[arc_easy, mmlu]"])
    with pytest.raises(ConfigError, match="too_short_ratio"):
        load_config(None, ["eval.too_short_ratio=3", "eval.too_long_ratio=2"])
    assert load_config(None, ["benchmark.tasks=[piqa, sciq]"]).benchmark.tasks == ["piqa", "sciq"]
    assert EvalConfig().repetition_penalty is None


def test_version_labels_number_repeats():
    assert version_labels([{"model": "tiny-neox"}, {"model": "fine-tuned"}, {"model": "fine-tuned"}, {}]) == [
        "tiny-neox",
        "fine-tuned",
        "fine-tuned #2",
        "model 3",
    ]


# --------------------------------------------------------------------------- plots and report


def _report_verdicts() -> list[dict[str, Any]]:
    """A decided pass, a policy-decided inconclusive benchmark gate and an absolute rate gate."""
    tuned_rows, base_rows = _answers([0.6, 0.7, 0.8, 0.9, 0.65]), _answers([0.2, 0.3, 0.25, 0.4, 0.1])
    similarity = decide_gate(
        Gate(metric="eval.similarity_mean", value=0.05, relative_to_base=True),
        _items(tuned_rows),
        _items(base_rows),
        CONFIDENCE,
        LOOKS,
    )
    verdicts = [similarity, _benchmark_verdict("inconclusive"), _eval_verdict("inconclusive")]
    assert similarity["verdict"] == "pass"
    return verdicts


def test_plot_intervals_writes_a_png(tmp_path):
    verdicts = _report_verdicts()
    verdicts.append({**verdicts[0], "low": 0.25, "high": 0.25, "estimate": 0.25, "threshold": 0.25})  # a zero-width one
    plot_intervals(verdicts, tmp_path / "intervals.png")
    png = (tmp_path / "intervals.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_report_shows_each_gate_interval_n_method_and_verdict(tmp_path):
    verdicts = _report_verdicts()
    finalise_decisions(verdicts[2:], "fail")  # the eval gate is decided by the policy; the benchmark one still pending
    plot_intervals(verdicts, tmp_path / "intervals.png")
    base_points = {"eval.similarity_mean": 0.2, "eval.exact_match": 0.0, "benchmark.arc_easy.acc_norm": 0.4}
    tuned_points = {"eval.similarity_mean": 0.6, "eval.exact_match": 0.1, "benchmark.arc_easy.acc_norm": 0.38}
    plot_comparison(
        {"base": base_points, "fine-tuned": tuned_points}, sorted(tuned_points), tmp_path / "comparison.png"
    )
    pngs = {name: (tmp_path / f"{name}.png").read_bytes() for name in ("intervals", "comparison")}
    rows = _answers([0.1, 0.3], ["too_long", "repetitive"])
    rows[0]["answer"] = "a | pipe\nand a newline"
    ranking = rank_versions([_answers([0.2, 0.2]), rows], ["tiny-neox", "fine-tuned"])
    report = report_markdown(
        verdicts,
        "grow",
        1,
        LOOKS,
        tuned_points,
        base_points,
        worst_answers(rows),
        ranking,
        pngs,
        {"base": {"ok": 2}, "fine_tuned": {"too_long": 1, "repetitive": 1}},
        judged_by="similarity",
    )

    assert "Status: **grow** (benchmark look 1 of 4)" in report
    for v in verdicts:
        line = next(line for line in report.splitlines() if line.startswith(f"| `{v['gate']}` |"))
        assert f"[{v['low']:+.3f}, {v['high']:+.3f}] at {v['confidence']:.1%}" in line, line
        assert f"| {v['n']} | {v['method']} |" in line, line
    lines = {
        v["gate"]: next(line for line in report.splitlines() if line.startswith(f"| `{v['gate']}` |")) for v in verdicts
    }
    similarity, arc, refusal = (lines[v["gate"]] for v in verdicts)
    assert similarity.endswith("| pass |") and "| n/a |" in similarity  # no McNemar p for a continuous gate
    assert f"| {verdicts[1]['p_value']:.3f} |" in arc and "at 98.8%" in arc
    assert f"inconclusive (about {verdicts[1]['items_to_decide']} items would decide)" in arc
    assert "inconclusive -> **fail** (gates_on_inconclusive)" in refusal
    assert "(gates_on_inconclusive)" not in similarity + arc
    for part in (
        "## Gates",
        "| eval.similarity_mean | 0.200 | 0.600 | +0.400 |",
        "data:image/png;base64,",
        "![gate intervals against thresholds]",
        "### too_long",
        "### repetitive",
        "a \\| pipe and a newline",
        "| 1 | tiny-neox |",
        "| too_long | 0 | 1 |",
        "judged by similarity",
    ):
        assert part in report, part
