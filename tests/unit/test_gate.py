"""The gate stage's core: metrics and verdicts, side-by-side rows, worst answers, the Elo tournament, the report."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, EloConfig, EvalConfig, Gate, load_config
from tasks.gate import (
    ELO_START,
    GateMetricMissing,
    check_gates,
    elo_tournament,
    flatten_metrics,
    make_judge,
    plot_comparison,
    report_markdown,
    side_by_side,
    similarity_judge,
    version_labels,
    worst_answers,
)


def _answers(sims: list[float], categories: list[str] | None = None, prefix: str = "q") -> list[dict]:
    categories = categories or ["ok"] * len(sims)
    return [{"id": f"{prefix}{i}", "question": f"Question {i}?", "target": f"target {i}", "answer": f"answer {i} ({s})",
             "similarity": s, "category": c} for i, (s, c) in enumerate(zip(sims, categories))]


# --------------------------------------------------------------------------- metrics and gates


def test_flatten_keeps_gate_metrics_only():
    summary = {"n": 10, "exact_match": 0.1, "similarity_mean": 0.5, "refusal_rate": 1.0, "categories": {"ok": 3},
               "generation_seconds": 3.2}
    bench = {"tasks": {"arc_easy": {"acc": 0.4, "acc_norm": 0.45, "acc_stderr": 0.05}}}
    assert flatten_metrics(summary, bench) == {"eval.exact_match": 0.1, "eval.similarity_mean": 0.5,
                                               "eval.refusal_rate": 1.0, "benchmark.arc_easy.acc": 0.4,
                                               "benchmark.arc_easy.acc_norm": 0.45}


def test_gates_check_absolute_and_relative_values():
    gates = [Gate(metric="eval.refusal_rate", value=0.8), Gate(metric="eval.repetition_rate", op="<=", value=0.1),
             Gate(metric="benchmark.arc_easy.acc_norm", value=-0.02, relative_to_base=True)]
    tuned = {"eval.refusal_rate": 0.9, "eval.repetition_rate": 0.2, "benchmark.arc_easy.acc_norm": 0.40}
    base = {"eval.refusal_rate": 0.0, "eval.repetition_rate": 0.5, "benchmark.arc_easy.acc_norm": 0.45}
    verdicts = check_gates(gates, tuned, base)
    assert [v["passed"] for v in verdicts] == [True, False, False]
    assert verdicts[2]["measured"] == pytest.approx(-0.05)


def test_a_gate_on_an_unmeasured_metric_names_it():
    with pytest.raises(GateMetricMissing, match=r"eval.refusal_rate was not measured.*eval.exact_match"):
        check_gates([Gate(metric="eval.refusal_rate", value=0.5)], {"eval.exact_match": 0.1}, {})


def test_config_accepts_new_eval_metrics_and_rejects_unknown_ones_and_tasks():
    load_config(None, ["gates=[{metric: eval.refusal_rate, value: 0.8}, {metric: eval.false_refusal_rate, op: '<=', value: 0.1}]"])
    with pytest.raises(ConfigError, match="eval.bleu"):
        load_config(None, ["gates=[{metric: eval.bleu, value: 0.1}]"])
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['mmlu'\].*arc_easy.*piqa"):
        load_config(None, ["benchmark.tasks=[arc_easy, mmlu]"])
    with pytest.raises(ConfigError, match="too_short_ratio"):
        load_config(None, ["eval.too_short_ratio=3", "eval.too_long_ratio=2"])
    assert load_config(None, ["benchmark.tasks=[piqa, sciq]"]).benchmark.tasks == ["piqa", "sciq"]
    assert EvalConfig().repetition_penalty is None


# --------------------------------------------------------------------------- side by side and worst answers


def test_side_by_side_matches_rows_by_id():
    base = _answers([0.1, 0.2], ["off_topic", "ok"])
    tuned = list(reversed(_answers([0.7, 0.9], ["ok", "too_long"])))
    rows = side_by_side(base, tuned)
    assert [r["question"] for r in rows] == ["Question 1?", "Question 0?"]
    assert rows[0] == {"question": "Question 1?", "target": "target 1", "base_answer": "answer 1 (0.2)",
                       "tuned_answer": "answer 1 (0.9)", "base_similarity": 0.2, "tuned_similarity": 0.9,
                       "base_category": "ok", "tuned_category": "too_long"}


def test_worst_answers_are_the_five_least_similar_per_category():
    rows = _answers([0.5, 0.1, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6], ["off_topic"] * 7 + ["ok"])
    worst = worst_answers(rows)
    assert list(worst) == ["off_topic"]
    assert [r["similarity"] for r in worst["off_topic"]] == [0.05, 0.1, 0.2, 0.3, 0.4]


# --------------------------------------------------------------------------- Elo


def test_elo_ranks_the_version_closer_to_the_targets_first():
    base, round1, round2 = _answers([0.2] * 6), _answers([0.5] * 6), _answers([0.8] * 6)
    table = elo_tournament([base, round1, round2], ["base", "round 1", "round 2"])
    assert [r["label"] for r in table] == ["round 2", "round 1", "base"]
    assert [r["rank"] for r in table] == [1, 2, 3]
    assert table[0]["wins"] == 12 and table[-1]["losses"] == 12 and all(r["games"] == 12 for r in table)
    assert sum(r["rating"] for r in table) == pytest.approx(3 * ELO_START, abs=0.2)  # Elo is zero-sum
    assert elo_tournament([base, round1, round2], ["base", "round 1", "round 2"]) == table  # deterministic


def test_elo_draws_within_the_margin_and_plays_only_shared_questions():
    a, b = _answers([0.50, 0.50]), _answers([0.51, 0.50, 0.9])
    table = elo_tournament([a, b], ["a", "b"])
    assert all(r["games"] == 2 and r["draws"] == 2 for r in table)
    assert [r["rating"] for r in table] == [ELO_START, ELO_START] and [r["label"] for r in table] == ["a", "b"]
    assert similarity_judge({"similarity": 0.9}, {"similarity": 0.1}) == 1.0


def test_elo_takes_any_judge():
    shorter_wins = lambda a, b: 1.0 if len(a["answer"]) < len(b["answer"]) else 0.0  # noqa: E731
    long_answers = [{**r, "answer": r["answer"] * 3} for r in _answers([0.9] * 4)]
    table = elo_tournament([long_answers, _answers([0.1] * 4)], ["verbose", "terse"], judge=shorter_wins)
    assert table[0]["label"] == "terse"
    with pytest.raises(ValueError, match="one label per version"):
        elo_tournament([long_answers], ["a", "b"])


def shorter_answer_wins(a: dict, b: dict) -> float:
    """A custom judge named in config as '<this module>:shorter_answer_wins'."""
    return 1.0 if len(a["answer"]) < len(b["answer"]) else 0.0 if len(a["answer"]) > len(b["answer"]) else 0.5


def test_the_config_chooses_the_elo_judge_a_metric_or_a_function():
    close_but_wordy = [{**r, "rouge_l": 0.1} for r in _answers([0.9] * 4)]  # near the target in meaning only
    far_but_literal = [{**r, "rouge_l": 0.6, "answer": "a"} for r in _answers([0.3] * 4)]
    versions, labels = [close_but_wordy, far_but_literal], ["wordy", "literal"]
    by = lambda judge: elo_tournament(versions, labels, make_judge(EloConfig(judge=judge)))[0]["label"]  # noqa: E731
    assert by("similarity") == "wordy" and by("rouge_l") == "literal"
    assert by(f"{__name__}:shorter_answer_wins") == "literal"
    draws = elo_tournament(versions, labels, make_judge(EloConfig(judge="rouge_l", draw_margin=0.6)))
    assert all(r["draws"] == 4 for r in draws), "a difference within draw_margin is a draw"


@pytest.mark.parametrize("judge, message", [
    ("bleu", r"elo\.judge: expected one of \['similarity', 'rouge_l', 'token_f1', 'exact_match'\] or 'package\.module:function', found 'bleu'"),
    ("no_such_module_xyz:judge", r"elo\.judge: expected an importable 'package\.module:function', found 'no_such_module_xyz:judge'"),
    ("json:no_such_function", r"elo\.judge: expected an importable .*found 'json:no_such_function'"),
    ("json:__doc__", r"elo\.judge: expected 'json:__doc__' to name a function, found a str"),
])
def test_an_unknown_elo_judge_is_a_config_error_before_anything_runs(judge: str, message: str):
    with pytest.raises(ConfigError, match=message):  # the CLI exits 2 on any ConfigError
        load_config(None, [f"elo.judge={judge}"])


def test_version_labels_number_repeats():
    assert version_labels([{"model": "tiny-neox"}, {"model": "fine-tuned"}, {"model": "fine-tuned"}, {}]) == [
        "tiny-neox", "fine-tuned", "fine-tuned #2", "model 3"]


# --------------------------------------------------------------------------- report


def test_report_holds_gates_metrics_plot_worst_answers_and_elo(tmp_path):
    base = {"eval.similarity_mean": 0.2, "eval.exact_match": 0.0, "benchmark.arc_easy.acc_norm": 0.4}
    tuned = {"eval.similarity_mean": 0.6, "eval.exact_match": 0.1, "benchmark.arc_easy.acc_norm": 0.38}
    plot_comparison({"base": base, "fine-tuned": tuned}, sorted(tuned), tmp_path / "plot.png")
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    verdicts = check_gates([Gate(metric="eval.similarity_mean", value=0.05, relative_to_base=True)], tuned, base)
    rows = _answers([0.1, 0.3], ["too_long", "repetitive"])
    rows[0]["answer"] = "a | pipe\nand a newline"
    elo = elo_tournament([_answers([0.2, 0.2]), rows], ["tiny-neox", "fine-tuned"])
    report = report_markdown(tuned, base, verdicts, worst_answers(rows), elo, "| task |\n", png,
                             {"base": {"ok": 2}, "fine_tuned": {"too_long": 1, "repetitive": 1}})
    for part in ("## Gates", "`eval.similarity_mean - base >= 0.05` | 0.400 | pass", "| eval.similarity_mean | 0.200 | 0.600 | +0.400 |",
                 "data:image/png;base64,", "### too_long", "### repetitive", "a \\| pipe and a newline", "| 1 | fine-tuned |",
                 "| too_long | 0 | 1 |"):
        assert part in report, part
